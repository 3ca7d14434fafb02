"""Qwen-VL (Qwen/Qwen-VL-Chat, Qwen/Qwen-VL): Qwen-7B with a ViT-bigG/14 vision tower at a fixed 448 px and a
one-layer cross-attention resampler that turns each image into 256 tokens.

The Hub checkpoints ship only remote code written for transformers 4.3x; vlmtune never runs it. The architecture is
ported in `families/qwen_vl_model/` (config.json and weight names as they are on the Hub, registered with
transformers' Auto classes under `model_type: qwen`), so the one loading path loads the checkpoint, and what
vlmtune saves (merged exports included) is again the Hub layout the original code loads. Numerical parity with
the original: benchmarks/qwen_vl_parity.py, benchmarks/RESULTS.md; CI guards it with a committed fixture.

Layout: `transformer.wte`, `transformer.h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.w1, mlp.w2, mlp.c_proj}`,
`transformer.ln_f`, `lm_head`; vision `transformer.visual.{conv1, positional_embedding, ln_pre,
transformer.resblocks.N.{attn.in_proj, attn.out_proj, mlp.c_fc, mlp.c_proj}}`. The projector is the resampler
(`attn_pool`) with `ln_post` and the square `proj` matrix: what turns 1024 patch features into 256 tokens of the
language model's width.

Prompt format (the chat model's, ChatML): a system turn ("You are a helpful assistant." unless the record has
one), `<|im_start|>role\\n ... <|im_end|>\\n` per message, each image as `Picture N: <img>...</img>\\n` (N counts
the conversation's images), labels on the assistant's text and `<|im_end|>`. The original writes the image's path
between `<img>` and `</img>`, padded with `<imgpad>` to 256 tokens, and overwrites that span with the image's
features; vlmtune writes 256 `<imgpad>` there: the same hidden states.

Speed switches: the chunked loss (`lm_head`), fused LoRA, 16-bit LoRA inputs and the frozen vision tower without
grad apply through the prefixes below; packing, varlen vision attention and M-RoPE positions are declined with the
reason in the capability map.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.errors import VlmtuneError
from vlmtune.families.base import FamilyDescriptor
from vlmtune.families.capabilities import Experimental, Supported, Unsupported
from vlmtune.families.qwen_vl_model import register
from vlmtune.families.qwen_vl_model.processor import QwenVLProcessor
from vlmtune.families.tiny import overlay

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from vlmtune.config.schema import DataConfig

register()
log = logging.getLogger(__name__)

QWEN_VL_TEMPLATE = (
    "{% set ns = namespace(images=0) %}"
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{% set ns.images = ns.images + 1 %}"
    "Picture {{ ns.images }}: <img><imgpad></img>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_BPE_RANKS = 700
"""Byte-level ranks of the tiny vocabulary (256 bytes + learned merges); Qwen-VL's 217 special tokens follow."""
TINY_VOCAB_SIZE = 1024
"""The tiny embedding rows: the tokenizer's 917 padded up, as the checkpoint pads 151860 to 151936."""

_PACKING = ("Qwen-VL's positions are each token's index in the row (the original model ignores position ids), so "
            "packed samples would not restart their positions and would attend to each other; remove speed.packing")


