"""The training process applies hardware.expandable_segments through the allocator's runtime setter (no GPU needed:
the setter is replaced by a recorder)."""

from __future__ import annotations

import pytest
import torch

from vlmtune.config.loader import load_config
from vlmtune.memory.allocator_setting import AllocatorSetting
from vlmtune.train import gpu_memory


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    seen: list[str] = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", seen.append, raising=False)
    return seen


def test_auto_turns_them_on_for_cuda(calls):
    setting = gpu_memory.allocator_setting(load_config(), "cuda")
    gpu_memory.apply_allocator_setting(setting)
    assert calls == ["expandable_segments:True"]
    assert setting.expandable and "auto" in setting.reason


def test_the_users_environment_is_left_alone(calls, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    setting = gpu_memory.allocator_setting(load_config(), "cuda")
    gpu_memory.apply_allocator_setting(setting)
    assert calls == [] and not setting.expandable
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False is set" in setting.reason


def test_false_sets_them_off_over_the_environment(calls, monkeypatch):
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    config = load_config(overrides=["hardware.expandable_segments=false"])
    gpu_memory.apply_allocator_setting(gpu_memory.allocator_setting(config, "cuda"))
    assert calls == ["expandable_segments:False"]


def test_nothing_is_set_on_the_cpu(calls):
    gpu_memory.apply_allocator_setting(gpu_memory.allocator_setting(load_config(), "cpu"))
    assert calls == []


def test_older_pytorch_goes_through_the_cuda_setter(monkeypatch):
    seen: list[str] = []
    monkeypatch.delattr(torch._C, "_accelerator_setAllocatorSettings", raising=False)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", seen.append)
    gpu_memory.apply_allocator_setting(AllocatorSetting(True, "config", "on"))
    assert seen == ["expandable_segments:True"]
