"""Qwen3-VL MoE (30B-A3B Instruct): the Qwen3-VL descriptor with a mixture-of-experts language model.

- Same vision tower (the 8B's: 27 blocks, DeepStack from blocks 8/16/24), template, processor, interleaved M-RoPE
  and `get_rope_index` as dense Qwen3-VL, so the image rule, collator positions and packing carry over unchanged.
- Language model: every decoder layer's MLP is a sparse MoE block (128 experts, 8 per token, no shared expert):
  `mlp.gate` is the router (a bare `weight` parameter, not nn.Linear) and `mlp.experts` holds all experts fused as
  3-D parameters, `gate_up_proj` (experts, 2 x moe_intermediate, hidden) and `down_proj` (experts, hidden,
  moe_intermediate). No nn.Linear exists there, so `target_modules` cannot reach the experts: the `all` LoRA set adds
  them through PEFT's `target_parameters` (ParamWrapper: one low-rank update per expert tensor, trained and merged
  like a linear layer's; tested in tests/families/test_qwen3_vl_moe.py). The router stays frozen: adapting it moves
  the token-to-expert assignment, which the pretrained experts' load balance depends on.
- QLoRA: bitsandbytes quantizes nn.Linear layers only, so the experts (about 93% of the 31B weights) stay 16-bit;
  only attention is 4-bit. The estimator counts them so (memory/params.py counts nn.Linear weights as quantizable).

transformers 5.17 and 5.23 layout (same names): as Qwen3-VL, with `model.language_model.layers.N.mlp.{gate,experts}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vlmtune.families.capabilities import Experimental, Unsupported
from vlmtune.families.qwen3_vl import _ROPE, _VISION_LARGE, Qwen3VLFamily
from vlmtune.families.tiny import overlay

if TYPE_CHECKING:
    from vlmtune.config.schema import VlmtuneConfig

_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_ZERO3 = ("transformers 5.23 loads a checkpoint under ZeRO-3 (zero.Init) without the conversion that transposes the "
          "fused expert weights from the checkpoint's layout, so loading stops with a size mismatch (and a square "
          "expert tensor would load transposed); use distributed.zero_stage 2 or one process")


class Qwen3VLMoeFamily(Qwen3VLFamily):
    name = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
    default_model = "Qwen/Qwen3-VL-30B-A3B-Instruct"
    description = "Qwen3-VL 30B-A3B Instruct: Qwen3-VL with a mixture-of-experts language model (128 experts, 8 active)"

    lora_target_sets = {"minimal": ("q_proj", "v_proj", "o_proj"), "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
                        "all": ("q_proj", "k_proj", "v_proj", "o_proj")}
    lora_target_parameters = {"all": _EXPERTS}

    capabilities = {
        **Qwen3VLFamily.capabilities,
        "qlora": Experimental(
            "bitsandbytes quantizes nn.Linear layers only; the fused 3-D expert weights (about 93% of the 31B "
            "parameters) stay 16-bit, so QLoRA saves little over LoRA (attention alone is 4-bit)"),
        "zero3": Unsupported(_ZERO3),
    }

    tiny_numbers: Mapping[str, Any] = overlay(Qwen3VLFamily.tiny_numbers, {"text_config": {
        # 4 experts, 2 per token: a short sample routes to every expert, so each expert's adapter is exercised.
        "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
        "mlp_only_layers": []}})
    architectures = {
        "30b-a3b": {"text_config": {"hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                                    "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1,
                                    "mlp_only_layers": [], "num_hidden_layers": 48, "num_attention_heads": 32,
                                    "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
                                    "max_position_embeddings": 262144, "tie_word_embeddings": False,
                                    "rope_parameters": _ROPE},
                    "vision_config": _VISION_LARGE, "tie_word_embeddings": False},
    }

    def _check_extra(self, config: VlmtuneConfig) -> list[str]:
        problems = super()._check_extra(config)
        if config.distributed.zero_stage == 3 and config.distributed.engine != "none":
            problems.append(f"distributed.zero_stage=3: {self.name} cannot load under ZeRO-3: {_ZERO3}")
        return problems


DESCRIPTOR = Qwen3VLMoeFamily()
