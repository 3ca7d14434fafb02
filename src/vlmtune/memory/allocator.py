"""The caching allocator's overhead: what `max_memory_reserved` holds above `max_memory_allocated` at the peak.

PyTorch's allocator never gives a segment back during training and serves a request only from one cached block at
least as large, so what it reserves depends on the sizes and lifetimes of the big tensors each method creates, not
only on the peak. Modelled from those where the measured runs showed how (checkpointed full fine-tuning, DeepSpeed's
step, HF's loss on padded batches), fitted constants elsewhere (each says on what).

With expandable segments (hardware.expandable_segments, on by default in training) the allocator maps one growing
virtual range per stream instead of a segment per request size: freed neighbours coalesce, so a block any later
request needs can come out of the space several smaller tensors left, and free pages inside the range are unmapped
when an allocation would otherwise fail. What the fitted terms and the full fine-tuning reserve model is the
fragmentation this removes, so they give way to FRAG_EXPANDABLE + FRAG_EXPANDABLE_ALLOC x the peak (see
allocator_overhead).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmtune.memory.gpus import MIB
from vlmtune.memory.inputs import EstimateInputs

FRAG_BASE = 384 * MIB
FRAG_LOGITS = 0.7
"""Fragmentation = FRAG_BASE + FRAG_LOGITS x (the 4·B·S·V fp32 cross-entropy blocks) + FRAG_STATES x (16-bit
param-sized tensors live at the peak) + FRAG_FOREACH x (optimizer-step temporaries); fitted on the anchors."""
FRAG_STATES = 0.10
FRAG_VISION = 88
"""A vision tower run without grad leaves its transient blocks in the allocator's cache: bytes per patch per unit of
tower width, fitted on 14 checkpointed runs of vlmtune's calibration (1k-16k patches per micro-batch)."""
FRAG_FOREACH = 0.5
FRAG_EXPANDABLE = 144 * MIB
FRAG_EXPANDABLE_ALLOC = 0.012
"""Reserved minus allocated at the peak with expandable segments: FRAG_EXPANDABLE + FRAG_EXPANDABLE_ALLOC x the
estimated peak allocated bytes. Fitted on vlmtune's 20 single-process runs with them, one H100 capped to 8-80 GB
cards (benchmarks/results/2026-12-07-session13: the 19 `vlmtune recommend` configs without DeepSpeed for Qwen2-VL-2B,
Qwen2.5-VL-7B, LLaVA-1.5-7B and -13B, LoRA and QLoRA, 5-67 GiB allocated, and the speed harness's W2u lean QLoRA;
tests/memory/data/vlmtune_points.jsonl `s13-*`), by least squares of the relative error of the whole estimate
(nvidia-smi level), then rounded: errors -3.5...+3.7% (mean |error| 1.5%; 1.9% with the earlier 160 MiB constant,
-4.3...+2.6%; the README of that folder has the table).
What they measured there, 0.10-1.59 GiB, grows with the peak (Qwen2-VL-2B LoRA: 0.12 GiB at 5.3 GiB allocated, 0.57
at 19.8, 1.59 at 68.0). Fitted on that alone, the form is 256 MiB + 0.019 x allocated (residuals -0.38...+0.32 GiB,
rms 0.19; a constant alone: rms 0.39; a fraction of the transient working set instead of the whole peak: rms 0.22; a
QLoRA term: only 0.03 GiB better), but the whole estimate then errs by -2.3...+5.8% (LLaVA-1.5-7B QLoRA at 8 GB
+5.8%): the estimate's allocated is high by 0.2-0.36 GiB in the QLoRA runs and by 1.8-2.0 GiB in the two 7B LoRA
runs at 80 GB (4,089 tokens, batch 1, peak in forward), and a term fitted on the allocator alone adds to that. So this
one under-states the allocator's own overhead by 0.23 GiB on average (residuals -0.11...+0.66 GiB, rms 0.32; the
largest, +0.66, in the QLoRA runs at 16-24 GB) to keep the sum right; refit on the allocator alone once allocated is
fixed there. Against the two runs of another tool that the first constant (160 MiB) was fitted on (Unsloth, which sets
expandable segments at import; W1: 0.11 GiB at 4.94 allocated, W3: 0.19 at 17.11; benchmarks/RESULTS.md, 2026-12-07,
issue 21) it gives 0.20 and 0.35 GiB. Full fine-tuning with expandable segments is not yet measured."""
LOSS_RESHAPE_SETS = 3
"""HF's loss on micro-batches of several samples (vlmtune's engine pads each batch to its longest sample, so the
padded length changes from step to step by more than the allocator's 2 MiB rounding of these blocks): a step whose
logits blocks do not fit the cached ones of the last step allocates a new set, and the old set stays cached. The set
is the loss's 16-bit logits, fp32 upcast, log-softmax and 16-bit gradient, 12·B·S·V bytes = 3 x the fp32 block.
Measured: reserved - allocated 7.0-7.2 GiB at B = 4, S = 770 (W1x with speed.chunked_loss=false; 16·B·S·V =
7.0 GiB); the fixed-shape plain-path anchors (no autocast, identical samples) do not show it."""


@dataclass(frozen=True)
class Phase:
    """Allocated bytes above the static states at one phase of a step, by kind."""

    grads: int
    vision: int
    language: int
    logits: int
    transient: int

    @property
    def total(self) -> int:
        return self.grads + self.vision + self.language + self.logits + self.transient


