"""Qwen2-VL (2B / 7B): dynamic resolution (14 px patches, 2x2 merged into one token), ChatML template, M-RoPE.

transformers 5.23 layout: `model.visual` (blocks + `merger`, the projector, inside it), `model.language_model`,
`lm_head` (tied to the embeddings in the 2B model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from transformers import Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from vlmtune.errors import ConfigError
from vlmtune.families.base import FamilyDescriptor, UpstreamNamedProcessor
from vlmtune.families.capabilities import Experimental, Supported
from vlmtune.families.tiny import overlay

if TYPE_CHECKING:
    from transformers import PretrainedConfig, ProcessorMixin

    from vlmtune.config.schema import DataConfig, VlmtuneConfig
    from vlmtune.data.records import Record


class Qwen2VLImageTextProcessor(UpstreamNamedProcessor, Qwen2VLProcessor):
    """Qwen2VLProcessor with only image_processor + tokenizer.

    Trap (transformers 5.x without torchvision): the stock class also takes a video processor; building it without
    one raises `AttributeError: ... VIDEO_PROCESSOR_MAPPING ... _extra_content`, and `AutoProcessor.from_pretrained`
    then silently returns only the tokenizer. Declaring the sub-processors this way needs no patching, and the
    saved `processor_class` stays "Qwen2VLProcessor" (see UpstreamNamedProcessor)."""

    upstream_class = "Qwen2VLProcessor"

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


# The official Qwen2-VL-Instruct template (images only; videos are not supported by vlmtune).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")
QWEN_TOKEN_ROLES = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}

TINY_IMAGE_PIXELS = 56 * 56
"""Tiny models resize every image to about 56x56 px: 4x4 patches of 14 px, 2x2 merged = 4 image tokens."""
REAL_MIN_PIXELS, REAL_MAX_PIXELS = 56 * 56, 28 * 28 * 16384  # the released checkpoints' preprocessor_config.json
MAX_ASPECT_RATIO = 200
"""transformers' `smart_resize` (every Qwen-VL image processor) raises a bare ValueError for an image whose long side
is over 200 times its short side; `record_problem` refuses such a record first, naming the image."""


class Qwen2VLFamily(FamilyDescriptor):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    default_model = "Qwen/Qwen2-VL-2B-Instruct"
    description = "Qwen2-VL 2B/7B Instruct: dynamic resolution, ChatML"

    vision_prefixes = ("model.visual",)
    projector_prefixes = ("model.visual.merger",)
    language_prefixes = ("model.language_model",)
    lm_head_names = ("lm_head",)
    language_layers_prefix = "model.language_model.layers"
    vision_layers_prefix = "model.visual.blocks"
    vision_lora_targets = ("qkv", "proj", "fc1", "fc2")

    capabilities = {
        "lora": Supported(), "qlora": Supported(), "full": Supported(),
        "adapt_vision_tower": Supported(), "train_projector": Supported(), "unfreeze_vision_tower": Supported(),
        "quantize_vision_tower": Experimental("4-bit vision blocks are untested for accuracy; keep them 16-bit"),
        "quantize_lm_head": Experimental("a 4-bit lm_head costs accuracy for little memory"),
        "flash_attention_2": Experimental("needs the flash-attn package; sdpa already runs flash kernels"),
        "fp16": Experimental("trained in bf16; fp16 activations can overflow, prefer bf16"),
        "pixel_bounds": Supported(), "multi_image": Supported(),
    }
    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    end_of_turn = "<|im_end|>"
    chat_template = CHATML_TEMPLATE
    dynamic_resolution = True
    processor_class = Qwen2VLImageTextProcessor
    patch_size: int = 14
    """Vision patch side in pixels; `merge_size` x `merge_size` patches make one image token."""
    merge_size: int = 2
    real_pixel_bounds: tuple[int, int] = (REAL_MIN_PIXELS, REAL_MAX_PIXELS)
    """(min_pixels, max_pixels) of the released checkpoints' preprocessor_config.json."""
    tiny_image_pixels: int = TINY_IMAGE_PIXELS
    image_normalization: Mapping[str, Any] = {}
    """image_mean / image_std of the released checkpoints, when not the image processor's defaults."""

    tiny_special_tokens = QWEN_SPECIAL_TOKENS
    tiny_token_roles = QWEN_TOKEN_ROLES
    tiny_extra_eos = ("<|endoftext|>",)

    tiny_numbers: Mapping[str, Any] = {
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                        # mrope_section (temporal, height, width) must sum to head_dim / 2 = 16 / 2
                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                            "mrope_section": [2, 3, 3]},
                        "tie_word_embeddings": True},
        "vision_config": {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2},
        "tie_word_embeddings": True,
    }
    architectures = {
        "2b": {"text_config": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                               "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                               "max_position_embeddings": 32768, "tie_word_embeddings": True,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                                   "mrope_section": [16, 24, 24]}},
               "vision_config": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4},
               "tie_word_embeddings": True},
        "7b": {"text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                               "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                               "max_position_embeddings": 32768, "tie_word_embeddings": False,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                                   "mrope_section": [16, 24, 24]}},
               "vision_config": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4},
               "tie_word_embeddings": False},
    }

    def _check_extra(self, config: VlmtuneConfig) -> list[str]:
        size, token = config.data.image_size, self.patch_size * self.merge_size
        if size is not None and size < token:
            return [f"data.image_size={size}: smaller than one image token ({token} px = "
                    f"{self.merge_size}x{self.merge_size} patches of {self.patch_size} px)"]
        return []

    def _configure_image_processor(self, processor: ProcessorMixin, data_cfg: DataConfig) -> None:
        """max_pixels = data.max_pixels, else data.image_size**2, else the checkpoint's; min_pixels likewise. A
        checkpoint min_pixels above the chosen max is lowered to it (the user's explicit size wins)."""
        image_processor = processor.image_processor
        size = image_processor.size
        max_pixels = data_cfg.max_pixels or (data_cfg.image_size ** 2 if data_cfg.image_size else size.longest_edge)
        min_pixels = data_cfg.min_pixels or min(size.shortest_edge, max_pixels)
        if min_pixels > max_pixels:
            raise ConfigError([f"data.min_pixels={min_pixels} is above the effective max_pixels={max_pixels} "
                               "(from data.max_pixels or data.image_size**2); lower min_pixels or raise the size"])
        # transformers 5.23 reads the bounds from `size` (shortest_edge=min, longest_edge=max pixels); passing
        # min_pixels/max_pixels per call is deprecated.
        image_processor.size = type(size)(shortest_edge=min_pixels, longest_edge=max_pixels)

    def record_problem(self, record: Record) -> str | None:
        """An image too thin for the image processor (see MAX_ASPECT_RATIO), read from its header."""
        from vlmtune.data.images import image_size

        for number, image in enumerate(record.images, 1):
            width, height = image_size(image)
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                return (f"image {number} ({image}) is {width}x{height} px: {self.name}'s image processor takes "
                        f"images whose long side is at most {MAX_ASPECT_RATIO} times the short one; crop it or pad "
                        "it towards a square")
        return super().record_problem(record)

    def image_token_count(self, height: int, width: int, processor: ProcessorMixin) -> int:
        ip = processor.image_processor
        patch, merge = ip.patch_size, ip.merge_size
        h, w = smart_resize(height, width, factor=patch * merge, min_pixels=ip.size.shortest_edge,
                            max_pixels=ip.size.longest_edge)
        return (h // patch) * (w // patch) // (merge * merge)

    def _config_dict(self, token_ids: Mapping[str, int], vocab_size: int,
                     arch: Mapping[str, Any] | None) -> dict[str, Any]:
        numbers = overlay(self.tiny_numbers, arch)
        text = overlay({"vocab_size": vocab_size}, numbers["text_config"])
        text.update(bos_token_id=token_ids["<|endoftext|>"], eos_token_id=token_ids["<|im_end|>"],
                    pad_token_id=token_ids["<|endoftext|>"])
        return {**numbers, "text_config": text,
                "image_token_id": token_ids["<|image_pad|>"], "video_token_id": token_ids["<|video_pad|>"],
                "vision_start_token_id": token_ids["<|vision_start|>"],
                "vision_end_token_id": token_ids["<|vision_end|>"]}

    def tiny_config(self, token_ids: Mapping[str, int], vocab_size: int,
                    arch: Mapping[str, Any] | None) -> PretrainedConfig:
        from transformers import Qwen2VLConfig

        numbers = self._config_dict(token_ids, vocab_size, arch)
        numbers["vision_config"] = {**numbers["vision_config"], "hidden_size": numbers["text_config"]["hidden_size"]}
        return Qwen2VLConfig(**numbers)

    def tiny_processor(self, tokenizer: Any, config: PretrainedConfig, full_size: bool) -> ProcessorMixin:
        vision = config.vision_config
        min_pixels, max_pixels = self.real_pixel_bounds if full_size else (self.tiny_image_pixels,) * 2
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=min_pixels, max_pixels=max_pixels, patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size,
            **self.image_normalization)
        return self.processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=self.chat_template)


DESCRIPTOR = Qwen2VLFamily()
