"""Qwen3.5 (dense, e.g. Qwen3.5-9B): one model for text and images. The Qwen3-VL descriptor with what differs.

- Vision tower: Qwen3-VL's (16 px patches, 2x2 merged, a learned position grid, full attention per image over
  `cu_seqlens`) without DeepStack: `model.visual.merger` is the only projector.
- Language model: hybrid. Three of every four decoder layers are gated DeltaNet linear attention
  (`layers.N.linear_attn`: `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`, a causal depthwise `conv1d`,
  `out_proj`), every fourth is gated full attention (`layers.N.self_attn`: `q_proj` (query and gate), `k_proj`,
  `v_proj`, `o_proj`, q/k RMSNorm, `head_dim` 256, rotary on a quarter of it). Positions are interleaved M-RoPE
  built by `get_rope_index` (Qwen3-VL's signature), so collator positions work unchanged.
- LoRA target sets name both layer kinds: each set adds the linear-attention projections that play the same part
  (minimal: the qkv and output projections; attention: also the output gate `in_proj_z`). `in_proj_a` / `in_proj_b`
  (one scalar per value head, 32 outputs) are left out: an adapter of rank 16 there would be half the layer.
- Chat template: the non-thinking rendering. Qwen3.5 is a thinking model; its template with `enable_thinking=False`
  opens the answer with an empty `<think>\\n\\n</think>\\n\\n`. vlmtune writes that block before every assistant turn
  (in the prompt, unlabelled) and as the generation prompt, so training and `predict` see one format, and labels
  are the answer and `<|im_end|>` only.

Linear-attention kernels (`linear_attention_kernels` in the capability map): transformers 5.17 and 5.23 run the
DeltaNet layers through `fla` (flash-linear-attention, Triton) and `causal_conv1d` when those packages import,
else through a PyTorch reference (`torch_chunk_gated_delta_rule`, a Python loop over 64-token chunks, and
`F.conv1d`), which it says is "correct but much slower" in a warning. vlmtune requires neither and logs a note
when they are missing (`notes`). transformers binds fla's kernel when fla imports, whatever the device; where it
cannot train (`linear_attention_functions`, families/linear_attention.py: the CPU, or fla-core 0.6.0 refusing its
backward on a Hopper GPU with Triton >= 3.4.0 and < 3.7.1 and no tilelang, which stopped every Qwen3.5 run on an H100
with torch 2.11 / Triton 3.6.0 at its first backward), `apply_speed` points `torch_chunk_gated_delta_rule` at the
PyTorch reference for the run and the start event says so (`speed.kernels`); the memory estimate counts the same
kernel. The recurrent (one-token decode) function keeps fla: its forward runs.

Packing (`packed_span_modules = ("linear_attn",)`): the DeltaNet layers carry a recurrent state and a 4-token conv
window along the sequence, which no attention mask can cut, and their forward takes no positions (transformers'
reference path raises when `cu_seqlens` reach it). With `speed.packing`, `apply_speed` runs each `linear_attn` once
per sample span of a packed row (speed/span_layers.py), so state and window restart per sample on either path; the
full-attention layers keep their samples apart by the positions like any family's (`packed_row_attention =
"per_sample"`). The packed logits equal the padded ones to 2e-7; without the per-span layers they differ by 0.065
(tests/speed/test_packing.py). Cost: a Python loop over the row's samples in every DeltaNet layer, one set of kernel
launches per sample, so rows of many short samples are slower there; unmeasured on a GPU.

Speed switches: the chunked loss (`lm_head`), fused LoRA and 16-bit LoRA inputs (every adapted projection is an
`nn.Linear`), the frozen vision tower without grad (`model.visual`), varlen vision attention (the tower attends
over `cu_seqlens`), collator positions and packing (above) apply; `speed.compile` compiles each decoder layer but the
first like any family's; with packing, auto stays eager (the per-span loop reads the sample boundaries on the host
and would recompile for every packing layout: speed/compile_policy.py), and so it does where the DeltaNet layers run
the PyTorch reference (`reference_compile_cost`). vlmtune runs the reference as one opaque operator
(speed/opaque_delta_rule.py), eager and compiled: it keeps its inputs for backward (312 kB per token per 9B DeltaNet
layer instead of 615 kB traced), and compiled layers do not trace its loop over chunks (traced, every new
chunk count compiled again: on an H100, Qwen3.5-9B LoRA, 87 s for the first compiled step, the second not done 200 s
later). The operator computes the delta rule with vlmtune's own implementation (speed/delta_rule.py); with it
Qwen3.5-9B ran at 1.75x (LoRA) and 2.08x (QLoRA) the plain loop eager, 1.88x and 2.70x compiled (H200, session 18).
With fla's kernel compiling is unmeasured.

transformers 5.17 and 5.23 layout (same names): `model.visual` (patch_embed, pos_embed, blocks, merger),
`model.language_model` (`layers.N.linear_attn` or `layers.N.self_attn`, `mlp`), `lm_head`. The processor is
`Qwen3VLProcessor` (AutoProcessor maps qwen3_5 to it), with Qwen2-VL's image processor at 16 px patches.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vlmtune.families.capabilities import Supported
from vlmtune.families.qwen2_vl import QWEN_SPECIAL_TOKENS
from vlmtune.families.qwen3_vl import Qwen3VLFamily

if TYPE_CHECKING:
    from vlmtune.config.schema import VlmtuneConfig

_THINK_OFF = "<think>\n\n</think>\n\n"

# Qwen3-VL's plain-conversation ChatML (see qwen3_vl.py) with the empty thinking block opening each answer.
QWEN3_5_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}" + _THINK_OFF + "{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% if message['role'] == 'user' %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n" + _THINK_OFF + "{% endif %}"
)

_LINEAR_QKV_OUT = ("in_proj_qkv", "out_proj")
LORA_TARGET_SETS: Mapping[str, tuple[str, ...]] = {
    "minimal": ("q_proj", "v_proj", "o_proj", *_LINEAR_QKV_OUT),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj", *_LINEAR_QKV_OUT, "in_proj_z"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", *_LINEAR_QKV_OUT, "in_proj_z",
            "gate_proj", "up_proj", "down_proj"),
}

KERNEL_MODULES = ("fla", "causal_conv1d")
"""The packages transformers takes the DeltaNet kernels from (`use_kernel_func_from_hub_with_fallback`)."""

_KERNELS = ("without the flash-linear-attention and causal-conv1d packages, transformers runs the gated DeltaNet "
            "layers (3 of every 4) on its PyTorch reference path: correct, but a Python loop over chunks of tokens "
            "with many small kernels instead of one fused Triton kernel. On a GPU install them for speed "
            "(`pip install flash-linear-attention causal-conv1d`); vlmtune trains either way")
_PACKING = ("the gated DeltaNet layers (a recurrent state and a 4-token conv window along the sequence) run once per "
            "sample of a packed row, a Python loop with one set of kernel launches per sample: rows of many short "
            "samples are slower there")

_REFERENCE_COMPILE = ("compiled layers run it as one operator and compile once (speed/opaque_delta_rule.py), and are "
                      "faster per step (H200, session 18: Qwen3.5-9B LoRA 1.07x eager's speed, QLoRA 1.30x), but "
                      "compiling took 80 s and 62 s in a first run, which pays back after about 1,450 LoRA or 340 "
                      "QLoRA steps (set speed.compile=true for runs that long)")

_ROPE = {"rope_type": "default", "rope_theta": 10000000.0, "mrope_section": [11, 11, 10], "mrope_interleaved": True,
         "partial_rotary_factor": 0.25}


class Qwen3_5Family(Qwen3VLFamily):
    name = "qwen3_5"
    model_types = ("qwen3_5",)
    default_model = "Qwen/Qwen3.5-9B"
    description = ("Qwen3.5 dense (e.g. 9B): Qwen3-VL's vision tower, a hybrid gated-DeltaNet / gated-attention "
                   "language model, non-thinking ChatML")

    projector_prefixes = ("model.visual.merger",)
    lora_target_sets = LORA_TARGET_SETS
    chat_template = QWEN3_5_TEMPLATE
    packed_span_modules = ("linear_attn",)
    linear_attention_functions = ("transformers.models.qwen3_5.modeling_qwen3_5:torch_chunk_gated_delta_rule",)
    reference_compile_cost = _REFERENCE_COMPILE
    capabilities = {
        **Qwen3VLFamily.capabilities,
        "packing": Supported(_PACKING),
        "varlen_vision_attention": Supported("the vision tower attends per image over cu_seqlens"),
        "mrope_positions": Supported("get_rope_index has Qwen3-VL's signature"),
        "linear_attention_kernels": Supported(_KERNELS),
    }

    tiny_special_tokens = (*QWEN_SPECIAL_TOKENS, "<think>", "</think>")
    tiny_numbers: Mapping[str, Any] = {
        # Layer 0 linear attention, layer 1 full attention (the real models repeat 3 + 1). Full attention: head_dim
        # 32, rotary on a quarter (8 dims = 4 frequencies, interleaved M-RoPE sections 2/1/1); linear attention:
        # 2 key heads serving 4 value heads (grouped as in the real 16 / 32), head dims 16.
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
                        "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4,
                        "layer_types": ["linear_attention", "full_attention"], "max_position_embeddings": 4096,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                            "mrope_interleaved": True, "partial_rotary_factor": 0.25},
                        "tie_word_embeddings": False},
        "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 36},
        "tie_word_embeddings": False,
    }
    architectures = {
        # Qwen/Qwen3.5-9B config.json numbers (transformers' Qwen3_5TextConfig defaults are this model's)
        "9b": {"text_config": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 32,
                               "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 256,
                               "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
                               "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "layer_types": None,
                               "vocab_size": 248320, "max_position_embeddings": 262144, "rope_parameters": _ROPE,
                               "tie_word_embeddings": False},
               "vision_config": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                                 "num_position_embeddings": 2304},
               "tie_word_embeddings": False},
    }

    def notes(self, config: VlmtuneConfig) -> list[str]:
        missing = [name for name in KERNEL_MODULES if importlib.util.find_spec(name) is None]
        note = [f"{self.name}: {', '.join(missing)} not installed: {_KERNELS}"] if missing else []
        return super().notes(config) + note


DESCRIPTOR = Qwen3_5Family()