def allocator_overhead(
    inputs: EstimateInputs,
    phases: dict[str, Phase],
    peak_phase: str,
    *,
    allocated: int,
    loss_fp32_block: int,
    vision_cache: int,
    live_16bit_states: int,
    step_temporaries: int,
    deepspeed_step_cached: int | None,
    deepspeed_init_cached: int = 0,
) -> int:
    """Reserved minus allocated bytes at the peak phase. allocated: the peak allocated bytes; vision_cache: vision
    patches x tower width of the micro-batch; deepspeed_step_cached: DeepSpeed's cached step blocks (None without DeepSpeed);
    deepspeed_init_cached: the blocks ZeRO-1/2's init leaves cached (vlmtune.memory.zero): reserved from init on,
    above the resident states, whatever training allocates later (its working set fits in them or adds to them:
    the larger of the two counts).

    With expandable segments (inputs.expandable): FRAG_EXPANDABLE + FRAG_EXPANDABLE_ALLOC x allocated in place of the
    fitted fragmentation terms and of checkpointed full fine-tuning's reserve. That reserve comes from param-shaped blocks (grads, optimizer moments)
    and working-set blocks that cannot serve each other's sizes in fixed segments; in one expandable range the
    grads' freed blocks coalesce into space the next forward's working set fits, and pages left free between live
    blocks are unmapped before an allocation fails, so they cannot cause an out-of-memory error. Not yet measured
    for full fine-tuning: on a roomy GPU, where nothing forces that unmapping, max_memory_reserved may still show
    part of the reserve. DeepSpeed's terms stay: they are blocks DeepSpeed holds (its init and step buffers), not
    fragmentation."""
    frozen_vision = inputs.vision_no_grad and not (
        (inputs.method == "full" and not inputs.freeze_vision_tower) or inputs.adapt_vision_tower
    )
    frag = expandable_overhead(allocated) if inputs.expandable else int(
        FRAG_BASE
        + (FRAG_LOGITS * loss_fp32_block if not inputs.chunked_loss else 0)
        + (LOSS_RESHAPE_SETS * loss_fp32_block if _loss_blocks_reshape(inputs) else 0)
        + (FRAG_VISION * vision_cache if frozen_vision else 0)
        + FRAG_STATES * live_16bit_states
        + (FRAG_FOREACH * step_temporaries if peak_phase == "optimizer step" else 0)
    )
    at = phases[peak_phase].total
    if deepspeed_step_cached is not None:
        init = FRAG_BASE + deepspeed_init_cached
        return max(frag, _deepspeed_step_reserve(phases, deepspeed_step_cached) - at, init - at)
    if _states_take_the_working_blocks(inputs) and not inputs.expandable:
        return _full_checkpointed_reserve(phases) - at
    return frag


def expandable_overhead(allocated: int) -> int:
    """Reserved minus allocated bytes at the peak with expandable segments (FRAG_EXPANDABLE_ALLOC)."""
    return int(FRAG_EXPANDABLE + FRAG_EXPANDABLE_ALLOC * allocated)


def _loss_blocks_reshape(inputs: EstimateInputs) -> bool:
    """HF's loss on padded batches of several samples through vlmtune's engine (autocast): see LOSS_RESHAPE_SETS."""
    return not inputs.chunked_loss and inputs.autocast and inputs.batch_size > 1


def _states_take_the_working_blocks(inputs: EstimateInputs) -> bool:
    """Full fine-tuning with every decoder layer checkpointed, plain PyTorch optimizer: see _full_checkpointed_reserve."""
    return inputs.method == "full" and inputs.gradient_checkpointing and inputs.checkpoint_every == 1


def _full_checkpointed_reserve(phases: dict[str, Phase]) -> int:
    """Reserved bytes above the static states of checkpointed full fine-tuning from the second step on, without
    expandable segments (with them: allocator_overhead).

    The caching allocator never returns a segment, and it serves a request only from one free block at least as
    large. Step 1: forward and backward cache the blocks of their working set (the loss chunk's logits, a trained
    head's fp32 gradient and its per-chunk copies, the vision tower's and the recomputed layer's transients); the
    grads are allocated in backward; then the optimizer creates its two moments (param-shaped, lazily, at the first
    step) and carves them out of those cached working-set blocks, where they stay. From step 2 the working set needs
    new segments, while the grads and the optimizer's temporaries come back to the param-shaped blocks they had in
    step 1 (best fit: same sizes). So the working set and grads + step temporaries hold disjoint segments: reserved
    = static + (grads + step temporaries) + the largest forward/backward working set. Measured (per-step logs of
    the calibration grid): reserved grows from step 1 to step 2 by 0.9-2.9 GiB and stays; with fused AdamW (no
    temporaries) the same working set sits on top of the grads alone (W4: 16.77 GiB vs 19.90 with foreach AdamW's
    param-sized temporary at the same shape, a difference of 3.1 GiB = that temporary's 2.9 GiB).
    Without checkpointing the saved activations are freed layer by layer in backward, where the grads of the same
    layers are allocated, so the two sets share blocks and the fitted terms stay (FRAG_STATES, FRAG_FOREACH)."""
    forward = phases["forward"]  # fp16's autocast weight copies are param-shaped: later grads reuse their blocks
    working = max(
        forward.total - forward.grads - forward.transient,
        *(phases[k].total - phases[k].grads for k in ("loss backward", "layer backward")),
    )
    return phases["optimizer step"].total + working


def _deepspeed_step_reserve(phases: dict[str, Phase], step_cached: int) -> int:
    """Reserved bytes above the static states at DeepSpeed's optimizer step. Its blocks (partition-sized) are
    larger than anything forward and backward allocate, so the allocator cannot put them in the blocks those
    phases left cached: the step adds its own on top of the largest forward/backward working set."""
    working = max(phases[k].total - phases[k].grads for k in ("forward", "loss backward", "layer backward"))
    step = phases["optimizer step"]
    return FRAG_BASE + working + step.total + step_cached
