"""Memory preflight: the estimate of the run about to start, checked against the visible GPU before weights load.

On a CUDA device it caps the process at `hardware.memory_fraction` when set, sizes the worst micro-batch the
encoded data can produce (its longest sample padded over the batch, the batch's most vision patches), prints the
estimate, resolves `training.batch_size: auto` to the largest micro-batch that fits with a margin, and refuses a run
that cannot fit (showing the breakdown and settings that would fit) unless `hardware.force_fit` / `--force`.
On the CPU the GPU estimate means nothing: `auto` becomes 1 and nothing is checked.
`oom_message` turns a CUDA out-of-memory error into the estimate, the measured peak and settings that would fit.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.errors import VlmtuneError
from vlmtune.memory.data_scan import DataProfile, SampleCosts, SampleShape
from vlmtune.memory.gpus import GIB, GpuSpec

if TYPE_CHECKING:
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.data.dataset import EncodedDataset
    from vlmtune.memory.breakdown import Breakdown
    from vlmtune.memory.catalogue import ModelSpec
    from vlmtune.memory.inputs import EstimateInputs
    from vlmtune.methods.base import PrecisionPlan

log = logging.getLogger(__name__)

AUTO_MARGIN = 0.10
"""`batch_size: auto` leaves this fraction of the available memory free (estimate error + allocator noise)."""
OOM_MARGIN = 0.20
"""After an out-of-memory error the estimate has missed once: the advice leaves a wider margin."""
AUTO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
_OFFLOAD_FIELD = {"none": "none", "optimizer": "optimizer", "all": "optimizer_and_params"}


@dataclass(frozen=True)
class GpuMemory:
    """The GPU this process trains on, as PyTorch sees it before the model loads (bytes)."""

    name: str
    total: int
    free: int
    """Free now: other processes and this process's CUDA context are already taken off."""
    bf16: bool
    limit: int | None = None
    """The allocator's cap from hardware.memory_fraction (None: no cap)."""

    @property
    def available(self) -> int:
        """What PyTorch's allocator can reserve: compared with the estimate's peak_reserved."""
        return self.free if self.limit is None else min(self.free, self.limit)

    def describe(self) -> str:
        cap = f", capped at {self.limit / GIB:.2f} GiB by hardware.memory_fraction" if self.limit else ""
        return f"{self.name}: {self.free / GIB:.2f} of {self.total / GIB:.2f} GiB free{cap}"


@dataclass(frozen=True)
class PreflightResult:
    config: VlmtuneConfig
    """The config to train with (training.batch_size resolved)."""
    breakdown: Breakdown | None = None
    """The estimate for that config and data (None on the CPU or for a model the estimator does not know)."""
    gpu: GpuMemory | None = None
    profile: DataProfile | None = None
    fits: bool = True


def _device_index() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def read_gpu_memory(index: int) -> GpuMemory:
    """Free and total memory of CUDA device `index` (creates this process's CUDA context on it)."""
    import torch

    free, total = torch.cuda.mem_get_info(index)
    with torch.cuda.device(index):
        bf16 = torch.cuda.is_bf16_supported()
    return GpuMemory(torch.cuda.get_device_name(index), int(total), int(free), bf16)


def apply_memory_fraction(fraction: float, index: int) -> None:
    import torch

    torch.cuda.set_per_process_memory_fraction(fraction, index)


def measured_peaks() -> tuple[int, int]:
    """(max_memory_allocated, max_memory_reserved) of this process so far, bytes."""
    import torch

    return int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())


