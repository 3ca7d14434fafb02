"""Per-GPU model-state memory under data parallelism: plain DDP (stage 0) or DeepSpeed ZeRO 1-3, with offload.

Model states only (weights, gradients, optimizer states, communication buffers); activations are not partitioned
by ZeRO and are added by the estimator. Conventions follow DeepSpeed's own estimators
(`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`) and the ZeRO paper:
under DeepSpeed bf16/fp16 the module (LoRA adapters included) is cast to 16-bit on the GPU; the optimizer owns an
fp32 master copy, fp32 gradients and Adam's two fp32 moments of the *trainable* parameters, partitioned over the GPUs.
ZeRO-1 partitions those states, ZeRO-2 also the 16-bit gradients, ZeRO-3 also the 16-bit parameters (frozen ones
included), which are gathered layer by layer. Offloading moves the partitioned fp32 states (`optimizer`) and, with
ZeRO-3, the 16-bit parameters too (`all`) to CPU RAM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Offload = Literal["none", "optimizer", "all"]

CPU_BUFFER_FACTOR = 1.5
"""DeepSpeed's `additional_buffer_factor` for CPU RAM (pinned staging buffers)."""
GATHER_FACTOR = 4
"""Bytes per parameter of the ZeRO-3 working set (16-bit params + 16-bit grads of the largest gathered unit),
as in DeepSpeed's `largest_layer_memory = 4 * largest_layer_params`."""


@dataclass(frozen=True)
class StateSizes:
    """What the estimator knows about the model, in bytes and parameter counts, independent of parallelism."""

    frozen_weight_bytes: int
    """Weights that do not train, as stored on the GPU (16-bit, or 4-bit for QLoRA's quantized layers)."""
    trainable: int
    """Trainable parameters."""
    param_bytes: int
    """Bytes per trainable parameter as stored on the GPU without DeepSpeed (fp32 adapters: 4; pure bf16: 2)."""
    grad_bytes: int
    """Bytes per gradient element without DeepSpeed (same dtype as the parameter)."""
    optimizer_bytes: int
    """Optimizer-state bytes per trainable parameter without DeepSpeed (AdamW: 2 x param_bytes; 8-bit: 2)."""
    largest_unit: int
    """Parameters of the largest unit ZeRO-3 gathers at once (max of the largest module and one decoder layer)."""
    bucket_elements: int
    """Gradient reduce / prefetch bucket size in elements (HF "auto": hidden_size^2)."""
    ds_param_bytes: int = 2
    """Bytes per parameter element on the GPU under DeepSpeed (2 for bf16/fp16 training, 4 for fp32)."""
    ds_moment_bytes: int = 8
    """Optimizer-moment bytes per trainable parameter under DeepSpeed (fp32 Adam: 8; 8-bit Adam: 2)."""


@dataclass(frozen=True)
class ZeroPlan:
    """Per-GPU bytes of model states, and the CPU RAM of the whole node."""

    weights: int
    """Frozen and trainable 16-bit (or quantized) weights resident on this GPU."""
    gathered: int
    """ZeRO-3 working set: parameters gathered for the current and prefetched layers."""
    grads: int
    """Gradient bytes resident between micro-batches (fp32 partitions, unpartitioned 16-bit grads)."""
    grads_transient: int
    """Gradient bytes that exist only during backward (16-bit grads reduced away at once)."""
    optimizer: int
    """Optimizer states and fp32 master weights on this GPU."""
    buffers: int
    """Communication buckets (DDP gradient buckets, DeepSpeed reduce / all-gather buckets)."""
    offloaded: int
    """Bytes this GPU's process keeps in CPU RAM (before the staging-buffer factor)."""
    cpu_ram: int
    """CPU RAM the node needs for every process's offloaded states, with DeepSpeed's buffer factor."""
    deepspeed: bool

    @property
    def resident(self) -> int:
        return self.weights + self.gathered + self.grads + self.optimizer + self.buffers


def check_plan(stage: int, offload: str, num_gpus: int) -> list[str]:
    """Problems with a ZeRO stage / offload / GPU-count combination (empty when valid)."""
    problems = []
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_stage must be 0, 1, 2 or 3, got {stage}")
    if offload not in ("none", "optimizer", "all"):
        problems.append(f"offload must be none, optimizer or all, got {offload!r}")
    if num_gpus < 1:
        problems.append(f"num_gpus must be at least 1, got {num_gpus}")
    if offload != "none" and stage == 0:
        problems.append(
            "offload needs DeepSpeed: use zero_stage 1, 2 or 3 (offload=optimizer) or 3 (offload=all)"
        )
    if offload == "all" and stage in (1, 2):
        problems.append(
            "offload=all (parameters too) needs zero_stage 3; ZeRO-1/2 can offload only the optimizer"
        )
    return problems


def plan(sizes: StateSizes, stage: int, offload: Offload, num_gpus: int) -> ZeroPlan:
    """Model-state bytes per GPU. Stage 0 is vlmtune's own path: single GPU, or DDP on several."""
    g = num_gpus
    t = sizes.trainable
    if stage == 0:
        ddp_buckets = t * sizes.grad_bytes if g > 1 else 0
        return ZeroPlan(
            weights=sizes.frozen_weight_bytes + t * sizes.param_bytes,
            gathered=0,
            grads=t * sizes.grad_bytes,
            grads_transient=0,
            optimizer=t * sizes.optimizer_bytes,
            buffers=ddp_buckets,
            offloaded=0,
            cpu_ram=0,
            deepspeed=False,
        )

    half = sizes.ds_param_bytes
    master = t * 4 // g if half == 2 else 0
    moments = t * sizes.ds_moment_bytes // g
    fp32_grads = t * 4 // g if half == 2 else 0
    grads16 = t * half if stage == 1 else t * half // g
    weights = sizes.frozen_weight_bytes + t * half
    gathered = 0
    if stage == 3:
        weights //= g
        gathered = GATHER_FACTOR * sizes.largest_unit
    offloaded = 0
    optimizer = master + moments
    if offload != "none":
        offloaded += optimizer + fp32_grads
        optimizer = fp32_grads = 0
    if offload == "all":
        offloaded += weights
        weights = 0
    if stage == 1:
        resident_grads, transient = grads16 + fp32_grads, 0
    elif offload != "none":
        # Offloaded ZeRO-2/3 stream the 16-bit gradients to the CPU through the buckets.
        resident_grads, transient = 0, 0
    else:
        # ZeRO-2 keeps a 16-bit gradient partition; ZeRO-3 reduces straight from its buckets into the fp32 one.
        resident_grads, transient = fp32_grads, (grads16 if stage == 2 else 0)
    return ZeroPlan(
        weights=weights,
        gathered=gathered,
        grads=resident_grads,
        grads_transient=transient,
        optimizer=optimizer,
        buffers=2 * sizes.bucket_elements * half,
        offloaded=offloaded,
        cpu_ram=int(offloaded * g * CPU_BUFFER_FACTOR),
        deepspeed=True,
    )
