"""Memory preflight: the estimate of the run about to start, checked against the visible GPU before weights load.

On a CUDA device it caps the process at `hardware.memory_fraction` when set, sizes the worst micro-batch the
encoded data can produce (`batch_sizing`), prints the estimate, resolves `training.batch_size: auto` to the largest
micro-batch that fits with a margin, then `speed.checkpoint_every_n_layers: auto` to the fewest checkpointed layers
that fit that micro-batch with a wider margin (speed/checkpoint_policy.py; the printed and recorded estimate is the
one at that choice), and refuses a run that cannot fit (showing the breakdown and settings that would fit,
`fit_advice`) unless `hardware.force_fit` / `--force`; likewise a DeepSpeed offload that needs more CPU RAM than the
machine has available (`host_memory`).
A run that `speed.compile: auto` will compile (the engine asks speed/compile_policy.auto_compiles) is sized and
estimated with compiled decoder layers, as speed.compile=true is; where that estimate leaves little room on the GPU
(auto then stays eager) or the micro-batch chosen leaves too few steps to compile, everything is sized again eager,
so the estimate printed, logged and checked is the one of the run that happens (2026-12-07, session 17: an eager
estimate of a compiled 1,000-step 2B LoRA run was +11.1% over its nvidia-smi peak).
On the CPU the GPU estimate means nothing: both autos become 1 and nothing is checked.
After training starts, `out_of_memory.oom_message` explains a CUDA out-of-memory error from this module's result.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.errors import VlmtuneError
from vlmtune.memory.data_scan import DataProfile
from vlmtune.memory.gpus import GIB
from vlmtune.train.batch_sizing import AUTO_MARGIN, Sizer, choose_batch, measured_profile
from vlmtune.train.fit_advice import advice, faster_zero
from vlmtune.train.gpu_memory import GpuMemory, apply_memory_fraction, device_index, read_gpu_memory
from vlmtune.train.host_memory import available_host_ram, check_host_ram

if TYPE_CHECKING:
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.data.dataset import EncodedDataset
    from vlmtune.memory.breakdown import Breakdown
    from vlmtune.memory.catalogue import ModelSpec
    from vlmtune.memory.inputs import EstimateInputs
    from vlmtune.methods.base import PrecisionPlan
    from vlmtune.speed.checkpoint_policy import CheckpointChoice, CheckpointEstimate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreflightResult:
    config: VlmtuneConfig
    """The config to train with (training.batch_size resolved)."""
    breakdown: Breakdown | None = None
    """The estimate for that config and data (None on the CPU or for a model the estimator does not know)."""
    gpu: GpuMemory | None = None
    profile: DataProfile | None = None
    fits: bool = True
    checkpointing: str | None = None
    """Why the run checkpoints the layers it does (speed.checkpoint_every_n_layers), where the estimate decided."""

    @property
    def little_room(self) -> str | None:
        """Why the estimate leaves little room on the GPU (its reserved peak above all but AUTO_MARGIN of what the
        GPU has for the run, fitting or not), or None; None too without an estimate."""
        if self.breakdown is None or self.gpu is None:
            return None
        reserved, available = self.breakdown.peak_reserved, self.gpu.available
        if reserved <= available * (1 - AUTO_MARGIN):
            return None
        return (f"the memory estimate ({reserved / GIB:.2f} GiB reserved) is within {AUTO_MARGIN:.0%} of the "
                f"{available / GIB:.2f} GiB the GPU has for this run")


def _summary(b: Breakdown, gpu: GpuMemory, verdict: str) -> str:
    return f"{b.peak_summary()}; {gpu.describe()}: {verdict}"  # the line recommend and --dry-run print too


def _show(b: Breakdown, summary: str) -> None:
    from rich.console import Console
    from rich.text import Text

    console = Console(soft_wrap=True)
    console.rule("memory estimate (before loading the model)")
    console.print(Text(b.to_table()))
    console.print(Text(summary))


def _event(log_path: Path | None, result: PreflightResult, forced: bool) -> None:
    from vlmtune.train.callbacks import write_event

    if log_path is None:
        return
    speed, hardware = result.config.speed, result.config.hardware
    fields: dict[str, Any] = {"batch_size": result.config.training.batch_size,
                              "gradient_checkpointing": hardware.gradient_checkpointing,
                              "checkpoint_every_n_layers": speed.checkpoint_every_n_layers,
                              "checkpointing": result.checkpointing}
    b, gpu = result.breakdown, result.gpu
    if b is not None and gpu is not None:
        fields.update(
            seq_len=b.seq_len,
            vit_patches=b.vit_patches,
            estimate_allocated_gib=round(b.peak_allocated / GIB, 3),
            estimate_reserved_gib=round(b.peak_reserved / GIB, 3),
            estimate_total_gib=round(b.peak_total / GIB, 3),
            peak_phase=b.peak_phase,
            gpu=gpu.name,
            gpu_total_gib=round(gpu.total / GIB, 3),
            gpu_free_gib=round(gpu.free / GIB, 3),
            memory_limit_gib=round(gpu.limit / GIB, 3) if gpu.limit else None,
            fits=result.fits,
            forced=forced,
            inputs=b.inputs.to_dict(),
        )
    write_event(log_path, "memory_preflight", **fields)


def _picture(b: Breakdown, gpu: GpuMemory, status: str, out_png: Path) -> None:
    """memory_estimate.png in the run folder: the breakdown against what this GPU has (its free memory plus the
    CUDA context the estimate counts, so the bar and the line compare as the fit check does)."""
    from dataclasses import replace

    from vlmtune.memory.breakdown import Verdict
    from vlmtune.memory.picture import render_breakdown

    capacity = gpu.available + b.cuda_context
    verdict = Verdict(gpu=gpu.name, capacity=capacity, headroom=capacity - b.peak_total, status=status)
    try:
        render_breakdown(replace(b, verdict=verdict), out_png)
    except OSError as exc:  # a picture is not worth stopping a run for
        log.warning("could not write %s: %s", out_png, exc)


def _estimate_at(inputs: EstimateInputs, every: int | None) -> Breakdown:
    from vlmtune.memory.estimator import estimate

    return estimate(inputs.with_(gradient_checkpointing=every is not None, checkpoint_every=every or 1))


def _checkpointing(
    config: VlmtuneConfig, gpu: GpuMemory | None, estimate_at: CheckpointEstimate | None, device: str
) -> CheckpointChoice:
    """speed.checkpoint_every_n_layers resolved (auto: from the estimate against this GPU, speed/checkpoint_policy.py),
    with the estimate at the chosen setting where auto made one."""
    from vlmtune.config.distributed import uses_deepspeed, world_size
    from vlmtune.speed.checkpoint_policy import Room, decide_checkpointing, language_layers

    world = world_size(config.distributed)
    return decide_checkpointing(
        config, Room.visible(gpu) if gpu is not None else None, estimate_at,
        language_layers(config.model.name_or_path) if estimate_at is not None else None,
        device, world, uses_deepspeed(config.distributed, world),
    )


def _decided(choice: CheckpointChoice, config: VlmtuneConfig, main: bool) -> VlmtuneConfig:
    """`config` with the checkpointing choice applied; auto's choice logged."""
    if choice.auto and main:
        log.info("speed: %s", choice.reason)
    return choice.apply(config)


