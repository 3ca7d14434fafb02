"""Llama 3.2 Vision (11B Instruct; `MllamaForConditionalGeneration`): images do not enter the token sequence. Each
image is one `<|image|>` token; the vision encoder's output (every tile, 1601 patches each, 7680 wide from the
final and four intermediate layers) is projected once and read by the language model's cross-attention layers
(every fifth layer: 3, 8, ..., 38), whose keys and values come from the images.

transformers 5.17 and 5.23 layout (same names): `model.vision_model` (local encoder `transformer.layers.N`, global
encoder `global_transformer.layers.N`: `self_attn.q/k/v/o_proj`, `mlp.fc1/fc2`; tile and aspect-ratio
embeddings), `model.multi_modal_projector` (one Linear), `model.language_model` (`layers.N.self_attn` or, in the
cross-attention layers, `layers.N.cross_attn` with the same q/k/v/o_proj names and tanh gates), `lm_head`.

Images: the image processor resizes each image onto the canvas of up to 4 tiles of 560 px (1x1, 1x2, 2x1, 2x2,
1x3, 3x1, 1x4, 4x1) that fits it best, and pads the tiles to 4; `aspect_ratio_ids` / `aspect_ratio_mask` say which
canvas and tiles are real. The model takes images per sample, pixel_values (samples, images, 4, 3, 560, 560), and
a per-token `cross_attention_mask` (samples, tokens, images, 4): token t attends to image i's real tiles from i's
`<|image|>` on (to the end, or to the next image unless images are adjacent); tokens before the first image attend
to none and their cross-attention output is zeroed. So the family declares `images_per_sample` (data processing
keeps a sample's image tensors, the collator stacks them zero-padded) and builds `cross_attention_mask` over the
whole sample after its segments are joined (`sequence_inputs`, with transformers' own mask functions): built per
segment, a later turn would not see the images of earlier ones.

Batches: samples with the same number of images batch exactly as they run alone (tested). With different counts,
the rows that may see no image (text before a sample's first image, text-only samples) differ from running alone:
transformers' cross-attention lets such a fully masked row attend uniformly to every tile of its row, the batch's
padding images included, and zeroes only that row's MLP output; the same holds for batches MllamaProcessor pads
itself. Image records with one image each (the usual VQA data) are exact.

Processor (`MllamaImageTextProcessor`): MllamaProcessor prepends `<|begin_of_text|>` to every text it is given
that lacks one, which would put a BOS into every segment data processing tokenizes; the subclass leaves texts as
they are (the chat template writes the BOS once).

Chat template: Meta's for plain conversations, without the default "Cutting Knowledge Date" system block (it
depends on whether any message has an image, so earlier turns would render differently from the whole and the
assistant spans could not be found; a system message renders as a system turn). Meta's template refuses a system
message together with images; `record_problem` says so per record.

Speed switches: the chunked loss (`lm_head`), fused LoRA, 16-bit LoRA inputs and the frozen vision encoder without
grad (`model.vision_model`) apply through the prefixes below. Packing is refused (each packed sample would need its
own image set and cross-attention rows), varlen vision attention and M-RoPE positions do not apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from transformers import MllamaProcessor, ProcessorMixin

from vlmtune.errors import ConfigError
from vlmtune.families.base import FamilyDescriptor, UpstreamNamedProcessor
from vlmtune.families.capabilities import Experimental, Supported, Unsupported
from vlmtune.families.tiny import overlay

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from vlmtune.config.schema import DataConfig
    from vlmtune.data.records import Record


class MllamaImageTextProcessor(UpstreamNamedProcessor, MllamaProcessor):
    """MllamaProcessor that does not prepend `<|begin_of_text|>` to each text (see the module docstring)."""

    upstream_class = "MllamaProcessor"

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)

    def prepare_inputs_layout(self, images: Any = None, text: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        from transformers.image_utils import make_nested_list_of_images

        images, text, *_ = ProcessorMixin.prepare_inputs_layout(self, images=images, text=text, **kwargs)
        return (make_nested_list_of_images(images) if images is not None else None), text


# Llama 3.2 Vision Instruct's template for plain conversations, less the default system block (module docstring).
MLLAMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

TINY_TILE, REAL_TILE = 28, 560
"""Tiny models: 28 px tiles of 14 px patches (4 patches + the class token per tile), up to 4 tiles per image."""
_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]

_VISION_11B = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_global_layers": 8,
               "attention_heads": 16, "image_size": REAL_TILE, "patch_size": 14, "max_num_tiles": 4,
               "vision_output_dim": 7680, "intermediate_layers_indices": [3, 7, 15, 23, 30],
               "supported_aspect_ratios": _ASPECT_RATIOS}
_ROPE_LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


_SEVERAL_PROCESSES = ("with several processes every micro-batch needs an image: on a batch without one the text model "
                      "skips its cross-attention layers, which the other processes run (ZeRO-3 gathers, DDP reduces), "
                      "so such a batch stops the run with a message; image records train (ZeRO-3 LoRA on two processes "
                      "tested)")


class MllamaFamily(FamilyDescriptor):
    name = "mllama"
    model_types = ("mllama",)
    default_model = "meta-llama/Llama-3.2-11B-Vision-Instruct"
    description = "Llama 3.2 Vision 11B Instruct: up to 4 tiles of 560 px per image, read through cross-attention"

    vision_prefixes = ("model.vision_model",)
    projector_prefixes = ("model.multi_modal_projector",)
    language_prefixes = ("model.language_model",)
    lm_head_names = ("lm_head",)
    language_layers_prefix = "model.language_model.layers"
    vision_layers_prefix = "model.vision_model.transformer.layers"
    vision_lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
    images_per_sample = True
    sequence_input_names = ("cross_attention_mask",)

    capabilities = {
        "lora": Supported("the target sets reach the self-attention and the cross-attention layers' q/k/v/o_proj"),
        "qlora": Supported(), "full": Supported(),
        "adapt_vision_tower": Supported("LoRA on the local encoder's 32 layers; the 8 global layers stay as they are"),
        "train_projector": Supported("one Linear from the 7680-wide vision output"),
        "unfreeze_vision_tower": Supported(),
        "quantize_vision_tower": Experimental("4-bit vision layers are untested for accuracy; keep them 16-bit"),
        "quantize_lm_head": Experimental("a 4-bit lm_head costs accuracy for little memory"),
        "flash_attention_2": Experimental("needs the flash-attn package; sdpa already runs flash kernels"),
        "fp16": Experimental("trained in bf16; fp16 activations can overflow, prefer bf16"),
        "pixel_bounds": Unsupported("Llama 3.2 Vision fits each image into at most 4 tiles of 560 px, not into a "
                                    "pixel budget; remove data.min_pixels / data.max_pixels"),
        "multi_image": Experimental("the model was trained with one image per prompt; several work (each turn "
                                    "cross-attends to the images before it) but answer less well"),
        "packing": Unsupported("each sample's tokens cross-attend to that sample's own images (images stacked per "
                               "sample, a cross-attention mask per row), which a packed row of several samples "
                               "cannot carry; remove speed.packing"),
        "varlen_vision_attention": Unsupported("the vision encoder attends within each 560 px tile (a fixed 1601 "
                                               "patches, no cu_seqlens); plain SDPA already runs the tiles batched"),
        "mrope_positions": Unsupported("Llama uses 1-D rotary positions; there are no M-RoPE positions to build"),
        "zero3": Experimental(_SEVERAL_PROCESSES),
    }
    image_placeholder = "<|image|>"
    end_of_turn = "<|eot_id|>"
    chat_template = MLLAMA_TEMPLATE
    dynamic_resolution = True
    processor_class = MllamaImageTextProcessor

    tiny_special_tokens = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>", "<|image|>")
    tiny_token_roles = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                        "pad_token": "<|finetune_right_pad_id|>"}
    tiny_add_bos = True
    tiny_extra_eos = ("<|end_of_text|>", "<|eom_id|>")

    tiny_numbers: Mapping[str, Any] = {
        # Three layers, the middle one cross-attention (the real model: every fifth of 40 from layer 3)
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "cross_attention_layers": [1],
                        "max_position_embeddings": 4096, "tie_word_embeddings": False},
        # Output width = hidden x (1 final + 1 intermediate layer), as the real 1280 x 6 = 7680
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_global_layers": 1, "attention_heads": 2, "image_size": TINY_TILE, "patch_size": 14,
                          "max_num_tiles": 4, "vision_output_dim": 64, "intermediate_layers_indices": [0],
                          "supported_aspect_ratios": _ASPECT_RATIOS},
    }
    architectures = {
        # meta-llama/Llama-3.2-11B-Vision-Instruct config.json numbers
        "11b": {"text_config": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 40,
                                "num_attention_heads": 32, "num_key_value_heads": 8,
                                "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "vocab_size": 128256,
                                "max_position_embeddings": 131072, "rope_parameters": _ROPE_LLAMA3,
                                "tie_word_embeddings": False},
                "vision_config": _VISION_11B},
    }

    # ---- records and sequence inputs ----
    def record_problem(self, record: Record) -> str | None:
        if record.images and any(m.role == "system" for m in record.messages):
            return (f"{self.name}: Llama 3.2 Vision's chat template refuses a system message in a conversation with "
                    "images (Meta's template raises); remove the system message or move its text into the first "
                    "user turn")
        return None

    def sequence_inputs(self, input_ids: torch.Tensor, images: Mapping[str, torch.Tensor],
                        processor: ProcessorMixin) -> dict[str, torch.Tensor]:
        """`cross_attention_mask` (tokens, images, max tiles) of the whole sample, as MllamaProcessor builds it for
        a whole text: from each `<|image|>` on, its real tiles (`aspect_ratio_mask`)."""
        import torch
        from transformers.models.mllama.processing_mllama import (
            convert_sparse_cross_attention_mask_to_dense,
            get_cross_attention_token_mask,
        )

        ranges = get_cross_attention_token_mask(input_ids.tolist(), processor.image_token_id)
        tiles = images["aspect_ratio_mask"].sum(-1).tolist() if "aspect_ratio_mask" in images else []
        dense = convert_sparse_cross_attention_mask_to_dense([ranges], [tiles],
                                                             processor.image_processor.max_image_tiles,
                                                             len(input_ids))
        return {"cross_attention_mask": torch.from_numpy(dense[0])}

    def image_features(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> Any:
        """Running the tower alone would not keep the processes in step: see `_SEVERAL_PROCESSES`."""
        from vlmtune.errors import VlmtuneError

        raise VlmtuneError(f"{self.name}: a micro-batch without images on one of several processes: "
                           f"{_SEVERAL_PROCESSES}. Give every record an image (vlmtune data check shows which have "
                           "none), or train on one process")

    # ---- processor ----
    def _configure_image_processor(self, processor: ProcessorMixin, data_cfg: DataConfig) -> None:
        tile = int(processor.image_processor.size["height"])
        problems = []
        if data_cfg.image_size is not None and data_cfg.image_size < tile:
            problems.append(f"data.image_size={data_cfg.image_size}: {self.name} fits every image into tiles of "
                            f"{tile} px, which cannot be made smaller; remove data.image_size or set it to {tile} "
                            "or more")
        if data_cfg.min_pixels is not None or data_cfg.max_pixels is not None:
            problems.append(f"data.min_pixels / data.max_pixels: {self.name} fits each image into at most "
                            f"{processor.image_processor.max_image_tiles} tiles of {tile} px, not a pixel budget; "
                            "remove them")
        if problems:
            raise ConfigError(problems)

    def image_token_count(self, height: int, width: int, processor: ProcessorMixin) -> int:
        """One: `<|image|>` stays a single token; the image reaches the model through cross-attention."""
        return 1

    # ---- tiny models ----
    def tiny_init(self, model: torch.nn.Module) -> None:
        """The cross-attention layers' tanh gates start at 0 (a fresh model ignores the images); the checkpoints'
        are trained open. Half open here, so the tiny model's text depends on its images and their gradients flow."""
        import torch

        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    param.fill_(0.5)

    def tiny_config(self, token_ids: Mapping[str, int], vocab_size: int,
                    arch: Mapping[str, Any] | None) -> PretrainedConfig:
        from transformers import MllamaConfig

        numbers = overlay(self.tiny_numbers, arch)
        text = overlay({"vocab_size": vocab_size}, numbers["text_config"])
        text.update(bos_token_id=token_ids["<|begin_of_text|>"], eos_token_id=token_ids["<|eot_id|>"],
                    pad_token_id=token_ids["<|finetune_right_pad_id|>"])
        return MllamaConfig(**{**numbers, "text_config": text}, image_token_index=token_ids["<|image|>"])

    def tiny_processor(self, tokenizer: Any, config: PretrainedConfig, full_size: bool) -> ProcessorMixin:
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        side = config.vision_config.image_size
        image_processor = MllamaImageProcessorPil(
            size={"height": side, "width": side}, max_image_tiles=config.vision_config.max_num_tiles,
            image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
        return self.processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=self.chat_template)


DESCRIPTOR = MllamaFamily()
