"""Checkpoints: an interrupted run resumes at the right step with the same next batches and losses as a run that
never stopped; rotation keeps the last K; a checkpoint that failed half-way is never picked up."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from transformers import TrainerCallback

import vlmtune.data.collate as collate
from vlmtune.errors import VlmtuneError
from vlmtune.train.engine import train
from vlmtune.train.saving import find_checkpoints
from vlmtune.train.trainer import VlmTrainer


class StopAt(TrainerCallback):
    """Stops training after `step` (the checkpoint of that step is written first), like a killed job."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.fixture
def batches(monkeypatch) -> list[torch.Tensor]:
    """input_ids of every batch the engine's collator builds, in order."""
    seen: list[torch.Tensor] = []

    class Recording(collate.Collator):
        def __call__(self, samples):
            batch = super().__call__(samples)
            seen.append(batch["input_ids"].clone())
            return batch

    monkeypatch.setattr(collate, "Collator", Recording)
    return seen


def _losses(result) -> dict[int, float]:
    logs = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    return {e["step"]: e["loss"] for e in logs if "loss" in e}


@pytest.mark.slow
def test_resume_continues_with_the_same_batches_and_losses(run_config, batches, tmp_path):
    # Dropout stays on (0.05): the RNG state must be restored too. Two checkpoints kept of one per step.
    training = {"max_steps": 4, "save_steps": 1, "save_total_limit": 2}
    whole = train(run_config(out=tmp_path / "whole", training=training))
    whole_batches = list(batches[:4])
    assert [p.name for p in whole.checkpoints] == ["checkpoint-3", "checkpoint-4"]  # rotation keeps K=2
    assert not (tmp_path / "whole" / ".staging").exists()

    batches.clear()
    config = run_config(out=tmp_path / "split", training=training)
    first = train(config, callbacks=[StopAt(2)])
    assert first.steps == 2 and [p.name for p in first.checkpoints] == ["checkpoint-1", "checkpoint-2"]
    with pytest.raises(VlmtuneError, match="already holds checkpoints"):
        train(config)  # a fresh run must not silently mix with an old one

    batches.clear()
    resumed = train(config, resume=True)
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "checkpoint-2"
    assert resumed.steps == 4
    for got, want in zip(batches[:2], whole_batches[2:], strict=True):
        assert torch.equal(got, want)
    whole_losses, split_losses = _losses(whole), _losses(resumed)
    assert sorted(split_losses) == [1, 2, 3, 4]
    for step in (3, 4):
        assert split_losses[step] == pytest.approx(whole_losses[step], abs=1e-6), step


@pytest.mark.slow
def test_a_checkpoint_that_fails_half_way_is_invisible(run_config, monkeypatch, tmp_path):
    original = VlmTrainer._save_rng_state

    def fail_at_step_2(self, output_dir):
        if self.state.global_step == 2:
            raise OSError(errno.EIO, "Input/output error")  # a full disk has its own test (reliability/)
        original(self, output_dir)

    monkeypatch.setattr(VlmTrainer, "_save_rng_state", fail_at_step_2)
    config = run_config(out=tmp_path / "run", training={"max_steps": 3, "save_steps": 1})
    with pytest.raises(OSError, match="Input/output"):
        train(config)
    out = tmp_path / "run"
    assert not (out / "checkpoint-2").exists()  # the model and optimizer of step 2 were written, but not here
    assert [p.name for p in find_checkpoints(out)] == ["checkpoint-1"]

    monkeypatch.setattr(VlmTrainer, "_save_rng_state", original)
    resumed = train(config, resume=True)
    assert resumed.resumed_from.name == "checkpoint-1" and resumed.steps == 3
    assert not (out / ".staging").exists()


def test_resume_without_checkpoints_is_a_clear_error(run_config, tmp_path):
    with pytest.raises(VlmtuneError, match="no checkpoint found"):
        train(run_config(out=tmp_path / "empty"), resume=True)
    with pytest.raises(VlmtuneError, match="not a checkpoint folder"):
        train(run_config(out=tmp_path / "empty"), resume=str(tmp_path))