def _resolved(config: VlmtuneConfig, batch: int) -> VlmtuneConfig:
    return config.model_copy(update={"training": config.training.model_copy(update={"batch_size": batch})})


@dataclass(frozen=True)
class _Sized:
    config: VlmtuneConfig
    """The run's config with training.batch_size resolved (checkpointing not yet applied)."""
    breakdown: Breakdown
    checkpointing: CheckpointChoice


def _size(config: VlmtuneConfig, spec: ModelSpec, profile: DataProfile, labelled: list[int] | None, gpu: GpuMemory,
          device: str, compiled: bool) -> _Sized:
    """Both autos resolved from the estimate against `gpu` (batch_size: the largest micro-batch within AUTO_MARGIN;
    then the checkpointing that micro-batch needs), and the estimate at that choice. `compiled`: estimated with the
    decoder layers compiled (as speed.compile=true is); the config returned keeps the run's own speed.compile."""
    speed = config.speed.model_copy(update={"compile": True}) if compiled else config.speed
    sizer = Sizer(config.model_copy(update={"speed": speed}), spec, profile, labelled)
    if config.training.batch_size == "auto":
        batch, breakdown = choose_batch(sizer, gpu, sizer.rows)
        config = _resolved(config, batch)
    else:
        batch = int(config.training.batch_size)
        breakdown = sizer.estimate(batch)
    # After the micro-batch (sized with every layer checkpointed under auto): the layers this batch needs checkpointed.
    inputs = sizer.inputs(batch)
    checkpointing = _checkpointing(config, gpu, lambda n: _estimate_at(inputs, n), device)
    return _Sized(config, checkpointing.breakdown or breakdown, checkpointing)


def _eager_instead(sized: _Sized, gpu: GpuMemory, compiles: Callable[[VlmtuneConfig], bool]) -> str | None:
    """Why speed.compile=auto will not compile the run the compiled estimate sized, or None where it will."""
    if not compiles(sized.config):
        return f"speed.compile=auto does not compile at micro-batch {sized.config.training.batch_size} (fewer steps)"
    tight = PreflightResult(sized.config, sized.breakdown, gpu).little_room
    return f"with compiled layers {tight}, and speed.compile=auto stays eager then" if tight else None


