"""Settings that would fit the visible GPU: `vlmtune recommend`'s search, written as dotted config overrides."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlmtune.memory.gpus import GIB, GpuSpec
from vlmtune.train.batch_sizing import AUTO_MARGIN

if TYPE_CHECKING:
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.memory.inputs import EstimateInputs
    from vlmtune.train.preflight import PreflightResult

_OFFLOAD_FIELD = {"none": "none", "optimizer": "optimizer", "all": "optimizer_and_params"}


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def overrides(config: VlmtuneConfig, target: EstimateInputs) -> list[str]:
    """Dotted overrides that turn `config` into the configuration `target` describes (only what differs)."""
    from vlmtune.memory.recommend import lean_qlora

    m, t, h = config.method, config.training, config.hardware
    pairs = [
        ("method.name", m.name.value, target.method),
        ("method.lora.rank", m.lora.rank, target.lora_rank if target.method != "full" else m.lora.rank),
        ("training.batch_size", t.batch_size, target.batch_size),
        ("training.gradient_accumulation_steps", t.gradient_accumulation_steps, target.gradient_accumulation_steps),
        ("hardware.gradient_checkpointing", h.gradient_checkpointing, target.gradient_checkpointing),
        ("data.max_pixels", config.data.max_pixels, target.max_pixels),
        # lean QLoRA and the loss chunk (the search tries both); lean's own fields are named too, so the overrides
        # say the same whatever the config set before
        ("method.quantization.lean", m.quantization.lean, lean_qlora(target)),
        ("method.quantization.quantize_vision_tower", m.quantization.quantize_vision_tower,
         target.quantize_vision_tower),
        ("method.quantization.quantize_lm_head", m.quantization.quantize_lm_head, target.quantize_lm_head),
        ("training.optimizer", t.optimizer, target.optimizer),
        ("speed.embeddings_on_cpu", config.speed.embeddings_on_cpu, target.embeddings_on_cpu),
        ("speed.loss_chunk_tokens", config.speed.loss_chunk_tokens, target.loss_chunk_tokens),
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


FASTER_BY = 1.2
"""Suggest another DeepSpeed setting only when the throughput model puts it at least this much faster."""


def faster_zero(
    config: VlmtuneConfig,
    current: EstimateInputs,
    current_throughput: float,
    available: int,
    host_available: int | None = None,
) -> str | None:
    """When a run uses ZeRO-3 or offload although a cheaper setting also fits the GPU (with the auto-batch margin)
    and, offloading, this node's CPU RAM (host_available: MemAvailable; None: not checked), the flags for the
    fastest such setting and the measured slowdown behind it; None otherwise (or when the user's own DeepSpeed JSON
    decides)."""
    from dataclasses import replace

    from vlmtune.memory.estimator import estimate
    from vlmtune.memory.recommend import relative_throughput
    from vlmtune.train.host_memory import node_need

    if config.distributed.deepspeed_config is not None or (current.zero_stage < 3 and current.offload == "none"):
        return None
    best: tuple[float, EstimateInputs, int] | None = None
    for stage, offload in ((0, "none"), (2, "none"), (2, "optimizer"), (3, "none"), (3, "optimizer")):
        if (stage, offload) == (current.zero_stage, current.offload):
            continue
        candidate = replace(current, zero_stage=stage, offload=offload)
        b = estimate(candidate)
        if b.cpu_ram and host_available is not None and node_need(b.cpu_ram, candidate.num_gpus) > host_available:
            continue  # the operating system would kill it (train/host_memory.py)
        speed = relative_throughput(candidate, b)
        if b.peak_reserved <= available * (1 - AUTO_MARGIN) and speed >= FASTER_BY * current_throughput:
            if best is None or speed > best[0]:
                best = (speed, candidate, b.peak_reserved)
    if best is None:
        return None
    speed, target, reserved = best
    if target.zero_stage == 0:
        flags = "--no-deepspeed" if current.num_gpus == 1 else "--zero-stage 0 (DDP)"
    else:
        flags = f"--zero-stage {target.zero_stage} --offload {_OFFLOAD_FIELD[target.offload]}"
    now = f"ZeRO-{current.zero_stage}" + (f" with offload {current.offload}" if current.offload != "none" else "")
    return (
        f"this run uses {now}, but {flags} also fits this GPU ({reserved / GIB:.1f} GiB reserved by the estimate) "
        f"and should train about {speed / current_throughput:.1f}x faster (slowdowns measured on an H100, "
        "benchmarks/RESULTS.md)"
    )
