"""SmolVLM2 (256M / 500M / 2.2B Instruct; Idefics3 architecture): a SigLIP vision tower that sees every image as
square tiles, a connector that pixel-shuffles each tile's patch grid (scale_factor^2 patches -> one token) and
projects it, and a SmolLM2 (Llama) language model.

transformers 5.17 and 5.23 layout (same names): `model.vision_model` (`encoder.layers.N.self_attn.q/k/v/out_proj`,
`mlp.fc1/fc2`), `model.connector` (`modality_projection.proj`, one Linear), `model.text_model` (a LlamaModel:
`model.text_model.layers.N`), `lm_head` (not tied).

Image splitting (SmolVLMImageProcessor): the image's longest edge is resized to `size.longest_edge` (small images
are enlarged), both sides are rounded up to multiples of the tile (`max_image_size.longest_edge`: 512 px for
256M/500M, 384 px for 2.2B), the image is cut into rows x cols tiles and a global image (the whole image resized to
one tile) is appended; an image that fits one tile stays one frame. Each frame costs
(tile / patch)^2 / scale_factor^2 image tokens (`image_seq_len`: 64 for 512 px tiles of 16 px patches at scale 4,
81 for 384 px tiles of 14 px at scale 3). The prompt wraps each tile in `<fake_token_around_image><row_r_col_c>`,
ends each row with a newline and puts `\n<fake_token_around_image><global-img>` + tokens +
`<fake_token_around_image>` last. `data.image_size` sets `size.longest_edge` (the resolution before tiling, so at
most (image_size / tile)^2 + 1 frames); per-image pixel bounds do not apply.

Processor (`SmolVLMImageTextProcessor`): SmolVLMProcessor declares a video processor and requires `num2words` (for
video prompts) even for images. The subclass declares only image_processor + tokenizer, saves the upstream class
name, and lays out pixel_values as one frame per row, (frames, 1, 3, tile, tile) with the matching
pixel_attention_mask, instead of (texts, most frames of a text, ...) zero-padded: frames of separately processed
segments and samples then concatenate on dim 0 like every other family's image tensors, and the model (which drops
all-zero padding frames and scatters the frames' tokens in order) reads them the same way.

Speed switches: the chunked loss (`lm_head`), fused LoRA, 16-bit LoRA inputs and the frozen vision tower without
grad (`model.vision_model`) apply through the prefixes below. Packing applies: the forward hands position_ids and a
missing attention_mask to the Llama text model, whose mask builder then separates the packed samples (tested against
unpacked loss); the frames of a row's samples stay in order. Varlen vision attention and M-RoPE positions do not
apply (capability map).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from transformers import BatchFeature, ProcessorMixin
from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor, get_image_prompt_string

from vlmtune.errors import ConfigError
from vlmtune.families.base import FamilyDescriptor, UpstreamNamedProcessor
from vlmtune.families.capabilities import Experimental, Supported, Unsupported
from vlmtune.families.tiny import overlay

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from vlmtune.config.schema import DataConfig


class SmolVLMImageTextProcessor(UpstreamNamedProcessor, SmolVLMProcessor):
    """SmolVLMProcessor with only image_processor + tokenizer and one frame per pixel_values row (see the module
    docstring). Trap (transformers 5.17-5.23): the stock class needs a video processor (which needs torchvision)
    and the `num2words` package even for images; its `apply_chat_template` reads `video_processor.num_frames`."""

    upstream_class = "SmolVLMProcessor"

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, image_seq_len: int = 169,
                 chat_template: str | None = None, **kwargs: Any):
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path: Any, processor_dict: Any = None,
                                       **kwargs: Any) -> list[Any]:
        """Trap (transformers 5.17, fixed by 5.23): its lazy imports mark SmolVLMImageProcessorPil as needing
        torchvision, so without torchvision AutoImageProcessor refuses the image processor ("None of these classes
        could be imported"); the module itself imports fine, so the PIL class is loaded from it directly."""
        try:
            return super()._get_arguments_from_pretrained(pretrained_model_name_or_path, processor_dict, **kwargs)
        except ValueError as exc:
            if "torchvision" not in str(exc):
                raise
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        subfolder = kwargs.pop("subfolder", "")
        image_processor = SmolVLMImageProcessorPil.from_pretrained(pretrained_model_name_or_path,
                                                                   subfolder=subfolder, **kwargs)
        tokenizer = cls._load_tokenizer_from_pretrained("tokenizer", pretrained_model_name_or_path,
                                                        subfolder=subfolder, **kwargs)
        return [image_processor, tokenizer]

    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> BatchFeature:
        out = super().__call__(images=images, text=text, **kwargs)
        if "pixel_values" in out:
            import torch

            pixels = torch.as_tensor(out["pixel_values"])
            masks = torch.as_tensor(out["pixel_attention_mask"])
            real = (pixels != 0).flatten(2).any(-1).flatten()  # the processor's zero padding frames
            out["pixel_values"] = pixels.flatten(0, 1)[real].unsqueeze(1)
            out["pixel_attention_mask"] = masks.flatten(0, 1)[real].unsqueeze(1)
        return out


# The SmolVLM2 Instruct template for plain conversations (no videos): "<|im_start|>" once, then per message
# "Role:" (": " before text, ":" before an image), its content, "<end_of_utterance>\n"; the generation prompt is
# "Assistant:", so an answer's first token carries its leading space (labelled, as the model generates it).
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}"
    "{% set content = [{'type': 'text', 'text': message['content']}] if message['content'] is string "
    "else message['content'] %}"
    "{{ message['role'] | capitalize }}{{ ':' if content and content[0]['type'] == 'image' else ': ' }}"
    "{% for part in content %}"
    "{% if part['type'] == 'image' %}<image>{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_ROW_COL_TOKENS = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))

