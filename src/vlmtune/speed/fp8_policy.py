"""Whether a run computes its frozen LoRA base matmuls in FP8 (`speed.fp8`: auto, true or false).

auto would run FP8 on CUDA GPUs of compute capability 8.9+ (Ada, Hopper) whose PyTorch has `torch._scaled_mm`, for
LoRA runs of one process or DDP in bf16, once FP8 both keeps the loss within 1% of bf16 and is faster (`PAYS`).
Measured on an H100 (benchmarks/fp8_check.py, benchmarks/RESULTS.md 2026-12-07 sessions 12 and 17), Qwen2-VL-2B LoRA,
300 steps: the speed does not hold (0.62x bf16 on the first path, 0.60x on session 13's cheaper one: quantizing
activations and gradients costs more than the FP8 matmuls save at these widths), nor, in session 17, the loss (+1.27%
after 300 steps, +0.085% in session 12), so auto stays off everywhere and says why in the log.
true runs it wherever PyTorch can (a CPU's `_scaled_mm` included, for tests) and stops the run with the reason where
it cannot. The decision and its reason go into the run's log, as speed.compile=auto's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlmtune.errors import VlmtuneError

if TYPE_CHECKING:
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.methods.base import PrecisionPlan

PAYS = False
"""Set once the GPU check shows FP8 keeps the loss within 1% of bf16 AND runs faster (issue 21): only then does auto
switch FP8 on. H100, 2B, 300 steps: 0.62x bf16 (session 12); session 13's cheaper path (one quantization per shared
input, both e4m3 layouts kept, fused quantization; docs/SPEED.md) 0.60x with +3.6 GiB reserved and the final loss
+1.27% (session 17). The 7B widths and FP8 inside compiled layers are not measured yet."""

NOT_FASTER = (
    "fp8: off (auto): measured on an H100 (Qwen2-VL-2B LoRA, 300 steps), steps run at 0.60x bf16's speed with "
    "3.6 GiB more reserved (quantizing activations and gradients costs more than the FP8 matmuls save) and the final "
    "loss was 1.3% above bf16's; set speed.fp8=true to try it"
)

MIN_CAPABILITY = (8, 9)
"""FP8 tensor cores: Ada (8.9) and Hopper (9.0) and newer."""


@dataclass(frozen=True)
class Fp8Decision:
    on: bool
    reason: str
    auto: bool
    rowwise: bool = True
    """A scale per row (per tensor where this PyTorch has no row-wise FP8 kernel for the device)."""


def decide_fp8(config: VlmtuneConfig, plan: PrecisionPlan, deepspeed: bool = False) -> Fp8Decision:
    """auto / true / false resolved for this run (`plan`: resolve_precision's; `deepspeed`: whether the run uses
    it); speed.fp8=true that cannot run raises `VlmtuneError` naming it. One process or DDP: FP8 is per layer."""
    setting = config.speed.fp8
    if setting is False:
        return Fp8Decision(False, "speed.fp8=false", auto=False)
    forced = setting is True
    why_not = _run_refusal(config, plan, deepspeed, forced)
    rowwise, device_refusal = True, None
    if why_not is None:
        # auto before the measurement runs no probe: a default run does nothing new on the GPU
        rowwise, device_refusal = _device_support(
            plan.device, forced, run_probe=forced or PAYS, rowwise_first=config.speed.fp8_scales == "row"
        )
    why_not = why_not or device_refusal
    if setting is True:
        if why_not:
            raise VlmtuneError(f"speed.fp8=true cannot run here: {why_not}. Set speed.fp8=false (or auto).")
        scales = ("per row" if rowwise else "per tensor (speed.fp8_scales=tensor)" if config.speed.fp8_scales ==
                  "tensor" else "per tensor (no row-wise FP8 kernel here)")
        return Fp8Decision(
            True, f"fp8: on (speed.fp8=true, {_where(plan.device)}, scales {scales})", False, rowwise
        )
    if why_not:
        return Fp8Decision(False, f"fp8: off (auto): {why_not}", auto=True)
    if not PAYS:
        return Fp8Decision(False, NOT_FASTER, auto=True)
    return Fp8Decision(True, f"fp8: on (auto, {_where(plan.device)})", auto=True, rowwise=rowwise)


def _run_refusal(config: VlmtuneConfig, plan: PrecisionPlan, deepspeed: bool, forced: bool) -> str | None:
    method = config.method.name.value
    if method != "lora":
        return (
            f"method.name={method}: FP8 applies to LoRA's frozen 16-bit base layers only (QLoRA's are 4-bit, "
            "full fine-tuning trains its weights)"
        )
    if not config.speed.fused_lora:
        return "speed.fused_lora=false: the FP8 base matmuls run inside the fused LoRA layers"
    if deepspeed and not forced:
        return (
            "DeepSpeed: not measured with FP8 (auto covers one process or DDP); set speed.fp8=true to try it"
        )
    if plan.device.startswith("cuda") and not plan.bf16:
        return (
            f"the GPU computes in {'fp16' if plan.fp16 else 'fp32'} here ({plan.note}); the FP8 matmuls write "
            "bf16: set hardware.precision=bf16"
        )
    return None


def _device_support(
    device: str, forced: bool, run_probe: bool = True, rowwise_first: bool = True
) -> tuple[bool, str | None]:
    """(row-wise scales to be used, why FP8 cannot run on `device` or None). The CPU only when forced: PyTorch's CPU
    scaled matmul works (tests use it) but is no faster. `rowwise_first` (speed.fp8_scales=row): row-wise scales
    where they run, else per tensor; False: per tensor only."""
    import torch

    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return True, f"this PyTorch ({torch.__version__}) has no torch._scaled_mm / float8_e4m3fn"
    if device.startswith("cuda"):
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return True, (
                f"the GPU has compute capability {capability[0]}.{capability[1]}; FP8 matmuls need "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada) or newer (Hopper)"
            )
    elif not forced:
        return True, f"no CUDA GPU (device {device}; FP8 pays only on GPUs with FP8 tensor cores)"
    if not run_probe:
        return rowwise_first, None
    errors = []
    for rowwise in (True, False) if rowwise_first else (False,):
        error = probe(device, rowwise)
        if error is None:
            return rowwise, None
        errors.append(error)
    return rowwise_first, f"torch._scaled_mm fails on {device} ({'; '.join(errors)})"


def probe(device: str, rowwise: bool) -> str | None:
    """Run one small scaled matmul as the layers will; the error text, or None when it works."""
    import torch

    from vlmtune.speed.fp8_linear import Fp8Weight, Quantizer

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        weight = torch.randn(32, 32, device=device, dtype=dtype)
        fp8 = Fp8Weight(rowwise=rowwise, quantizer=Quantizer(fused=False)).of(weight)
        fp8.input_grad(fp8.forward(torch.randn(16, 32, device=device, dtype=dtype)))
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return f"{'row-wise' if rowwise else 'per-tensor'} scales: {str(exc).splitlines()[0][:200]}"
    return None


def _where(device: str) -> str:
    import torch

    if not device.startswith("cuda"):
        return f"{device}: PyTorch's CPU scaled matmul, for tests, not faster"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
