"""The speed harness's profile report counts only the GPU's own work as busy, not the phase marks that the profiler
mirrors onto the GPU timeline."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from benchmarks.speed.profiling import _overlap, gpu_intervals

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def _event(name: str, start: float, end: float, device=CUDA, annotation: bool = False) -> SimpleNamespace:
    return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                           time_range=SimpleNamespace(start=start, end=end))


def test_phase_marks_on_the_gpu_timeline_are_not_kernels():
    events = [
        _event("phase: forward", 0, 1000, annotation=True),  # as Kineto reports a record_function on the GPU
        _event("phase: backward", 1000, 2000),  # an older torch without the flag: known by its name
        _event("ProfilerStep#3", 0, 2000, annotation=True),
        _event("ampere_sgemm", 100, 300),
        _event("Memcpy DtoH", 1500, 1600),
        _event("aten::mm", 0, 50, device=CPU),
    ]
    kernels = gpu_intervals(events)
    assert kernels == [(100, 300), (1500, 1600)]
    assert _overlap(kernels, 0, 2000) == 300  # 15% busy, not 100%
