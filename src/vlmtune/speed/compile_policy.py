"""Whether a run compiles its decoder layers (`speed.compile`: true, false or auto, the default).

auto compiles where it was measured to pay (benchmarks/RESULTS.md, session 7, one H100, median step against the same
run eager: W1 LoRA 2B, W2 QLoRA 7B, W3 LoRA 7B, W4 full 2B, W5 padded and packed rows; it was faster in every one)
and stays eager where it was not measured or cannot run: no CUDA GPU, a GPU older than compute capability 7.0
(Triton's floor), no Triton, several processes or DeepSpeed, a run too short to pay back the compilation (about
38 s for a 2B model in a first run on a machine, at the first steps), a family whose layers say they should stay
eager (FamilyDescriptor.compile_refusal: linear-attention layers on transformers' PyTorch reference), or a memory
estimate within 10% of the GPU's memory. The decision and its reason go into the run's log.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.families.base import FamilyDescriptor

MIN_STEPS = 500
"""auto compiles runs of at least this many optimizer steps. Measured on an H100 (W1, Qwen2-VL-2B LoRA, no
checkpointing, the smallest per-step gain measured): compiling cost about 38 s in a first run on a machine (12 s with
inductor's cache from an earlier run) and saved about 0.08 s per step, so a whole 300-step run took 94.9 s against
90.6 s eager (0.96x) and a cached one 69.1 s (1.31x). From 500 steps a first run gains too."""

MIN_CAPABILITY = (7, 0)
"""Triton's oldest supported GPU generation (Volta)."""


@dataclass(frozen=True)
class CompileDecision:
    on: bool
    reason: str
    auto: bool
    """Decided by speed.compile=auto (then a compiler failure falls back to eager instead of stopping the run)."""


def optimizer_steps(config: VlmtuneConfig, samples: int, world: int) -> int:
    """Optimizer steps of the run: training.max_steps, else the epochs over `samples` (the training set's rows:
    packed rows where packing, each holding several samples)."""
    if config.training.max_steps is not None:
        return config.training.max_steps
    batch = config.training.batch_size if isinstance(config.training.batch_size, int) else 1
    per_step = batch * config.training.gradient_accumulation_steps * max(world, 1)
    return max(1, int(config.training.epochs * -(-samples // per_step)))


def decide_compile(
    config: VlmtuneConfig,
    device: str,
    world: int = 1,
    steps: int | None = None,
    deepspeed: bool = False,
    tight_memory: str | None = None,
    span_layers: tuple[str, ...] = (),
    layer_refusal: str | None = None,
) -> CompileDecision:
    """`steps`: the run's optimizer steps when known (None: not counted, taken as long enough). `tight_memory`: why
    the memory estimate leaves little room on the GPU, when it does (auto then stays eager: compiling raised the
    reserved memory by 0.6-0.8 GiB on batches of varying shape, H100 W5, session 7). `span_layers`: the family's
    layers that packed rows run once per sample (FamilyDescriptor.packed_span_modules). `layer_refusal`: why the
    family's layers should stay eager on this device (FamilyDescriptor.compile_refusal), when they should."""
    setting = config.speed.compile
    if setting is True:
        return CompileDecision(True, "speed.compile=true", auto=False)
    if setting is False:
        return CompileDecision(False, "speed.compile=false", auto=False)
    spans = (
        f"packed rows run the {'/'.join(span_layers)} layers once per sample, a Python loop over each row's sample "
        "boundaries that torch.compile would specialise on and recompile for every new packing layout (set "
        "speed.compile=true to compile anyway)"
        if config.speed.packing and span_layers
        else None
    )
    why_not = spans or _auto_refusal(device, world, steps, deepspeed) or layer_refusal or (
        f"{tight_memory}; compiling can add up to 0.8 GiB of reserved memory on batches of varying shape, so a "
        "run this close to the GPU's memory stays eager (set speed.compile=true to compile anyway)"
        if tight_memory
        else None
    )
    if why_not:
        return CompileDecision(False, f"speed.compile=auto stays eager: {why_not}", auto=True)
    where = f"{steps} steps" if steps is not None else "step count not known"
    return CompileDecision(
        True,
        f"speed.compile=auto compiles ({_gpu_name(device)}, {where}); the first steps compile the decoder layers "
        "(about 40 s, 12 s with inductor's cache from an earlier run)",
        auto=True,
    )


def auto_compiles(
    config: VlmtuneConfig,
    device: str,
    family: FamilyDescriptor,
    world: int = 1,
    steps: int | None = None,
    deepspeed: bool = False,
) -> bool:
    """Whether speed.compile=auto compiles this run, memory aside: decide_compile as apply_speed asks it, before the
    memory estimate is known. The memory preflight estimates such a run with compiled layers (train/preflight.py);
    where that estimate leaves little room, decide_compile stays eager and so does the preflight. False for
    speed.compile true or false (true is estimated compiled from the config itself)."""
    if config.speed.compile != "auto":
        return False
    return decide_compile(config, device, world, steps, deepspeed, None, family.packed_span_modules,
                          layer_refusal=family.compile_refusal(device)).on


def _auto_refusal(device: str, world: int, steps: int | None, deepspeed: bool) -> str | None:
    if not device.startswith("cuda"):
        return f"no CUDA GPU (device {device}; compiling was measured to pay only on GPUs)"
    import torch

    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"the GPU has compute capability {capability[0]}.{capability[1]}; Triton, which torch.compile "
                f"generates kernels with, needs {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer")
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (torch.compile needs it for GPU kernels); install it or set speed.compile=false"
    if not _c_compiler():
        return ("no C compiler on PATH (Triton builds its kernel launchers with one: install gcc or set CC); "
                "set speed.compile=true to try anyway")
    if world > 1 or deepspeed:
        return ("several processes or DeepSpeed: not measured under torch.compile yet; set speed.compile=true to "
                "compile anyway")
    if steps is not None and steps < MIN_STEPS:
        return (f"{steps} optimizer steps is too short for the compilation (about 40 s at the start) to pay back "
                f"(auto compiles from {MIN_STEPS}); set speed.compile=true to compile anyway")
    return None


def _c_compiler() -> str | None:
    """The C compiler Triton would use: $CC, else cc, gcc or clang on PATH."""
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((found for name in names if (found := shutil.which(name))), None)


def _gpu_name(device: str) -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"


class FallBackToEager:
    """Under auto: a frame dynamo or inductor cannot compile runs eagerly (with a warning) instead of stopping the
    run (torch._dynamo.config.suppress_errors); restored on remove()."""

    def __init__(self) -> None:
        import torch._dynamo

        self._config = torch._dynamo.config
        self._before = self._config.suppress_errors
        self._config.suppress_errors = True

    def remove(self) -> None:
        self._config.suppress_errors = self._before

