"""Qwen3-VL dense (2B / 4B / 8B / 32B Instruct): the Qwen2.5-VL descriptor with what differs.

- Vision tower: 16 px patches (2x2 merged: one image token per 32x32 px), a learned position grid resampled per
  image, full attention per image over `cu_seqlens` (no windows), MLP leaves `linear_fc1` / `linear_fc2`.
- DeepStack: besides `model.visual.merger`, one merger per `deepstack_visual_indexes` block
  (`model.visual.deepstack_merger_list.N`) adds that block's features onto the image tokens' hidden states after
  the first language layers. Both are projectors (trained with `lora.train_projector`, kept 16-bit under QLoRA).
- Language model: Qwen3 (q/k RMSNorm, `head_dim` set apart from hidden / heads) with interleaved M-RoPE: the
  temporal/height/width sections alternate across the rotary frequencies instead of taking contiguous blocks
  (transformers 5.17 and 5.23 always interleave; `mrope_interleaved` in the config is informational).
- Chat template: the Instruct models' ChatML without a default system prompt and without think tags.

transformers 5.17 and 5.23 layout (same names in both): `model.visual` (patch_embed, pos_embed, blocks, merger,
deepstack_merger_list), `model.language_model`, `lm_head` (tied to the embeddings in 2B and 4B).
`get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask)` has Qwen2-VL's
signature in both, so collator-computed positions and packing work unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import Qwen3VLProcessor

from vlmtune.families.base import UpstreamNamedProcessor
from vlmtune.families.qwen2_5_vl import Qwen2_5_VLFamily


class Qwen3VLImageTextProcessor(UpstreamNamedProcessor, Qwen3VLProcessor):
    """Qwen3VLProcessor with only image_processor + tokenizer (the video-processor trap of transformers 5.x
    without torchvision; see Qwen2VLImageTextProcessor)."""

    upstream_class = "Qwen3VLProcessor"

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


# The Qwen3-VL Instruct rendering of plain conversations (no tools, no videos): no default system prompt; a system
# message renders its text only, images render in user messages only (elsewhere the official template drops them,
# which data processing then reports as an image-count mismatch), no <think> tags.
QWEN3_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% if message['role'] == 'user' %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_ROPE = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
_VISION_SMALL = {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                 "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17]}
_VISION_LARGE = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                 "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]}


def _text(hidden: int, intermediate: int, layers: int, heads: int, tied: bool) -> dict[str, Any]:
    return {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
            "max_position_embeddings": 262144, "tie_word_embeddings": tied, "rope_parameters": _ROPE}


class Qwen3VLFamily(Qwen2_5_VLFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    default_model = "Qwen/Qwen3-VL-8B-Instruct"
    description = "Qwen3-VL 2B/4B/8B/32B Instruct: dynamic resolution (16 px patches), DeepStack, interleaved M-RoPE"

    projector_prefixes = ("model.visual.merger", "model.visual.deepstack_merger_list")
    vision_lora_targets = ("qkv", "proj", "linear_fc1", "linear_fc2")
    chat_template = QWEN3_CHATML_TEMPLATE
    processor_class = Qwen3VLImageTextProcessor
    patch_size = 16
    real_pixel_bounds = (65536, 16777216)  # 64 to 16384 image tokens
    tiny_image_pixels = 64 * 64  # 4x4 patches of 16 px, 2x2 merged = 4 image tokens
    image_normalization = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}

    tiny_numbers: Mapping[str, Any] = {
        # head_dim 32 with 4 heads: the attention width (128) differs from hidden (64), as in the 4B model.
        # mrope_section sums to head_dim / 2 = 16 frequencies; interleaved, height and width take every third
        # frequency from the second and third on (T H W T H W ... T), as in the real [24, 20, 20] of 64.
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                        "max_position_embeddings": 4096,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                            "mrope_section": [6, 5, 5], "mrope_interleaved": True},
                        "tie_word_embeddings": True},
        # DeepStack from blocks 1 and 2 into language layers 0 and 1; a 6x6 learned position grid that the model
        # resamples to each image's patch grid.
        "vision_config": {"depth": 3, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 36,
                          "deepstack_visual_indexes": [1, 2]},
        "tie_word_embeddings": True,
    }
    architectures = {
        "2b": {"text_config": _text(2048, 6144, 28, 16, tied=True), "vision_config": _VISION_SMALL,
               "tie_word_embeddings": True},
        "4b": {"text_config": _text(2560, 9728, 36, 32, tied=True), "vision_config": _VISION_SMALL,
               "tie_word_embeddings": True},
        "8b": {"text_config": _text(4096, 12288, 36, 32, tied=False), "vision_config": _VISION_LARGE,
               "tie_word_embeddings": False},
        "32b": {"text_config": _text(5120, 25600, 64, 64, tied=False), "vision_config": _VISION_LARGE,
                "tie_word_embeddings": False},
    }


DESCRIPTOR = Qwen3VLFamily()