class QwenVLFamily(FamilyDescriptor):
    name = "qwen_vl"
    model_types = ("qwen",)
    default_model = "Qwen/Qwen-VL-Chat"
    description = "Qwen-VL-Chat / Qwen-VL: ViT-bigG at 448 px, 256-query resampler, Qwen-7B (ported, no remote code)"

    vision_prefixes = ("transformer.visual",)
    projector_prefixes = ("transformer.visual.attn_pool", "transformer.visual.ln_post", "transformer.visual.proj")
    language_prefixes = ("transformer.wte", "transformer.h", "transformer.ln_f")
    lm_head_names = ("lm_head",)
    language_layers_prefix = "transformer.h"
    vision_layers_prefix = "transformer.visual.transformer.resblocks"
    # c_attn is q, k and v in one layer, so the minimal and attention sets are the same layers
    lora_target_sets = {
        "minimal": ("c_attn", "attn.c_proj"),
        "attention": ("c_attn", "attn.c_proj"),
        "all": ("c_attn", "attn.c_proj", "w1", "w2", "mlp.c_proj"),
    }
    vision_lora_targets = ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")

    capabilities = {
        "lora": Supported(), "qlora": Supported(), "full": Supported(),
        "adapt_vision_tower": Supported("LoRA on the ViT blocks (attn.in_proj, attn.out_proj, mlp.c_fc, mlp.c_proj)"),
        "train_projector": Supported("the resampler (attn_pool) and ln_post train fully; the final square `proj` "
                                     "(a bare matrix, which PEFT's modules_to_save cannot hold) stays frozen; full "
                                     "fine-tuning trains it"),
        "unfreeze_vision_tower": Supported(),
        "quantize_vision_tower": Experimental("4-bit ViT-bigG layers are untested for accuracy; keep them 16-bit"),
        "quantize_lm_head": Experimental("a 4-bit lm_head costs accuracy for little memory"),
        "flash_attention_2": Experimental("needs the flash-attn package; sdpa already runs flash kernels"),
        "fp16": Supported("the checkpoint is fp16"),
        "pixel_bounds": Unsupported("Qwen-VL sees every image at the ViT's fixed 448 px; remove data.min_pixels / "
                                    "data.max_pixels"),
        "multi_image": Supported("each image is 'Picture N: <img>...</img>', as Qwen-VL-Chat was trained"),
        "packing": Unsupported(_PACKING),
        "varlen_vision_attention": Unsupported("the ViT attends over each image's 1024 patches as one fixed-size "
                                               "sequence (no cu_seqlens); plain SDPA already runs it batched"),
        "mrope_positions": Unsupported("Qwen-7B uses 1-D rotary positions; there are no M-RoPE positions to build"),
    }
    image_placeholder = "<img><imgpad></img>\n"
    end_of_turn = "<|im_end|>"
    chat_template = QWEN_VL_TEMPLATE
    dynamic_resolution = False
    processor_class = QwenVLProcessor

    tiny_special_tokens = ()
    tiny_token_roles = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    tiny_extra_eos = ("<|im_end|>",)

    tiny_numbers: Mapping[str, Any] = {
        "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "kv_channels": 64,
        "intermediate_size": 512, "vocab_size": TINY_VOCAB_SIZE,
        # the released seq_length: inference within it is unscaled (the parity script lowers it to 64 so that the
        # original's dynamic-NTK and log-n scaling run in its fixture)
        "seq_length": 2048, "max_position_embeddings": 1024,
        # 2 resampler heads (output_dim / 128), 16 queries over a 4 x 4 patch grid
        "visual": {"heads": 2, "image_size": 56, "layers": 2, "mlp_ratio": 2.0, "output_dim": 256,
                   "patch_size": 14, "width": 64, "n_queries": 16},
    }
    architectures = {
        # Qwen/Qwen-VL-Chat config.json (the same numbers as Qwen/Qwen-VL): Qwen-7B (hidden 4096, 32 layers, 32
        # heads, intermediate 22016 = 2 x 11008, vocab 151936, untied lm_head, seq_length 2048); ViT-bigG/14 at 448 px
        # (width 1664, 48 layers, 16 heads, mlp_ratio 4.9231 -> 8192), resampler to 256 x 4096.
        "7b": {
            "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "kv_channels": 128,
            "intermediate_size": 22016, "vocab_size": 151936, "seq_length": 2048, "max_position_embeddings": 8192,
            "visual": {"heads": 16, "image_size": 448, "layers": 48, "mlp_ratio": 4.9231, "output_dim": 4096,
                       "patch_size": 14, "width": 1664, "n_queries": 256},
        },
    }

    # ---- processor ----
    def load_processor(self, path: str | Path, data_cfg: DataConfig | None = None) -> QwenVLProcessor:
        processor = QwenVLProcessor.from_pretrained(path, chat_template=self.chat_template)
        if data_cfg is not None:
            self._configure_image_processor(processor, data_cfg)
        return processor

    def _configure_image_processor(self, processor: Any, data_cfg: DataConfig) -> None:
        """Every image is resized to the ViT's fixed side (448 px) and costs 256 tokens whatever its size. A smaller
        data.image_size (the ultra_low_memory preset's 336 px, meant for dynamic-resolution families, where it
        bounds the image tokens) would not save memory here, so it is not refused as for other fixed-resolution
        families: it is logged as having no effect. Pixel bounds are refused."""
        side = processor.image_processor.image_size
        if data_cfg.image_size is not None and data_cfg.image_size < side:
            log.warning("data.image_size=%d has no effect on %s: every image is seen at the vision tower's fixed "
                        "%d px and costs %d tokens whatever its size", data_cfg.image_size, self.name, side,
                        processor.queries)
            data_cfg = data_cfg.model_copy(update={"image_size": None})
        self._check_fixed_resolution(side, data_cfg)

    def image_token_count(self, height: int, width: int, processor: Any) -> int:
        return int(processor.queries)

    # ---- tiny models ----
    def tiny_config(self, token_ids: Mapping[str, int], vocab_size: int,
                    arch: Mapping[str, Any] | None) -> PretrainedConfig:
        from vlmtune.families.qwen_vl_model import QwenVLConfig

        numbers = overlay(self.tiny_numbers, arch)
        if numbers["vocab_size"] < vocab_size:
            raise VlmtuneError(f"qwen_vl architecture: vocab_size {numbers['vocab_size']} is smaller than the "
                               f"tokenizer's {vocab_size} tokens")
        numbers["visual"]["image_start_id"] = token_ids["<img>"]
        return QwenVLConfig(**numbers, eos_token_id=token_ids["<|endoftext|>"], pad_token_id=token_ids["<|endoftext|>"])

    def tiny_processor(self, tokenizer: Any, config: PretrainedConfig, full_size: bool) -> QwenVLProcessor:
        """Not used: the generic builder (families/tiny.py) trains a `tokenizers` tokenizer, while Qwen-VL's is a
        tiktoken vocabulary file; `build_tiny` below writes that file and reads the processor back from it."""
        raise VlmtuneError("the qwen_vl processor is read from a qwen.tiktoken file: build tiny models with "
                           "QwenVLFamily.build_tiny (vlmtune tiny-model --family qwen_vl)")

    def build_tiny(self, out_dir: str | Path, arch: str | Mapping[str, Any] | None = None, *, seed: int = 0,
                   with_weights: bool | None = None, device: str = "cpu") -> Path:
        """The tiny model in the Hub layout: a small `qwen.tiktoken` trained here, config.json, weights, and the
        processor files; `arch` ("7b" or numbers) gives that architecture (config only unless `with_weights`)."""
        from transformers import GenerationConfig

        from vlmtune.families.qwen_vl_model import QwenVLForCausalLM
        from vlmtune.families.qwen_vl_model.tokenizer import (
            SPECIAL_TOKENS,
            VOCAB_FILE,
            train_tiny_ranks,
            write_ranks,
        )
        from vlmtune.families.tiny import random_weights

        if isinstance(arch, str):
            if arch not in self.architectures:
                raise VlmtuneError(f"unknown {self.name} architecture '{arch}'; known: {', '.join(self.architectures)}")
            arch = self.architectures[arch]
        with_weights = arch is None if with_weights is None else with_weights
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ranks = train_tiny_ranks(TINY_BPE_RANKS)
        write_ranks(ranks, out / VOCAB_FILE)
        token_ids = {token: len(ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
        config = self.tiny_config(token_ids, len(ranks) + len(SPECIAL_TOKENS), arch)
        generation = GenerationConfig(eos_token_id=[token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
                                      pad_token_id=token_ids["<|endoftext|>"])
        if with_weights:
            with random_weights(seed, device):
                model = QwenVLForCausalLM(config)
            model.generation_config = generation
            model.save_pretrained(out)
        else:
            config.save_pretrained(out)
            generation.save_pretrained(out)
        self.load_processor(out).save_pretrained(out)
        return out


DESCRIPTOR = QwenVLFamily()
