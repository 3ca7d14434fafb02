"""speed.grids_on_cpu: the model gets the image grids in CPU memory, whatever device the batch was moved to."""

from __future__ import annotations

import torch
from torch import nn

from vlmtune.speed.cpu_grids import grids_on_cpu, grids_to_cpu


class _OnDevice:
    """A tensor stand-in that says it lives on a GPU and records being copied to the CPU."""

    device = torch.device("cuda", 0)

    def __init__(self) -> None:
        self.copied = 0

    def cpu(self) -> torch.Tensor:
        self.copied += 1
        return torch.tensor([[1, 4, 4]])


class _Seen(nn.Module):
    def forward(self, input_ids=None, image_grid_thw=None, video_grid_thw=None):
        self.grid = image_grid_thw
        return input_ids


def test_the_hook_copies_only_grids_that_are_not_on_the_cpu():
    gpu_grid, ids, cpu_grid = _OnDevice(), torch.zeros(2), torch.tensor([[1, 2, 2]])
    _, kwargs = grids_to_cpu(None, (), {"image_grid_thw": gpu_grid, "input_ids": ids, "video_grid_thw": cpu_grid})
    assert gpu_grid.copied == 1 and kwargs["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert kwargs["input_ids"] is ids and kwargs["video_grid_thw"] is cpu_grid


class _Wrapper(nn.Module):
    """Like ...ForConditionalGeneration: calls its inner model with keyword arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Seen()

    def forward(self, **kwargs):
        return self.model(**kwargs)


def test_installed_on_the_inner_model_and_removable(monkeypatch):
    wrapper = _Wrapper()
    model = wrapper.model
    assert "on the CPU" in grids_on_cpu(wrapper, "sdpa", "cpu")
    assert "flash-attention" in grids_on_cpu(wrapper, "flash_attention_2", "cuda")
    handle = grids_on_cpu(wrapper, "sdpa", "cuda")
    grid = _OnDevice()
    wrapper.forward(input_ids=torch.zeros(1), image_grid_thw=grid)  # as PEFT calls it: the wrapper's forward itself
    assert grid.copied == 1 and isinstance(model.grid, torch.Tensor)
    handle.remove()
    grid = _OnDevice()
    wrapper.forward(input_ids=torch.zeros(1), image_grid_thw=grid)
    assert grid.copied == 0 and model.grid is grid
