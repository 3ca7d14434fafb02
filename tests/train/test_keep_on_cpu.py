"""speed.grid_on_cpu: the Trainer moves the batch to the device except the image grids."""

from __future__ import annotations

import torch
from transformers import Trainer

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.train.engine import GRID_KEYS
from vlmtune.train.trainer import VlmTrainer


def test_grids_skip_the_device_move(monkeypatch):
    moved: list[list[str]] = []

    def fake_prepare(self, inputs):  # the Trainer's move to the device, recorded
        moved.append(sorted(inputs))
        return {k: v + 1 for k, v in inputs.items()}

    monkeypatch.setattr(Trainer, "_prepare_inputs", fake_prepare)
    trainer = object.__new__(VlmTrainer)
    batch = {"input_ids": torch.zeros(2), "image_grid_thw": torch.tensor([[1, 4, 4]]), "pixel_values": torch.ones(2)}
    trainer._keep_on_cpu = GRID_KEYS
    out = trainer._prepare_inputs(batch)
    assert moved == [["input_ids", "pixel_values"]]
    assert out["image_grid_thw"] is batch["image_grid_thw"] and out["input_ids"].tolist() == [1, 1]
    trainer._keep_on_cpu = ()
    trainer._prepare_inputs(batch)
    assert moved[-1] == ["image_grid_thw", "input_ids", "pixel_values"]  # off: everything moves
    assert VlmtuneConfig().speed.grid_on_cpu is False  # experimental until measured on a GPU
