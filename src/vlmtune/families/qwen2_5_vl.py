"""Qwen2.5-VL (3B / 7B): Qwen2-VL's processor, template and layout, with a windowed-attention vision tower whose
blocks use a gated MLP (`gate_proj` / `up_proj` / `down_proj`, the same leaf names as the language model: LoRA
targets must be scoped to `model.language_model`, which `lora_target_regex` does).

Derived from the Qwen2-VL descriptor, as transformers derives the model (modular_qwen2_5_vl.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from transformers import Qwen2_5_VLProcessor

from vlmtune.families.base import UpstreamNamedProcessor
from vlmtune.families.qwen2_vl import Qwen2VLFamily

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class Qwen2_5_VLImageTextProcessor(UpstreamNamedProcessor, Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor with only image_processor + tokenizer (the video-processor trap of transformers 5.x
    without torchvision; see Qwen2VLImageTextProcessor)."""

    upstream_class = "Qwen2_5_VLProcessor"

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


_ROPE_7B = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
_VISION_REAL = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]}


class Qwen2_5_VLFamily(Qwen2VLFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    default_model = "Qwen/Qwen2.5-VL-7B-Instruct"
    description = "Qwen2.5-VL 3B/7B Instruct: dynamic resolution, windowed vision attention, ChatML"

    vision_lora_targets = ("qkv", "proj", "gate_proj", "up_proj", "down_proj")
    processor_class = Qwen2_5_VLImageTextProcessor

    tiny_numbers: Mapping[str, Any] = {
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                        # mrope_section (temporal, height, width) must sum to head_dim / 2 = 16 / 2
                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                            "mrope_section": [2, 3, 3]},
                        "tie_word_embeddings": False},
        # window 112 px covers a whole tiny image; block 1 is a full-attention block as in the real layout
        "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                          "fullatt_block_indexes": [1]},
        "tie_word_embeddings": False,
    }
    architectures = {
        "3b": {"text_config": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                               "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                               "max_position_embeddings": 128000, "tie_word_embeddings": True,
                               "rope_parameters": _ROPE_7B},
               "vision_config": _VISION_REAL, "tie_word_embeddings": True},
        "7b": {"text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                               "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                               "max_position_embeddings": 128000, "tie_word_embeddings": False,
                               "rope_parameters": _ROPE_7B},
               "vision_config": _VISION_REAL, "tie_word_embeddings": False},
    }

    def tiny_config(self, token_ids: Mapping[str, int], vocab_size: int,
                    arch: Mapping[str, Any] | None) -> PretrainedConfig:
        from transformers import CONFIG_MAPPING

        numbers = self._config_dict(token_ids, vocab_size, arch)
        numbers["vision_config"] = {**numbers["vision_config"],
                                    "out_hidden_size": numbers["text_config"]["hidden_size"]}
        return CONFIG_MAPPING[self.model_types[0]](**numbers)  # also the subclasses' (Qwen3-VL)


DESCRIPTOR = Qwen2_5_VLFamily()
