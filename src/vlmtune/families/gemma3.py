"""Gemma 3 (4B / 12B / 27B instruction-tuned): a SigLIP vision tower at a fixed 896 px, a projector that average-pools
its 64x64 patches to 16x16 = 256 soft tokens per image (RMSNorm + one projection matrix), and the Gemma 3 language
model (5 sliding-window layers per global one, q/k RMSNorm, tied lm_head, no final logit soft-capping).

transformers 5.17 and 5.23 layout (same names in both): `model.vision_tower` (SiglipVisionTransformer, flattened:
`model.vision_tower.encoder.layers.N.self_attn.q_proj/k_proj/v_proj/out_proj`, `mlp.fc1/fc2`),
`model.multi_modal_projector` (`mm_input_projection_weight`, a bare parameter, and `mm_soft_emb_norm`),
`model.language_model` (Gemma3TextModel: `layers.N`), `lm_head` (tied to the embeddings).

Image tokens: the chat template writes `<start_of_image>` per image; the processor expands it to
`\\n\\n<start_of_image>` + 256 x `<image_soft_token>` + `<end_of_image>\\n\\n` and returns `token_type_ids` (1 on the
soft tokens). The model makes each image's soft tokens attend to each other bidirectionally from `token_type_ids`
(both versions: `get_block_sequence_ids_for_mask`); without them the mask is causal. Data processing keeps
`token_type_ids` per token and the collator pads them with 0, so training sees the bidirectional mask; `predict`
passes the processor's output to `generate`, which does the same for the prompt.

Pan-and-scan (extra 896 px crops of wide or tall images, each another 256 tokens plus a sentence of text) is off, as
in the checkpoints' processor config: vlmtune has no data setting for it and its token count depends on the crops, so
`load_processor` keeps `do_pan_and_scan` off whatever a saved processor says (a stated decline, see README).

Speed switches: the chunked loss applies (Gemma 3's `final_logit_softcapping` is None; `install_chunked_loss` declines
any model that soft-caps), fused LoRA, 16-bit LoRA inputs and the frozen vision tower without grad apply through the
prefixes below; padding-free packing applies with masks this module builds (below); varlen vision attention and
M-RoPE positions do not apply (capability map).

Packing (`packed_row_attention = "family_mask"`): a packed row's samples cannot be kept apart by causal attention per
sample (vlmtune's span attention drops the image blocks' bidirectional attention), nor by the mask transformers 5.23
builds for a packed row (positions restarting per sample, no attention_mask): its full-attention mask is right, but
in the sliding-window layers the image-block overlay is passed as `or_mask_function`, which `create_causal_mask`
composes before `packed_sequence_compatibility_function`, so the block ids are looked up at each sample's positions
instead of the row's indices and every sample gets the first sample's image layout (measured on the tiny model,
fp32, against the same samples padded: logits off by up to 0.22-0.34; tests/families/test_gemma3.py pins it). So
`packed_attention_masks` builds both masks from the row's `position_ids` and `token_type_ids`, on row indices, as
transformers builds them for one unpacked sample (`create_masks_for_vision_model`): full = same sample AND (causal OR
same image block); sliding = full AND (q - k < sliding_window) (`sliding_window_overlay`; the image-block OR lies
inside the window there, as unpacked). The packed logits equal the padded ones to 3e-7 (tests/speed/test_packing.py).
Cost: the masks are dense, rows x length^2 booleans for each of the two mask types (a 16k-token row: 2 x 256 MiB,
and a few such temporaries while they are built on the GPU each forward); SDPA with a mask runs no flash kernel: keep
speed.packing_max_tokens to a few thousand tokens (about 4-8k).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from transformers import Gemma3Processor

from vlmtune.families.base import FamilyDescriptor, UpstreamNamedProcessor
from vlmtune.families.capabilities import Experimental, Supported, Unsupported
from vlmtune.families.tiny import overlay

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, ProcessorMixin

    from vlmtune.config.schema import DataConfig
    from vlmtune.data.records import Record


class Gemma3ImageTextProcessor(UpstreamNamedProcessor, Gemma3Processor):
    """Gemma3Processor whose `image_token_id` is the soft image token the model replaces with image features (the
    stock class sets it to `<start_of_image>`'s id, the text placeholder): data processing finds an image's span by
    it and never labels it. `image_token` stays `<start_of_image>`, the text the chat template writes per image."""

    upstream_class = "Gemma3Processor"

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 image_seq_length: int = 256, **kwargs: Any):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                         image_seq_length=image_seq_length, **kwargs)
        self.image_token_id = tokenizer.image_token_id


# gemma-3-*-it's template for plain conversations: <bos>, a system message folded into the first user turn (its text
# and a blank line), `<start_of_turn>user|model\n ... <end_of_turn>\n`, texts trimmed, `<start_of_image>` per image.
# The official one takes only a system message's first text part; this one joins its text parts.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = (messages[0]['content'] if messages[0]['content'] is string else messages[0]['content']"
    " | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ first_user_prefix if loop.first else '' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] | trim }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

TINY_IMAGE_SIDE = 56
"""Tiny models see 56x56 px images: 4x4 patches of 14 px, pooled 2x2 to 4 soft tokens per image."""
REAL_IMAGE_SIDE = 896

_PACKING = ("vlmtune builds each packed row's full and sliding-window masks (image tokens bidirectional within their "
            "image, each sample apart): dense rows x length^2 booleans per mask type, and SDPA with a mask runs no "
            "flash kernel; keep speed.packing_max_tokens to a few thousand tokens")

_SIGLIP_896 = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
               "image_size": REAL_IMAGE_SIDE, "patch_size": 14, "vision_use_head": False}


_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}


def _text(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int,
          query_scalar: int) -> dict[str, Any]:
    return {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "query_pre_attn_scalar": query_scalar, "vocab_size": 262208, "sliding_window": 1024,
            "max_position_embeddings": 131072, "layer_types": None,  # None: 5 sliding, 1 global, repeated
            "final_logit_softcapping": None, "attn_logit_softcapping": None, "rope_parameters": _ROPE}


class Gemma3Family(FamilyDescriptor):
    name = "gemma3"
    model_types = ("gemma3",)
    default_model = "google/gemma-3-12b-it"
    description = ("Gemma 3 4B/12B/27B it: SigLIP at 896 px (256 tokens per image, attending bidirectionally), "
                   "sliding-window Gemma 3")

    vision_prefixes = ("model.vision_tower",)
    projector_prefixes = ("model.multi_modal_projector",)
    language_prefixes = ("model.language_model",)
    lm_head_names = ("lm_head",)
    language_layers_prefix = "model.language_model.layers"
    vision_layers_prefix = "model.vision_tower.encoder.layers"
    vision_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    packed_row_attention = "family_mask"
    packed_mask_module = "model"
    language_attention_masked = True  # the image blocks' bidirectional mask, on every batch

    capabilities = {
        "lora": Supported(), "qlora": Supported(), "full": Supported(),
        "adapt_vision_tower": Supported("LoRA on the SigLIP blocks (q/k/v/out_proj, fc1, fc2)"),
        "train_projector": Supported("the projector's RMSNorm and projection matrix train fully"),
        "unfreeze_vision_tower": Supported(),
        "quantize_vision_tower": Experimental("4-bit SigLIP layers are untested for accuracy; keep them 16-bit"),
        "quantize_lm_head": Experimental("the lm_head is tied to the 262k-token embeddings; a 4-bit copy costs "
                                         "accuracy for little memory"),
        "flash_attention_2": Unsupported("the bidirectional image-token mask needs a mask-taking attention "
                                         "(sdpa or eager); flash_attention_2 would make it causal"),
        "fp16": Experimental("Gemma models were trained in bf16; fp16 activations can overflow, prefer bf16"),
        "pixel_bounds": Unsupported("Gemma 3 sees every image at SigLIP's fixed resolution (896 px); remove "
                                    "data.min_pixels / data.max_pixels"),
        "multi_image": Supported("each image is its own 256-token block; blocks attend causally to earlier ones"),
        "packing": Supported(_PACKING),
        "varlen_vision_attention": Unsupported("SigLIP attends over each image's 4096 patches as one fixed-size "
                                               "sequence (no cu_seqlens); plain SDPA already runs it batched"),
        "mrope_positions": Unsupported("Gemma 3 uses 1-D rotary positions; there are no M-RoPE positions to build"),
    }
    image_placeholder = "<start_of_image>"
    end_of_turn = "<end_of_turn>"
    chat_template = GEMMA3_TEMPLATE
    dynamic_resolution = False
    processor_class = Gemma3ImageTextProcessor

    # The checkpoint's tokenizer (ids 0-3 and the turn / image tokens of the real vocabulary, in the same order)
    tiny_special_tokens = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                           "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    tiny_token_roles = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
                        "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                 "image_token": "<image_soft_token>"}}  # type: ignore[dict-item]
    tiny_add_bos = True
    tiny_extra_eos = ("<end_of_turn>",)

    tiny_numbers: Mapping[str, Any] = {
        # One sliding-window layer (window 16, shorter than a tiny sample) and one global layer, as the real
        # 5:1 pattern alternates them; head_dim 32 with 4 heads (attention width 128, hidden 64).
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                        "query_pre_attn_scalar": 32, "sliding_window": 16,
                        "layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 4096,
                        "final_logit_softcapping": None, "attn_logit_softcapping": None},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": TINY_IMAGE_SIDE, "patch_size": 14,
                          "vision_use_head": False},
        "mm_tokens_per_image": 4,
    }
    architectures = {
        # google/gemma-3-{4b,12b,27b}-it config.json numbers
        "4b": {"text_config": _text(2560, 10240, 34, 8, 4, 256, 256), "vision_config": _SIGLIP_896,
               "mm_tokens_per_image": 256},
        "12b": {"text_config": _text(3840, 15360, 48, 16, 8, 256, 256), "vision_config": _SIGLIP_896,
                "mm_tokens_per_image": 256},
        "27b": {"text_config": _text(5376, 21504, 62, 32, 16, 128, 168), "vision_config": _SIGLIP_896,
                "mm_tokens_per_image": 256},
    }

    # ---- records ----
    def record_problem(self, record: Record) -> str | None:
        roles = [m.role for m in record.messages]
        body = roles[1:] if roles[:1] == ["system"] else roles
        expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(body))]
        if body != expected:
            return (f"{self.name}'s chat template takes an optional system message first, then user and assistant "
                    f"turns alternating from a user turn; this record has {' -> '.join(roles)}. Merge consecutive "
                    "messages of one role")
        return None

    # ---- packed rows ----
    def packed_attention_masks(self, inputs: Mapping[str, Any], text_config: Any) -> dict[str, torch.Tensor] | None:
        """Gemma3Model's masks for a packed batch (see the module docstring): samples found where the positions do
        not go up by one, image blocks where `token_type_ids` turns 1, all on row indices."""
        import torch

        positions = inputs.get("position_ids")
        if positions is None:
            return None
        types = inputs.get("token_type_ids")
        image = torch.zeros_like(positions, dtype=torch.bool) if types is None else types == 1
        new_sample = torch.ones_like(image)
        new_sample[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
        sample = new_sample.cumsum(-1)
        starts = image.clone()
        starts[:, 1:] &= ~image[:, :-1]
        block = torch.where(image, starts.cumsum(-1), 0)  # 0: text; image blocks numbered from 1 along the row
        index = torch.arange(positions.shape[-1], device=positions.device)
        causal = index[None, :] <= index[:, None]
        same_block = (block[:, :, None] == block[:, None, :]) & image[:, :, None]
        full = (sample[:, :, None] == sample[:, None, :]) & (causal | same_block)
        masks = {"full_attention": full[:, None]}
        if "sliding_attention" in text_config.layer_types:
            window = index[None, :] > index[:, None] - text_config.sliding_window
            masks["sliding_attention"] = (full & window)[:, None]
        return masks

    # ---- processor ----
    def load_processor(self, path: Any, data_cfg: DataConfig | None = None) -> ProcessorMixin:
        processor = super().load_processor(path, data_cfg)
        processor.image_processor.do_pan_and_scan = False  # see the module docstring
        return processor

    def _configure_image_processor(self, processor: ProcessorMixin, data_cfg: DataConfig) -> None:
        self._check_fixed_resolution(processor.image_processor.size["height"], data_cfg)

    def image_token_count(self, height: int, width: int, processor: ProcessorMixin) -> int:
        """Tokens one image stands for where the template puts it after a newline (`<start_of_turn>user\\n`):
        the expanded sequence tokenized in that context, less the newline (Gemma's tokenizer merges the newline
        with the sequence's leading blank line)."""
        tokenizer = processor.tokenizer
        ids = tokenizer("\n" + processor.full_image_sequence, add_special_tokens=False)["input_ids"]
        return len(ids) - len(tokenizer("\n", add_special_tokens=False)["input_ids"])

    # ---- tiny models ----
    def tiny_config(self, token_ids: Mapping[str, int], vocab_size: int,
                    arch: Mapping[str, Any] | None) -> PretrainedConfig:
        from transformers import Gemma3Config

        numbers = overlay(self.tiny_numbers, arch)
        text = overlay({"vocab_size": vocab_size}, numbers["text_config"])
        text.update(model_type="gemma3_text", bos_token_id=token_ids["<bos>"], eos_token_id=token_ids["<eos>"],
                    pad_token_id=token_ids["<pad>"])
        vision = {**numbers["vision_config"], "model_type": "siglip_vision_model"}
        return Gemma3Config(**{**numbers, "text_config": text, "vision_config": vision},
                            boi_token_index=token_ids["<start_of_image>"],
                            eoi_token_index=token_ids["<end_of_image>"],
                            image_token_index=token_ids["<image_soft_token>"])

    def tiny_processor(self, tokenizer: Any, config: PretrainedConfig, full_size: bool) -> ProcessorMixin:
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        side = config.vision_config.image_size
        image_processor = Gemma3ImageProcessorPil(
            size={"height": side, "width": side}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
            do_pan_and_scan=False)
        return self.processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                    image_seq_length=config.mm_tokens_per_image, chat_template=self.chat_template)


DESCRIPTOR = Gemma3Family()
