"""A CUDA out-of-memory error in training, told as the estimate, the measured peak and settings that would fit."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmtune.memory.gpus import GIB
from vlmtune.train.fit_advice import advice
from vlmtune.train.gpu_memory import measured_peaks

if TYPE_CHECKING:
    from vlmtune.train.preflight import PreflightResult

OOM_MARGIN = 0.20
"""After an out-of-memory error the estimate has missed once: the advice leaves a wider margin."""


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
