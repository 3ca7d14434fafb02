"""The GPU this process trains on, as PyTorch sees it: free and total memory, the allocator's cap and expandable
segments, measured peaks.

The only part of the memory preflight that touches CUDA; tests replace these functions with a fake GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlmtune.memory.allocator_setting import AllocatorSetting, resolve_allocator
from vlmtune.memory.gpus import GIB

if TYPE_CHECKING:
    from vlmtune.config.schema import VlmtuneConfig


@dataclass(frozen=True)
class GpuMemory:
    """The GPU this process trains on, as PyTorch sees it before the model loads (bytes)."""

    name: str
    total: int
    free: int
    """Free now for this run: other processes, this process's CUDA context and its live tensors are taken off."""
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


def device_index() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def read_gpu_memory(index: int) -> GpuMemory:
    """Free and total memory of CUDA device `index` (creates this process's CUDA context on it).

    Free counts the blocks this process's caching allocator reserved and no tensor uses: what an earlier run in the
    same process left cached (a notebook's or script's second `train()`), which the driver reports as taken but the
    next run reuses. Without this, a second run on an 80 GB H100 was refused after a first that had reserved 18 GiB
    ("36.25 of 79.18 GiB free", benchmarks/fp8_check.py, session 17)."""
    import torch

    free, total = torch.cuda.mem_get_info(index)
    cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    with torch.cuda.device(index):
        bf16 = torch.cuda.is_bf16_supported()
    return GpuMemory(torch.cuda.get_device_name(index), int(total), int(free + max(cached, 0)), bf16)


def apply_memory_fraction(fraction: float, index: int) -> None:
    import torch

    torch.cuda.set_per_process_memory_fraction(fraction, index)


def allocator_setting(config: VlmtuneConfig, device: str) -> AllocatorSetting:
    """hardware.expandable_segments for a run on `device` in this process's environment (the estimate reads the
    same through memory.inputs.inputs_from_config)."""
    return resolve_allocator(config.hardware.expandable_segments, device == "cuda", os.environ)


def apply_allocator_setting(setting: AllocatorSetting) -> None:
    """Set the caching allocator's expandable segments in this process, before the model allocates on the GPU
    (segments made earlier keep their kind). Each process of a torchrun or DeepSpeed launch runs the engine and sets
    its own. vlmtune shares no CUDA tensors between processes (expandable segments do not go through CUDA IPC): the
    data loader's workers hand over CPU tensors, and DeepSpeed/NCCL copy through their own buffers.

    Through the allocator's runtime setter, not the environment: PyTorch reads PYTORCH_ALLOC_CONF once, when CUDA
    initialises, and the environment is the user's (STYLE.md)."""
    if not setting.apply:
        return
    import torch

    value = f"expandable_segments:{setting.expandable}"
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # PyTorch 2.9+
    if setter is None:
        setter = torch.cuda.memory._set_allocator_settings  # PyTorch 2.4-2.8 (deprecated alias from 2.9 on)
    setter(value)


def measured_peaks() -> tuple[int, int]:
    """(max_memory_allocated, max_memory_reserved) of this process so far, bytes."""
    import torch

    return int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())


def release_loading_cache() -> int:
    """Hand the allocator's free blocks back to the driver once the model has loaded; returns the bytes released.

    Loading from disk leaves blocks behind that training does not fit into: tensors read in 16-bit, then quantized
    or cast, in segments sized for them. Runs that loaded their weights from disk reserved 0.65-1.80 GiB more than
    they allocated, against 0.07 GiB for the same settings built in place (benchmarks/RESULTS.md, 2026-12-07). Not
    under DeepSpeed, whose partitioned copies the estimator counts as staying reserved (memory/zero.py)."""
    import torch

    before = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()
    return int(before - torch.cuda.memory_reserved())