def preflight(
    config: VlmtuneConfig,
    plan: PrecisionPlan,
    dataset: EncodedDataset,
    log_path: Path | None = None,
    compiles: Callable[[VlmtuneConfig], bool] = lambda config: False,
) -> PreflightResult:
    """Check `config` on `dataset` against the visible GPU; returns the config to train with and its estimate.

    Raises VlmtuneError (breakdown + settings that fit) when the estimate exceeds what the GPU has, unless
    hardware.force_fit. `log_path`: train_log.jsonl, which gets a `memory_preflight` event (GPU, main process).
    `compiles`: whether speed.compile=auto compiles a run of a config, memory aside (the engine's
    speed/compile_policy.auto_compiles); asked again once batch_size auto is resolved, since a larger micro-batch
    means fewer steps. By default the run is estimated as its config says (compiled only for speed.compile=true)."""
    main = os.environ.get("RANK", "0") == "0"
    log_path = log_path if main else None
    auto = config.training.batch_size == "auto"
    if plan.device != "cuda":
        if auto:
            log.info("training.batch_size=auto -> 1: no GPU to size the micro-batch against (training on the CPU)")
            config = _resolved(config, 1)
        return PreflightResult(_decided(_checkpointing(config, None, None, plan.device), config, main))

    from vlmtune.memory.catalogue import lookup_model

    index = device_index()
    if config.hardware.memory_fraction is not None:
        apply_memory_fraction(config.hardware.memory_fraction, index)
    gpu = read_gpu_memory(index)
    if config.hardware.memory_fraction is not None:
        limit = int(config.hardware.memory_fraction * gpu.total)
        gpu = GpuMemory(gpu.name, gpu.total, gpu.free, gpu.bf16, limit)
    try:
        spec = lookup_model(config.model.name_or_path)
    except VlmtuneError as exc:
        if auto:
            raise VlmtuneError(
                f"training.batch_size=auto needs the memory estimate, which cannot size this model: {exc} "
                "Set training.batch_size to a number."
            ) from exc
        log.warning("no memory estimate before training: %s", exc)
        return PreflightResult(_decided(_checkpointing(config, gpu, None, plan.device), config, main), gpu=gpu)
    profile = measured_profile(dataset, spec, config)
    labelled = getattr(dataset, "labelled", None)
    compiled = compiles(config)
    sized = _size(config, spec, profile, labelled, gpu, plan.device, compiled)
    eager = _eager_instead(sized, gpu, compiles) if compiled else None
    if eager:
        sized = _size(config, spec, profile, labelled, gpu, plan.device, compiled=False)
    if compiled and main:
        log.info("memory estimate: %s", f"eager, as the run will be: {eager}" if eager else
                 "with compiled decoder layers (speed.compile=auto compiles this run)")
    if auto:
        log.info("training.batch_size=auto -> %d (the largest micro-batch that fits with a %.0f%% margin)",
                 sized.config.training.batch_size, 100 * AUTO_MARGIN)
    config, breakdown = _decided(sized.checkpointing, sized.config, main), sized.breakdown
    fits = breakdown.peak_reserved <= gpu.available
    result = PreflightResult(config, breakdown, gpu, profile, fits, sized.checkpointing.reason)
    tight = fits and result.little_room is not None
    verdict = "DOES NOT FIT" if not fits else "fits, with little room" if tight else "fits"
    forced = not fits and config.hardware.force_fit
    if main:
        _show(breakdown, _summary(breakdown, gpu, verdict))
    _event(log_path, result, forced)
    if log_path is not None:
        _picture(breakdown, gpu, "does not fit" if not fits else "tight" if tight else "fits",
                 log_path.parent / "memory_estimate.png")
    if not fits and not forced:
        raise VlmtuneError(
            f"this run does not fit the GPU according to the memory estimate: it needs about "
            f"{breakdown.peak_reserved / GIB:.2f} GiB reserved by PyTorch "
            f"({breakdown.peak_total / GIB:.2f} GiB as nvidia-smi shows it) and {gpu.describe()}.\n\n"
            f"{breakdown.to_table()}\n\nSettings that fit (vlmtune recommend, {AUTO_MARGIN:.0%} margin): "
            f"{advice(result)}\n\nStart anyway with --force (hardware.force_fit=true) if you know the estimate "
            "is pessimistic for this run."
        )
    host_available = available_host_ram()
    host = check_host_ram(config, breakdown, host_available)
    if host and main:
        log.warning("%s", host)
    if forced:
        log.warning("the estimate says this run does not fit; starting anyway (hardware.force_fit)")
    elif main:
        from vlmtune.memory.recommend import relative_throughput

        hint = faster_zero(
            config, breakdown.inputs, relative_throughput(breakdown.inputs, breakdown), gpu.available, host_available
        )
        if hint:
            log.warning("%s", hint)
    return result
