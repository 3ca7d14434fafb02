"""InternVL3.5 `-hf` checkpoints (e.g. OpenGVLab/InternVL3_5-8B-HF; `InternVLForConditionalGeneration`): InternViT at
448 px tiles, a pixel shuffle (2x2 patches -> one token: 256 tokens per tile) and a two-layer MLP projector, and a
Qwen3 language model.

transformers 5.17 and 5.23 layout (same names): `model.vision_tower` (`embeddings`, `encoder.layer.N.attention.
q_proj/k_proj/v_proj/projection_layer`, `mlp.fc1/fc2`, layer scales `lambda_1/2`), `model.multi_modal_projector`
(`layer_norm`, `linear_1`, `linear_2`), `model.language_model` (a Qwen3Model: `layers.N`), `lm_head` (not tied).

Tiles (GotOcr2 image processor, `crop_to_patches`): the grid of `cols x rows` tiles (1 <= cols x rows <= max_patches,
12 in the checkpoints) whose aspect ratio is closest to the image's, the image resized to it and cut, plus a
thumbnail of the whole image when there is more than one tile. The chat template writes `<IMG_CONTEXT>\\n` per
image; the processor expands `<IMG_CONTEXT>` to `<img>` + 256 x tiles `<IMG_CONTEXT>` + `</img>`, and pixel_values
are one tile per row (tiles x 3 x 448 x 448), concatenated on dim 0 like every family's. Per-image bounds:
`data.max_pixels` caps the tiles at max_pixels / 448^2 (at least 1), `data.min_pixels` raises the least tile count
likewise, `data.image_size` (a side) caps them at (image_size / 448)^2; below one tile it is refused (the tower sees
448 px tiles whatever the image).

Speed switches: the chunked loss (`lm_head`), fused LoRA, 16-bit LoRA inputs and the frozen vision tower without grad
(`model.vision_tower`) apply through the prefixes below. Packing applies: the forward hands position_ids and a missing
attention mask to the Qwen3 text model, whose mask builder then separates the packed samples (tested against unpacked
loss); tiles stay in order. Varlen vision attention and M-RoPE positions do not apply (capability map).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from transformers import InternVLProcessor

from vlmtune.errors import ConfigError
from vlmtune.families.base import FamilyDescriptor, UpstreamNamedProcessor
from vlmtune.families.capabilities import Experimental, Supported, Unsupported
from vlmtune.families.tiny import overlay

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from vlmtune.config.schema import DataConfig


class InternVLImageTextProcessor(UpstreamNamedProcessor, InternVLProcessor):
    """InternVLProcessor with only image_processor + tokenizer. Trap (transformers 5.17-5.23 without torchvision):
    the stock class also declares a video processor, which needs torchvision, and AutoProcessor then returns only
    the tokenizer."""

    upstream_class = "InternVLProcessor"

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, image_seq_length: int = 256,
                 chat_template: str | None = None, **kwargs: Any):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)


# The -hf checkpoints' template (transformers' InternVL conversion): ChatML without a default system prompt,
# `<IMG_CONTEXT>\n` per image before the message's text (videos are not supported by vlmtune).
INTERNVL_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_TILE, TINY_MAX_TILES = 32, 4
"""Tiny models: 32 px tiles of 8 px patches (4x4, pixel-shuffled to 4 tokens per tile), at most 4 tiles."""
REAL_TILE, REAL_MAX_TILES = 448, 12

_INTERNVIT_300M = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "image_size": [448, 448], "patch_size": [14, 14], "attention_bias": True, "use_qk_norm": False,
                   "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "use_mean_pooling": True}


def _qwen3(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, tied: bool) -> dict[str, Any]:
    return {"model_type": "qwen3", "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "tie_word_embeddings": tied}


class InternVLFamily(FamilyDescriptor):
    name = "internvl"
    model_types = ("internvl",)
    default_model = "OpenGVLab/InternVL3_5-8B-HF"
    description = "InternVL3.5 -hf: InternViT on 448 px tiles + thumbnail, pixel shuffle, Qwen3"

    vision_prefixes = ("model.vision_tower",)
    projector_prefixes = ("model.multi_modal_projector",)
    language_prefixes = ("model.language_model",)
    lm_head_names = ("lm_head",)
    language_layers_prefix = "model.language_model.layers"
    vision_layers_prefix = "model.vision_tower.encoder.layer"
    vision_lora_targets = ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2")

    capabilities = {
        "lora": Supported(), "qlora": Supported(), "full": Supported(),
        "adapt_vision_tower": Supported("LoRA on the InternViT layers (q/k/v_proj, projection_layer, fc1, fc2)"),
        "train_projector": Supported("the projector (LayerNorm + two Linear layers) trains fully"),
        "unfreeze_vision_tower": Supported(),
        "quantize_vision_tower": Experimental("4-bit InternViT layers are untested for accuracy; keep them 16-bit"),
        "quantize_lm_head": Experimental("a 4-bit lm_head costs accuracy for little memory"),
        "flash_attention_2": Experimental("needs the flash-attn package; sdpa already runs flash kernels"),
        "fp16": Experimental("trained in bf16; fp16 activations can overflow, prefer bf16"),
        "pixel_bounds": Supported("data.min_pixels / data.max_pixels bound the number of 448 px tiles"),
        "multi_image": Supported(),
        "packing": Supported("positions restart per sample; the Qwen3 text model separates samples from them"),
        "varlen_vision_attention": Unsupported("InternViT attends over each tile's fixed patch grid as one sequence "
                                               "(no cu_seqlens); plain SDPA already runs the tiles batched"),
        "mrope_positions": Unsupported("Qwen3 uses 1-D rotary positions; there are no M-RoPE positions to build"),
    }
    image_placeholder = "<IMG_CONTEXT>\n"
    end_of_turn = "<|im_end|>"
    chat_template = INTERNVL_TEMPLATE
    dynamic_resolution = True
    processor_class = InternVLImageTextProcessor

    tiny_special_tokens = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                           "<video>")
    tiny_token_roles = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                        "extra_special_tokens": {"start_image_token": "<img>", "end_image_token": "</img>",
                                                 "context_image_token": "<IMG_CONTEXT>",
                                                 "video_token": "<video>"}}  # type: ignore[dict-item]
    tiny_extra_eos = ("<|endoftext|>",)

    tiny_numbers: Mapping[str, Any] = {
        # Qwen3 with head_dim 32 (attention width 128 != hidden 64, as in the real model's q/k norms per head)
        "text_config": {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                        "max_position_embeddings": 4096, "tie_word_embeddings": False},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": [TINY_TILE, TINY_TILE], "patch_size": [8, 8],
                          "attention_bias": True},
        "downsample_ratio": 0.5,
        "tie_word_embeddings": False,
    }
    architectures = {
        # OpenGVLab/InternVL3_5-8B-HF: InternViT-300M-448px-V2.5 + Qwen3-8B (config.json numbers)
        "8b": {"text_config": _qwen3(4096, 12288, 36, 32, 8, tied=False), "vision_config": _INTERNVIT_300M,
               "downsample_ratio": 0.5},
    }

    # ---- processor ----
    def load_processor(self, path: Any, data_cfg: DataConfig | None = None) -> Any:
        processor = super().load_processor(path, data_cfg)
        processor.image_processor.crop_to_patches = True  # what the processor asks for per call; counted below
        return processor

    def _configure_image_processor(self, processor: Any, data_cfg: DataConfig) -> None:
        from vlmtune.memory.image_tokens import aspect_tile_bounds

        ip = processor.image_processor
        tile = _tile(ip)
        problems = []
        if data_cfg.image_size is not None and data_cfg.image_size < tile:
            problems.append(f"data.image_size={data_cfg.image_size}: {self.name} cuts images into {tile} px tiles "
                            f"seen at that size, so a smaller side cannot be met; remove it or set {tile} or more")
        least, most = aspect_tile_bounds(tile, ip.min_patches, ip.max_patches, data_cfg.image_size,
                                         data_cfg.min_pixels, data_cfg.max_pixels)
        if least > most:
            problems.append(f"data.min_pixels={data_cfg.min_pixels} asks for at least {least} tiles of {tile} px but "
                            f"data.max_pixels / data.image_size allow at most {most}; lower min_pixels or raise the "
                            "bound")
        if problems:
            raise ConfigError(problems)
        ip.min_patches, ip.max_patches = least, most

    def tiles(self, height: int, width: int, processor: Any) -> int:
        """Tiles the vision tower sees for one image: the grid's tiles plus the thumbnail, or 1 unsplit."""
        ip = processor.image_processor
        return int(ip.get_number_of_image_patches(height, width, {"crop_to_patches": True}))

    def image_token_count(self, height: int, width: int, processor: Any) -> int:
        """`<img>` + image_seq_length tokens per tile + `</img>` (what `<IMG_CONTEXT>` becomes)."""
        return 2 + processor.image_seq_length * self.tiles(height, width, processor)

    # ---- tiny models ----
    def tiny_config(self, token_ids: Mapping[str, int], vocab_size: int,
                    arch: Mapping[str, Any] | None) -> PretrainedConfig:
        from transformers import InternVLConfig

        numbers = overlay(self.tiny_numbers, arch)
        text = overlay({"vocab_size": vocab_size}, numbers["text_config"])
        text.update(bos_token_id=None, eos_token_id=token_ids["<|im_end|>"], pad_token_id=token_ids["<|endoftext|>"])
        vision = numbers["vision_config"]
        side, patch = vision["image_size"][0], vision["patch_size"][0]
        seq = int((side // patch) ** 2 * numbers["downsample_ratio"] ** 2)
        return InternVLConfig(**{**numbers, "text_config": text}, image_token_id=token_ids["<IMG_CONTEXT>"],
                              image_seq_length=seq)

    def tiny_processor(self, tokenizer: Any, config: PretrainedConfig, full_size: bool) -> Any:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        side = config.vision_config.image_size[0]
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": side, "width": side}, crop_to_patches=True, min_patches=1,
            max_patches=REAL_MAX_TILES if full_size else TINY_MAX_TILES,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        return self.processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                    image_seq_length=config.image_seq_length, chat_template=self.chat_template)


def _tile(image_processor: Any) -> int:
    size = image_processor.size
    return int(size["height"] if isinstance(size, Mapping) else size.height)


DESCRIPTOR = InternVLFamily()
