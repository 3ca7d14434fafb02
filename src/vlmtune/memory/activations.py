"""Activation memory of one micro-batch: what the language model and the vision tower keep for backward.

Per decoder layer and token, measured in HF transformers with SDPA (memory_anchors.md §6.2-6.3; h hidden, q query
width, kv key/value width, i MLP width; bytes):
- full fine-tuning (bf16): 20h + 4kv + 8i
- LoRA with PEFT's fp32 adapters on all seven linears: 28h + 8q + 4kv + 10i; the LoRA part (8h + 8q + 2i) is scaled
  by the share of targeted linear inputs for smaller target sets; lora_dropout > 0 adds 6h + i (plain path, no
  autocast); under vlmtune's 16-bit autocast: 20h + 4kv + 8i + 2 bytes per adapted linear's input (LORA_AUTOCAST_BYTES)
- with gradient checkpointing only the layer input is kept (2h bytes in bf16), plus one layer's activations while it
  is recomputed in backward.
Vision tower: with checkpointing HF hooks it into autograd even when frozen, so each block keeps its input
(2 bytes x patches x width); without checkpointing a frozen tower keeps nothing and a trained one about 53 bytes per
patch per unit width per block (fitted on one run, approximate). vlmtune's speed.frozen_vision_no_grad runs a
frozen tower without grad: it keeps nothing in either case. speed.checkpoint_every_n_layers keeps the other
layers' activations in full; speed.checkpoint_offload moves the checkpointed inputs to CPU memory (not measured).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmtune.memory.catalogue import ModelSpec
from vlmtune.memory.image_tokens import image_cost, tile_wrapper_tokens
from vlmtune.memory.inputs import EstimateInputs
from vlmtune.memory.params import ParamCounts, target_input_widths

TRAINED_VIT_BYTES = 53
LORA_AUTOCAST_BYTES = 2
"""Under 16-bit autocast (vlmtune's Trainer) each adapted linear keeps one 16-bit copy of its input for lora_A's
weight gradient: the dropout output (or, without dropout, autocast's re-cast of PEFT's fp32 input copy). Whether
PEFT hands the adapter an fp32 copy (speed.lora_bf16_compute off) or the 16-bit input does not change what is saved:
autocast casts it back to 16-bit before lora_A, and the fp32 copy is never saved (W1x: 16.69 GiB allocated either
way, within 10 MiB). Counted on top of the full fine-tuning layer: the frozen base linears save no input of their own
(autograd keeps an input only for a gradient it computes), the dropout masks (1 byte per element) are saved; the two
nearly cancel, and 2 bytes per adapted input element on top of 20h + 4kv + 8i matches the no-checkpointing LoRA
runs of Qwen2-VL-2B and Qwen2.5-VL-7B within 1% per layer (counting masks and base inputs separately gives 30h + 4kv
+ 9i for Qwen2-VL, 7% under them: something of about 2h + i per token per layer is kept that this count misses)."""


@dataclass(frozen=True)
class ActivationTerms:
    seq_len: int
    image_tokens: int
    """Image tokens (wrappers included) in one sample."""
    vit_patches: int
    """Vision-tower patches in the micro-batch."""
    language_saved: int
    vision_saved: int
    layer_working: int
    """One decoder layer's activations while it is recomputed (gradient checkpointing only)."""
    dequant: int
    """QLoRA: the 16-bit copies of the largest decoder linear layer's weight alive in a layer's backward."""
    head_dequant: int
    """QLoRA with a 4-bit lm_head: its 16-bit copy, alive while the (chunked) loss runs, not in the layers' backward."""
    """QLoRA: 16-bit copies of the largest quantized weight during its matmuls."""
    pixel_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def saved(self) -> int:
        return self.language_saved + self.vision_saved


def per_token_layer_bytes(
    inputs: EstimateInputs, counts: ParamCounts, targets: list[str], bf16_adapters: bool
) -> int:
    """Bytes one decoder layer keeps per token without checkpointing (bf16 residual stream)."""
    d = counts.dims
    h, q, kv, i = d.hidden, d.q_width, d.kv_width, d.intermediate
    out = 20 * h + 4 * kv + 8 * i
    if inputs.method in ("lora", "qlora"):
        chosen, every = target_input_widths(counts, targets)
        if inputs.autocast:
            keeps_copy = inputs.lora_dropout > 0 or not (bf16_adapters or inputs.lora_16bit_inputs)
            out += LORA_AUTOCAST_BYTES * chosen if keeps_copy else 0
        else:  # the plain path: the 16-bit model run without autocast, fp32 adapters (memory_anchors.md §6.2)
            adapter = 0 if bf16_adapters or inputs.lora_16bit_inputs else 8 * h + 8 * q + 2 * i
            dropout = 6 * h + i if inputs.lora_dropout > 0 else 0
            out += int((adapter + dropout) * chosen / every)
    if inputs.attn_implementation == "eager":
        out += (
            4 * d.heads * inputs.seq_len
        )  # bf16 scores and probabilities, S per token per head (not measured)
    return out


def image_tokens_and_patches(inputs: EstimateInputs, spec: ModelSpec) -> tuple[int, int]:
    """Language-model tokens (markup included) and vision-tower patches of one image of `inputs.image_hw`."""
    if not inputs.images_per_sample:
        return 0, 0
    rule = spec.image
    h, w = inputs.image_hw
    cost = image_cost(rule, h, w, inputs.image_size, inputs.min_pixels, inputs.max_pixels)
    tokens = cost.llm_tokens + spec.arch.chat.get("tokens_per_image", 0) + tile_wrapper_tokens(rule, cost)
    return tokens, cost.vit_patches


def sample_image_tokens(inputs: EstimateInputs) -> int:
    """The language-model tokens the images of one sample take (`image_tokens_per_sample` when measured)."""
    from vlmtune.memory.catalogue import lookup_model

    if inputs.image_tokens_per_sample is not None:
        return inputs.image_tokens_per_sample
    return image_tokens_and_patches(inputs, lookup_model(inputs.model))[0] * inputs.images_per_sample


def activation_terms(
    inputs: EstimateInputs,
    spec: ModelSpec,
    counts: ParamCounts,
    act_bytes: int,
    targets: list[str],
    bf16_adapters: bool,
) -> ActivationTerms:
    d = counts.dims
    notes: list[str] = []
    rule = spec.image
    per_image_tokens, per_image_patches = image_tokens_and_patches(inputs, spec)
    image_tokens = inputs.image_tokens_per_sample
    if image_tokens is None:
        image_tokens = per_image_tokens * inputs.images_per_sample
    b, s = inputs.batch_size, inputs.seq_len
    if image_tokens >= s:
        notes.append(
            f"the images alone take {image_tokens} tokens, more than seq_len {s}: such samples are dropped "
            "or cut by the engine; lower max_pixels / image_size or raise data.max_length"
        )
    patches = inputs.vit_patches_per_batch
    if patches is None:
        patches = b * inputs.images_per_sample * per_image_patches
    scale = act_bytes / 2
    per_layer = int(per_token_layer_bytes(inputs, counts, targets, bf16_adapters) * scale)
    trained_vit = (inputs.method == "full" and not inputs.freeze_vision_tower) or inputs.adapt_vision_tower
    if inputs.gradient_checkpointing:
        every = max(1, inputs.checkpoint_every)
        checkpointed = -(-d.layers // every)
        whole = d.layers - checkpointed  # layers that keep all their activations
        kept = 0 if inputs.checkpoint_offload else checkpointed * act_bytes * b * s * d.hidden
        language = kept + whole * per_layer * b * s
        # the recomputed layer's activations, plus the gradients alive in its backward: the residual stream's
        # (in and out) and, in the MLP, the gradient of one intermediate-width tensor beside its saved inputs
        working = per_layer * b * s + act_bytes * b * s * (2 * d.hidden + d.intermediate)
        vision = 0 if inputs.vision_no_grad and not trained_vit else (
            d.vision_depth * act_bytes * patches * d.vision_width)
    else:
        whole = d.layers
        language = whole * per_layer * b * s
        working = 0
        vision = TRAINED_VIT_BYTES * d.vision_width * patches * d.vision_depth if trained_vit else 0
    dequant = head_dequant = 0
    if inputs.method == "qlora":
        largest = max(
            (lin.in_features * lin.out_features for lin in counts.linears if lin.part == "language" and lin.count == 1),
            default=0,
        )
        dequant = 2 * 2 * largest
        if inputs.quantize_lm_head and not counts.tied:  # the chunked loss calls the 4-bit head: one 16-bit copy
            head_dequant = 2 * d.vocab * d.hidden
    if inputs.packing and spec.arch.packed_row_masks:
        # the family's boolean masks live through forward and backward (the recomputation reads them); SDPA turns a
        # boolean mask into a 16-bit bias per call, which its backward keeps for every layer it did not recompute
        masks = spec.arch.packed_row_masks * b * s * s
        bias = 2 * b * s * s
        language += masks + whole * bias
        working += bias if inputs.gradient_checkpointing else 0
        notes.append(
            f"packed rows: {spec.arch.packed_row_masks} dense masks of {b} x {s}^2 booleans ({masks / 2**30:.2f} GiB) "
            "and a 16-bit copy per attention call (not measured on a GPU)"
        )
    patch = rule.get("patch_size", 14)
    pixel_values = patches * 3 * patch * patch * rule.get("temporal_patch_size", 1)
    return ActivationTerms(
        seq_len=s,
        image_tokens=image_tokens,
        vit_patches=patches,
        language_saved=language,
        vision_saved=vision,
        layer_working=working,
        dequant=dequant,
        head_dequant=head_dequant,
        pixel_bytes=pixel_values * 6,
        notes=notes,
    )
