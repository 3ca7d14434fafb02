"""LLaVA-1.5 (7B / 13B): a CLIP ViT-L/14 vision tower at a fixed 336 px, a two-layer MLP projector and a
Vicuna (Llama) language model; 576 image tokens per image, `USER: ... ASSISTANT: ...</s>` conversations.

transformers 5.23 layout: `model.vision_tower` (CLIPVisionModel, flattened: `model.vision_tower.encoder.layers.N`),
`model.multi_modal_projector`, `model.language_model`, `lm_head`. The vision tower's attention layers are also
called q_proj/k_proj/v_proj, so short LoRA names must be scoped to the language model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from transformers import LlavaProcessor

from vlmtune.families.base import FamilyDescriptor
from vlmtune.families.capabilities import Experimental, Supported, Unsupported
from vlmtune.families.tiny import overlay

if TYPE_CHECKING:
    from transformers import PretrainedConfig, ProcessorMixin

    from vlmtune.config.schema import DataConfig

_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the human's questions.")

# LLaVA-1.5's training format (conv_vicuna_v1): "<s>SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: ...".
# The stock llava-hf template ends assistant turns without </s>, so a model trained with it never learns to stop;
# vlmtune always uses this one. The generation prompt ends with the space, so answers start at a word boundary.
VICUNA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '" + _SYSTEM.replace("'", "\\'") + "' %}{% set loop_messages = messages %}{% endif %}"
    "{{ system }} "
    "{% for message in loop_messages %}"
    "{{ 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>\n{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token if message['role'] == 'assistant' else ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)

_UNUSED_LAST_LAYER = ("the last CLIP layer gets no gradient (features come from layer -2); "
                      "DDP needs find_unused_parameters")

TINY_IMAGE_SIDE = 56
"""Tiny models see 56x56 px images: 4x4 patches of 14 px = 16 image tokens."""
REAL_IMAGE_SIDE = 336


class LlavaFamily(FamilyDescriptor):
    name = "llava"
    model_types = ("llava",)
    default_model = "llava-hf/llava-1.5-7b-hf"
    description = "LLaVA-1.5 7B/13B: CLIP ViT-L/14 at 336 px, MLP projector, Vicuna"

    vision_prefixes = ("model.vision_tower",)
    projector_prefixes = ("model.multi_modal_projector",)
    language_prefixes = ("model.language_model",)
    lm_head_names = ("lm_head",)
    language_layers_prefix = "model.language_model.layers"
    vision_layers_prefix = "model.vision_tower.encoder.layers"
    vision_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

    capabilities = {
        "lora": Supported(), "qlora": Supported(), "full": Supported(),
        # Features come from CLIP layer -2 (vision_feature_layer), so the last encoder layer and post_layernorm
        # never get a gradient: multi-GPU DDP training the tower needs find_unused_parameters=True.
        "adapt_vision_tower": Supported(_UNUSED_LAST_LAYER), "train_projector": Supported(),
        "unfreeze_vision_tower": Supported(_UNUSED_LAST_LAYER),
        "quantize_vision_tower": Experimental("4-bit CLIP layers are untested for accuracy; keep them 16-bit"),
        "quantize_lm_head": Experimental("a 4-bit lm_head costs accuracy for little memory"),
        "flash_attention_2": Experimental("needs the flash-attn package; sdpa already runs flash kernels"),
        "fp16": Supported(),
        "pixel_bounds": Unsupported("LLaVA-1.5 sees every image at the vision tower's fixed resolution "
                                    "(336 px); remove data.min_pixels / data.max_pixels"),
        "multi_image": Experimental("LLaVA-1.5 was trained with one image per conversation"),
    }
    image_placeholder = "<image>"
    end_of_turn = "</s>"
    chat_template = VICUNA_TEMPLATE
    dynamic_resolution = False
    processor_class = LlavaProcessor  # no video processor, so the stock class works without torchvision

    tiny_special_tokens = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
    tiny_token_roles = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    tiny_add_bos = True

    tiny_numbers: Mapping[str, Any] = {
        "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                        "rms_norm_eps": 1e-5},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": TINY_IMAGE_SIDE,
                          "patch_size": 14, "projection_dim": 32},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
    }
    _llama_7b = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096}
    _clip_l_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "image_size": REAL_IMAGE_SIDE, "patch_size": 14, "projection_dim": 768}
    architectures = {
        "7b": {"text_config": _llama_7b, "vision_config": _clip_l_336},
        "13b": {"text_config": {**_llama_7b, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                                "num_attention_heads": 40, "num_key_value_heads": 40},
                "vision_config": _clip_l_336},
    }

    def _configure_image_processor(self, processor: ProcessorMixin, data_cfg: DataConfig) -> None:
        self._check_fixed_resolution(processor.image_processor.crop_size.height, data_cfg)

    def image_token_count(self, height: int, width: int, processor: ProcessorMixin) -> int:
        crop = processor.image_processor.crop_size
        count = (crop.height // processor.patch_size) * (crop.width // processor.patch_size)
        count += processor.num_additional_image_tokens
        return count - 1 if processor.vision_feature_select_strategy == "default" else count

    def tiny_config(self, token_ids: Mapping[str, int], vocab_size: int,
                    arch: Mapping[str, Any] | None) -> PretrainedConfig:
        from transformers import LlavaConfig

        numbers = overlay(self.tiny_numbers, arch)
        text = overlay({"vocab_size": vocab_size}, numbers["text_config"])
        text.update(bos_token_id=token_ids["<s>"], eos_token_id=token_ids["</s>"], pad_token_id=token_ids["<pad>"])
        vision = numbers["vision_config"]
        return LlavaConfig(**{**numbers, "text_config": text},
                           image_token_index=token_ids["<image>"],
                           image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2)

    def tiny_processor(self, tokenizer: Any, config: PretrainedConfig, full_size: bool) -> ProcessorMixin:
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        side = config.vision_config.image_size
        # LLaVA-1.5 pads to a square with the mean colour before resizing (nothing is cropped away)
        image_processor = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": side},
                                                 crop_size={"height": side, "width": side})
        return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                              patch_size=config.vision_config.patch_size,
                              vision_feature_select_strategy=config.vision_feature_select_strategy,
                              num_additional_image_tokens=1, chat_template=self.chat_template)


DESCRIPTOR = LlavaFamily()