def _image_hw(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
    return height, width


def measured_profile(dataset: EncodedDataset, spec: ModelSpec, config: VlmtuneConfig) -> DataProfile:
    """The data as the estimator sizes it, from the encoded samples' real token lengths and the images' sizes.

    Text tokens = encoded length minus the image tokens the processor rules give under the current settings, so
    the worst batch at these settings is exact, and the advisor can still re-size it for a lower max_pixels."""
    images = [tuple(_image_hw(p) for p in record.images) for record in dataset.records]
    no_text = DataProfile(dataset.source, tuple(SampleShape(0, hw) for hw in images), exact_text=True)
    d = config.data
    image_tokens = no_text.costs(spec, d.image_size, d.min_pixels, d.max_pixels).image_tokens
    samples = tuple(
        SampleShape(max(0, length - tokens), hw)
        for length, tokens, hw in zip(dataset.lengths, image_tokens, images, strict=True)
    )
    return DataProfile(dataset.source, samples, exact_text=True)


class _Sizer:
    """Estimates of `config` on `profile` for any micro-batch (the data's costs computed once)."""

    def __init__(self, config: VlmtuneConfig, spec: ModelSpec, profile: DataProfile, labelled: list[int] | None):
        d = config.data
        self.config, self.spec, self.profile = config, spec, profile
        self.labelled = sorted(labelled) if labelled else None
        self.costs: SampleCosts = profile.costs(spec, d.image_size, d.min_pixels, d.max_pixels)

    def inputs(self, batch: int) -> EstimateInputs:
        from vlmtune.config.distributed import effective_zero, world_size
        from vlmtune.memory.inputs import inputs_from_config

        shape = self.profile.batch(self.spec, batch, self.config.data.max_length, costs=self.costs)
        world = world_size(self.config.distributed)
        stage, offload = effective_zero(self.config, world)
        return inputs_from_config(
            self.config,
            zero_stage=stage,
            offload="all" if offload == "optimizer_and_params" else offload,
            num_gpus=world,
            batch_size=batch,
            seq_len=shape.seq_len,
            vit_patches_per_batch=shape.vit_patches,
            images_per_sample=shape.images_per_sample,
            image_tokens_per_sample=shape.image_tokens,
            labelled_tokens=sum(self.labelled[-batch:]) if self.labelled else None,
        )

    def estimate(self, batch: int) -> Breakdown:
        from vlmtune.memory.estimator import estimate

        return estimate(self.inputs(batch))


def _choose_batch(sizer: _Sizer, gpu: GpuMemory, samples: int) -> tuple[int, Breakdown]:
    """The largest micro-batch (up to the data set's size) whose estimate fits with AUTO_MARGIN; 1 if none does."""
    limit = gpu.available * (1 - AUTO_MARGIN)
    chosen = None
    for batch in AUTO_BATCHES:
        if batch > max(1, samples):
            break
        breakdown = sizer.estimate(batch)
        if breakdown.peak_reserved > limit and chosen is not None:
            break
        chosen = (batch, breakdown)
        if breakdown.peak_reserved > limit:
            break
    assert chosen is not None
    return chosen


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def overrides(config: VlmtuneConfig, target: EstimateInputs) -> list[str]:
    """Dotted overrides that turn `config` into the configuration `target` describes (only what differs)."""
    m, t, h = config.method, config.training, config.hardware
    pairs = [
        ("method.name", m.name.value, target.method),
        ("method.lora.rank", m.lora.rank, target.lora_rank if target.method != "full" else m.lora.rank),
        ("training.batch_size", t.batch_size, target.batch_size),
        ("training.gradient_accumulation_steps", t.gradient_accumulation_steps, target.gradient_accumulation_steps),
        ("hardware.gradient_checkpointing", h.gradient_checkpointing, target.gradient_checkpointing),
        ("data.max_pixels", config.data.max_pixels, target.max_pixels),
    ]
    out = [f"{key}={_yaml(new)}" for key, old, new in pairs if new is not None and new != old]
    if target.zero_stage:
        out += [
            "distributed.engine=deepspeed",
            f"distributed.zero_stage={target.zero_stage}",
            f"distributed.offload={_OFFLOAD_FIELD[target.offload]}",
        ]
    return out


def deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def advice(result: PreflightResult, margin: float = AUTO_MARGIN) -> str:
    """What would fit the GPU, from `vlmtune recommend`'s search over the same model and data."""
    from vlmtune.memory.estimator import CUDA_CONTEXT
    from vlmtune.memory.recommend import recommend

    b, gpu, config = result.breakdown, result.gpu, result.config
    if b is None or gpu is None or result.profile is None:
        return ""
    spec = GpuSpec(
        name=gpu.name,
        memory_gb=gpu.total / GIB,
        usable_bytes=gpu.available + CUDA_CONTEXT,
        bf16=gpu.bf16,
        arch="visible GPU",
    )
    methods = ("lora", "qlora") + (("full",) if config.method.name.value == "full" else ())
    rec = recommend(b.inputs, spec, b.inputs.num_gpus, methods=methods, margin=margin, profile=result.profile,
                    zero=deepspeed_available())
    if rec.best is None:
        return rec.describe()
    changes = overrides(config, rec.best.inputs)
    return f"{rec.describe()}\n  as overrides: {' '.join(changes) if changes else '(the same settings)'}"


def _summary(b: Breakdown, gpu: GpuMemory, verdict: str) -> str:
    return (
        f"memory estimate: {b.peak_total / GIB:.2f} GiB at the peak as nvidia-smi shows it "
        f"({b.peak_reserved / GIB:.2f} GiB reserved by PyTorch, {b.peak_allocated / GIB:.2f} allocated, at "
        f"{b.peak_phase}); {gpu.describe()}: {verdict}"
    )


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
    fields: dict[str, Any] = {"batch_size": result.config.training.batch_size}
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


def _resolved(config: VlmtuneConfig, batch: int) -> VlmtuneConfig:
    return config.model_copy(update={"training": config.training.model_copy(update={"batch_size": batch})})


def preflight(
    config: VlmtuneConfig, plan: PrecisionPlan, dataset: EncodedDataset, log_path: Path | None = None
) -> PreflightResult:
    """Check `config` on `dataset` against the visible GPU; returns the config to train with and its estimate.

    Raises VlmtuneError (breakdown + settings that fit) when the estimate exceeds what the GPU has, unless
    hardware.force_fit. `log_path`: train_log.jsonl, which gets a `memory_preflight` event (GPU, main process)."""
    main = os.environ.get("RANK", "0") == "0"
    log_path = log_path if main else None
    auto = config.training.batch_size == "auto"
    if plan.device != "cuda":
        if auto:
            log.info("training.batch_size=auto -> 1: no GPU to size the micro-batch against (training on the CPU)")
            config = _resolved(config, 1)
        return PreflightResult(config)

    from vlmtune.memory.catalogue import lookup_model

    index = _device_index()
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
        return PreflightResult(config, gpu=gpu)
    profile = measured_profile(dataset, spec, config)
    sizer = _Sizer(config, spec, profile, getattr(dataset, "labelled", None))
    if auto:
        batch, breakdown = _choose_batch(sizer, gpu, len(dataset))
        config = _resolved(config, batch)
        log.info("training.batch_size=auto -> %d (the largest micro-batch that fits with a %.0f%% margin)",
                 batch, 100 * AUTO_MARGIN)
    else:
        breakdown = sizer.estimate(int(config.training.batch_size))
    fits = breakdown.peak_reserved <= gpu.available
    tight = fits and breakdown.peak_reserved > gpu.available * (1 - AUTO_MARGIN)
    verdict = "DOES NOT FIT" if not fits else "fits, with little room" if tight else "fits"
    result = PreflightResult(config, breakdown, gpu, profile, fits)
    forced = not fits and config.hardware.force_fit
    if main:
        _show(breakdown, _summary(breakdown, gpu, verdict))
    _event(log_path, result, forced)
    if not fits and not forced:
        raise VlmtuneError(
            f"this run does not fit the GPU according to the memory estimate: it needs about "
            f"{breakdown.peak_reserved / GIB:.2f} GiB reserved by PyTorch "
            f"({breakdown.peak_total / GIB:.2f} GiB as nvidia-smi shows it) and {gpu.describe()}.\n\n"
            f"{breakdown.to_table()}\n\nSettings that fit (vlmtune recommend, {AUTO_MARGIN:.0%} margin): "
            f"{advice(result)}\n\nStart anyway with --force (hardware.force_fit=true) if you know the estimate "
            "is pessimistic for this run."
        )
    if forced:
        log.warning("the estimate says this run does not fit; starting anyway (hardware.force_fit)")
    return result


def oom_message(result: PreflightResult | None, step: int, exc: BaseException) -> str:
    """The CUDA out-of-memory error as the estimate, the measured peak so far, and settings that would fit."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lines = [f"out of GPU memory at step {step}: {first}"]
    b = result.breakdown if result else None
    if b is not None:
        lines.append(
            f"  estimate: {b.peak_allocated / GIB:.2f} GiB allocated, {b.peak_reserved / GIB:.2f} GiB reserved "
            f"at {b.peak_phase} (micro-batch {b.inputs.batch_size}, {b.seq_len} tokens per sample, "
            f"{b.vit_patches} vision patches)"
        )
    try:
        allocated, reserved = measured_peaks()
        lines.append(
            f"  measured so far: {allocated / GIB:.2f} GiB allocated, {reserved / GIB:.2f} GiB reserved at the peak"
        )
    except (RuntimeError, AssertionError):  # CUDA unusable after the error: report what is known
        pass
    if result is not None and result.gpu is not None:
        lines.append(f"  GPU: {result.gpu.describe()}")
    fitting = advice(result, OOM_MARGIN) if result is not None else ""
    if fitting:
        lines.append(f"  settings that fit with a {OOM_MARGIN:.0%} margin: {fitting}")
    else:
        lines.append(
            "  lower training.batch_size (raise training.gradient_accumulation_steps to keep the effective batch), "
            "set hardware.gradient_checkpointing=true, lower data.max_length or data.image_size, or use "
            "method.name=qlora; `vlmtune estimate` shows what fits"
        )
    lines.append("Checkpoints written so far can be resumed with --resume.")
    return "\n".join(lines)