TINY_TILE, TINY_LONGEST_EDGE = 32, 64
"""Tiny models: 32 px tiles of 8 px patches, 2x2 pixel shuffle = 4 tokens per frame; images are resized to a
64 px longest edge, so most become 2x2 or 2x1 tiles + the global image."""

_LLAMA = {"model_type": "llama", "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
_SIGLIP_B16_512 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "image_size": 512, "patch_size": 16}
_SIGLIP_SO400M_384 = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                      "num_attention_heads": 16, "image_size": 384, "patch_size": 14}


def _text(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    return {**_LLAMA, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": 64, "vocab_size": 49280,
            "max_position_embeddings": 8192}


def tile_grid(height: int, width: int, longest: int, tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles the processor cuts the image into; (0, 0) for one frame (one rule with the estimator)."""
    from vlmtune.memory.image_tokens import idefics3_tile_grid

    return idefics3_tile_grid(height, width, longest, tile)


class SmolVLMFamily(FamilyDescriptor):
    name = "smolvlm"
    model_types = ("smolvlm",)
    default_model = "HuggingFaceTB/SmolVLM2-2.2B-Instruct"
    description = "SmolVLM2 256M/500M/2.2B Instruct: SigLIP on image tiles + global image, pixel shuffle, SmolLM2"

    vision_prefixes = ("model.vision_model",)
    projector_prefixes = ("model.connector",)
    language_prefixes = ("model.text_model",)
    lm_head_names = ("lm_head",)
    language_layers_prefix = "model.text_model.layers"
    vision_layers_prefix = "model.vision_model.encoder.layers"
    vision_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

    capabilities = {
        "lora": Supported(), "qlora": Supported(), "full": Supported(),
        "adapt_vision_tower": Supported("LoRA on the SigLIP blocks (q/k/v/out_proj, fc1, fc2)"),
        "train_projector": Supported("the connector is one Linear after the pixel shuffle"),
        "unfreeze_vision_tower": Supported(),
        "quantize_vision_tower": Experimental("4-bit SigLIP layers are untested for accuracy; keep them 16-bit"),
        "quantize_lm_head": Experimental("a 4-bit lm_head costs accuracy for little memory"),
        "flash_attention_2": Experimental("needs the flash-attn package; sdpa already runs flash kernels"),
        "fp16": Experimental("trained in bf16; fp16 activations can overflow, prefer bf16"),
        "pixel_bounds": Unsupported("SmolVLM sizes images by their longest edge (data.image_size, then cut into "
                                    "tiles), not by pixel count; remove data.min_pixels / data.max_pixels"),
        "multi_image": Supported(),
        "packing": Supported("positions restart per sample; the text model separates samples from them"),
        "varlen_vision_attention": Unsupported("SigLIP attends over each tile's fixed patch grid as one sequence "
                                               "(no cu_seqlens); plain SDPA already runs the tiles batched"),
        "mrope_positions": Unsupported("SmolLM2 uses 1-D rotary positions; there are no M-RoPE positions to build"),
    }
    image_placeholder = "<image>"
    end_of_turn = "<end_of_utterance>"
    chat_template = SMOLVLM_TEMPLATE
    dynamic_resolution = True
    processor_class = SmolVLMImageTextProcessor

    tiny_special_tokens = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>",
                           "<fake_token_around_image>", "<image>", "<global-img>", *_ROW_COL_TOKENS)
    tiny_token_roles = {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>",
                        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}

    tiny_numbers: Mapping[str, Any] = {
        "text_config": {**_LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": TINY_TILE, "patch_size": 8},
        "scale_factor": 2,
        "tie_word_embeddings": False,
    }
    architectures = {
        # HuggingFaceTB/SmolVLM2-256M-Video-Instruct, -500M-Video-Instruct, -2.2B-Instruct config.json numbers
        "256m": {"text_config": _text(576, 1536, 30, 9, 3), "vision_config": _SIGLIP_B16_512, "scale_factor": 4},
        "500m": {"text_config": _text(960, 2560, 32, 15, 5), "vision_config": _SIGLIP_B16_512, "scale_factor": 4},
        "2.2b": {"text_config": {**_text(2048, 8192, 24, 32, 32), "rope_parameters": {
                     "rope_type": "default", "rope_theta": 130000.0}},
                 "vision_config": _SIGLIP_SO400M_384, "scale_factor": 3},
    }
    real_tiles_per_side = 4
    """The released processors resize the longest edge to 4 tiles (2048 px for 512 px tiles, 1536 px for 384)."""

    # ---- processor ----
    def _configure_image_processor(self, processor: ProcessorMixin, data_cfg: DataConfig) -> None:
        if data_cfg.min_pixels is not None or data_cfg.max_pixels is not None:
            raise ConfigError([f"data.min_pixels / data.max_pixels: {self.name} sizes images by their longest edge "
                               "(data.image_size), not by pixel count; remove them"])
        if data_cfg.image_size is not None:
            size = processor.image_processor.size
            processor.image_processor.size = type(size)(longest_edge=data_cfg.image_size)

    def image_token_count(self, height: int, width: int, processor: ProcessorMixin) -> int:
        """All tokens the `<image>` placeholder becomes (what data processing and `count_tokens` need): the image
        tokens (`frames(...)` x `image_seq_len`), the tile markers (`<fake_token_around_image>`, `<row_r_col_c>`,
        `<global-img>`) and the newlines, tokenized as the processor writes them (a tokenizer may merge "\n\n")."""
        rows, cols = self._grid(height, width, processor)
        text = get_image_prompt_string(rows, cols, processor.image_seq_len, processor.fake_image_token,
                                       processor.image_token, processor.global_image_token)
        return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def frames(self, height: int, width: int, processor: ProcessorMixin) -> int:
        """Frames the vision tower sees for one image: rows x cols tiles + the global image, or 1 unsplit."""
        rows, cols = self._grid(height, width, processor)
        return rows * cols + 1 if rows else 1

    @staticmethod
    def _grid(height: int, width: int, processor: ProcessorMixin) -> tuple[int, int]:
        ip = processor.image_processor
        if not ip.do_image_splitting:
            return 0, 0
        return tile_grid(height, width, _size_value(ip.size), _size_value(ip.max_image_size))

    # ---- tiny models ----
    def tiny_config(self, token_ids: Mapping[str, int], vocab_size: int,
                    arch: Mapping[str, Any] | None) -> PretrainedConfig:
        from transformers import SmolVLMConfig

        numbers = overlay(self.tiny_numbers, arch)
        text = overlay({"vocab_size": vocab_size}, numbers["text_config"])
        text.update(bos_token_id=token_ids["<|im_start|>"], eos_token_id=token_ids["<end_of_utterance>"],
                    pad_token_id=token_ids["<|im_end|>"])
        return SmolVLMConfig(**{**numbers, "text_config": text}, image_token_id=token_ids["<image>"],
                             pad_token_id=token_ids["<|im_end|>"])

    def tiny_processor(self, tokenizer: Any, config: PretrainedConfig, full_size: bool) -> ProcessorMixin:
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        vision = config.vision_config
        tile = vision.image_size
        longest = tile * self.real_tiles_per_side if full_size else TINY_LONGEST_EDGE
        image_processor = SmolVLMImageProcessorPil(
            size={"longest_edge": longest}, max_image_size={"longest_edge": tile}, do_image_splitting=True,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        seq_len = (tile // vision.patch_size) ** 2 // config.scale_factor ** 2
        return self.processor_class(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len,
                                    chat_template=self.chat_template)


def _size_value(size: Any) -> int:
    return int(size["longest_edge"] if isinstance(size, Mapping) else size.longest_edge)


DESCRIPTOR = SmolVLMFamily()
