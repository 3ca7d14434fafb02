"""Which decoder layers a run checkpoints (`speed.checkpoint_every_n_layers`: a number, or auto, the default).

Checkpointing every layer costs a recomputation of the whole language model in backward; checkpointing every n-th
layer keeps the others' activations and recomputes less (H100, W1 2B LoRA: 4.9k tokens/s checkpointing every layer,
6.8k every 2nd, 8.4k without; docs/SPEED.md). auto checkpoints only as many layers as the card needs: on a CUDA GPU
whose memory is known before the weights load, the largest n of `candidates(layers)` whose memory estimate stays
`safety_margin` below what the GPU has (10% with the allocator's expandable segments, the default, else 15%), and no
checkpointing at all where even n = layers fits; 1 where nothing better can be known (CPU, no estimate for the model, DeepSpeed or several processes), each time with the reason.

The same function decides in the training preflight (the visible GPU, train/preflight.py) and in
`vlmtune train --dry-run` (a catalogue GPU or the visible one, train/dry_run.py), so both print the estimate of the
n the run uses. `vlmtune estimate` and `recommend` keep their own explicit settings (auto is estimated as 1 there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlmtune.memory.gpus import GIB

if TYPE_CHECKING:
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.memory.breakdown import Breakdown

SAFETY_MARGIN = 0.15
"""auto keeps the estimate at the chosen n at least this fraction below the GPU's memory, where the allocator runs
without expandable segments. The estimator's measured errors there are within about ±7% (benchmarks/RESULTS.md
2026-12-07, session 10: -7.1% to +3.9% on runs from disk, most of the miss in memory the allocator reserves but does
not use), and memory beyond the estimate has other sources too: compiling added 0.6-0.8 GiB reserved on batches of
varying shape (session 7). Twice the error band leaves room for both; a run that needs less margin can set the number
itself."""
SAFETY_MARGIN_EXPANDABLE = 0.10
"""The same with expandable segments (hardware.expandable_segments, on by default on CUDA): the 21 runs measured with
them (benchmarks/RESULTS.md 2026-12-07, session 13: the 20 `recommend` pairs of 2B-13B models on 8-80 GB caps and the
8 GB lean-QLoRA check) were estimated within -4.3% to +2.6% of their nvidia-smi peaks, loading included (-3.5% to
+3.7% after the allocator refit on them, memory/allocator.py); twice that band. Not yet measured with expandable segments: the 2025 families (Gemma 3, Qwen3.5, Qwen3-VL, SmolVLM2) and
compiled runs."""


def safety_margin(estimate: Breakdown) -> float:
    """The margin auto keeps for an estimate: SAFETY_MARGIN_EXPANDABLE where it counts expandable segments."""
    return SAFETY_MARGIN_EXPANDABLE if estimate.inputs.expandable else SAFETY_MARGIN

CheckpointEstimate = Callable[[int | None], "Breakdown"]
"""The run's estimate with every n-th layer checkpointed (None: no checkpointing)."""


@dataclass(frozen=True)
class Room:
    """What a run may use on its GPU, counted as nvidia-smi counts it (the CUDA context included), so it compares
    with the estimate's peak_total."""

    gpu: str
    capacity: int
    what: str
    """What `capacity` is, for the log."""

    @classmethod
    def visible(cls, gpu: object) -> Room:
        """The visible GPU (train.gpu_memory.GpuMemory): what the allocator can reserve (its free memory, or the
        hardware.memory_fraction cap) plus the CUDA context the estimate counts, as the preflight's picture does."""
        from vlmtune.memory.estimator import CUDA_CONTEXT

        capped = gpu.limit is not None and gpu.limit < gpu.free  # type: ignore[attr-defined]
        what = "the hardware.memory_fraction cap" if capped else "free memory"
        return cls(gpu.name, gpu.available + CUDA_CONTEXT, f"{what} + CUDA context")  # type: ignore[attr-defined]

    @classmethod
    def catalogue(cls, spec: object) -> Room:
        """A catalogue GPU (memory.gpus.GpuSpec): its usable memory, the verdict's capacity."""
        return cls(spec.name, spec.usable_bytes, "usable memory")  # type: ignore[attr-defined]

    def describe(self) -> str:
        return f"{self.gpu}'s {self.capacity / GIB:.2f} GiB ({self.what})"


@dataclass(frozen=True)
class CheckpointChoice:
    checkpointing: bool
    every: int
    reason: str
    auto: bool
    """Chosen by speed.checkpoint_every_n_layers=auto."""
    breakdown: Breakdown | None = None
    """The estimate at the chosen setting, where auto estimated it."""

    def apply(self, config: VlmtuneConfig) -> VlmtuneConfig:
        """`config` with the choice written into it (hardware.gradient_checkpointing, speed.checkpoint_every_n_layers),
        as the run trains and records it."""
        return config.model_copy(update={
            "hardware": config.hardware.model_copy(update={"gradient_checkpointing": self.checkpointing}),
            "speed": config.speed.model_copy(update={"checkpoint_every_n_layers": self.every}),
        })


