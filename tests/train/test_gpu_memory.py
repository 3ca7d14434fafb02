"""train/gpu_memory.read_gpu_memory: what a run may use of the GPU it is about to train on."""

from __future__ import annotations

import contextlib

import torch

from vlmtune.memory.gpus import GIB
from vlmtune.train import gpu_memory


def _fake_cuda(monkeypatch, free: float, total: float, reserved: float, allocated: float) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (int(free * GIB), int(total * GIB)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: int(reserved * GIB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: int(allocated * GIB))
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA H100 80GB HBM3")


def test_cached_blocks_of_an_earlier_run_in_this_process_count_as_free(monkeypatch):
    # as on the H100 of session 17: a first train() left 18 GiB reserved and nothing allocated in the allocator's cache
    _fake_cuda(monkeypatch, free=36.25, total=79.18, reserved=18.0, allocated=0.0)
    gpu = gpu_memory.read_gpu_memory(0)
    assert round(gpu.free / GIB, 2) == 54.25
    assert gpu.available == gpu.free
    assert "54.25 of 79.18 GiB free" in gpu.describe()


def test_live_tensors_stay_taken(monkeypatch):
    _fake_cuda(monkeypatch, free=36.25, total=79.18, reserved=18.0, allocated=17.5)
    assert round(gpu_memory.read_gpu_memory(0).free / GIB, 2) == 36.75
    _fake_cuda(monkeypatch, free=60.0, total=79.18, reserved=0.0, allocated=0.0)  # a fresh process: as the driver says
    assert round(gpu_memory.read_gpu_memory(0).free / GIB, 2) == 60.0