def candidates(layers: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, 32, ... below `layers`, then `layers` itself (only its first layer checkpointed)."""
    out, step = [1], 0
    while True:
        n = (2, 3)[step % 2] * 2 ** (step // 2)
        if n >= layers:
            break
        out.append(n)
        step += 1
    if layers > 1:
        out.append(layers)
    return out


def language_layers(model: str) -> int | None:
    """Decoder layers of the language model, from the estimator's catalogue (None: a model it does not know)."""
    from vlmtune.errors import VlmtuneError
    from vlmtune.memory.catalogue import lookup_model
    from vlmtune.memory.params import count_params

    try:
        return count_params(lookup_model(model)).dims.layers
    except VlmtuneError:
        return None


def decide_checkpointing(
    config: VlmtuneConfig,
    room: Room | None,
    estimate_at: CheckpointEstimate | None,
    layers: int | None,
    device: str = "cuda",
    world: int = 1,
    deepspeed: bool = False,
) -> CheckpointChoice:
    """The checkpointing a run trains with. `room`: its GPU's memory (None: not known); `estimate_at`: its estimate
    for any n (None: the estimator cannot size the model); `layers`: decoder layers of its language model."""
    setting, on = config.speed.checkpoint_every_n_layers, config.hardware.gradient_checkpointing
    if setting != "auto":
        return CheckpointChoice(on, int(setting), f"speed.checkpoint_every_n_layers={setting}", auto=False)
    if not on:
        return CheckpointChoice(False, 1, "speed.checkpoint_every_n_layers=auto: not applicable, "
                                "hardware.gradient_checkpointing=false checkpoints no layer", auto=True)
    why_not = _refusal(room, estimate_at, layers, device, world, deepspeed)
    if why_not:
        return CheckpointChoice(True, 1, f"speed.checkpoint_every_n_layers=auto -> 1 (every layer): {why_not}",
                                auto=True)
    assert room is not None and estimate_at is not None and layers is not None
    return _search(room, estimate_at, layers)


def _refusal(room: Room | None, estimate_at: CheckpointEstimate | None, layers: int | None, device: str, world: int,
             deepspeed: bool) -> str | None:
    if not device.startswith("cuda"):
        return f"no CUDA GPU to size against (device {device})"
    if deepspeed:
        return ("DeepSpeed: its memory is estimated less closely (up to -24% measured under ZeRO-3 offload); set "
                "speed.checkpoint_every_n_layers to a number to checkpoint fewer layers")
    if world > 1:
        return ("several processes: each would decide from its own GPU's free memory; set "
                "speed.checkpoint_every_n_layers to a number to checkpoint fewer layers")
    if room is None:
        return "the GPU's memory is not known"
    if estimate_at is None or not layers:
        return "the memory estimate cannot size this model"
    return None


def _search(room: Room, estimate_at: CheckpointEstimate, layers: int) -> CheckpointChoice:
    first = estimate_at(1)
    margin = safety_margin(first)
    limit = room.capacity * (1 - margin)
    within = f"within {1 - margin:.0%} of {room.describe()}: {limit / GIB:.2f} GiB"
    if first.peak_total > limit:
        return CheckpointChoice(
            True, 1, f"speed.checkpoint_every_n_layers=auto -> 1 (every layer): even then the estimate "
            f"({first.peak_total / GIB:.2f} GiB) is not {within}", auto=True, breakdown=first)
    chosen, breakdown, above = 1, first, None
    for n in candidates(layers)[1:]:
        estimate = estimate_at(n)
        if estimate.peak_total > limit:
            above = f"; every {n}: {estimate.peak_total / GIB:.2f} GiB"
            break
        chosen, breakdown = n, estimate
    if chosen == layers and layers > 1:
        off = estimate_at(None)
        if off.peak_total <= limit:
            return CheckpointChoice(
                False, 1, f"speed.checkpoint_every_n_layers=auto -> no checkpointing: the estimate without it "
                f"({off.peak_total / GIB:.2f} GiB) is {within}", auto=True, breakdown=off)
        above = f"; without checkpointing: {off.peak_total / GIB:.2f} GiB"
    kept = -(-layers // chosen)
    what = "every layer" if chosen == 1 else f"{kept} of {layers} layers checkpointed"
    return CheckpointChoice(
        True, chosen, f"speed.checkpoint_every_n_layers=auto -> {chosen} ({what}): the estimate "
        f"({breakdown.peak_total / GIB:.2f} GiB) is {within}{above or ''}", auto=True, breakdown=breakdown)
