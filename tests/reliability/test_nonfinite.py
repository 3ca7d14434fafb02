"""A nan/inf loss, gradient or weight during training: the run stops (or skips the step) and nothing non-finite is
saved. Faults are injected by callbacks on tiny CPU runs (a non-finite learning rate is refused at validation)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import vlmtune.train.engine as engine
import vlmtune.train.nonfinite as nonfinite
from vlmtune.cli.main import main
from vlmtune.config.loader import save_config
from vlmtune.train.engine import train
from vlmtune.train.nonfinite import NonFiniteError
from vlmtune.train.result import TrainResult

NAN = float("nan")


def _trainable(model: torch.nn.Module) -> torch.nn.Parameter:
    return next(p for p in model.parameters() if p.requires_grad)


class PoisonLoss(TrainerCallback):
    """The model's loss becomes nan on the given (1-based) steps; the hook runs before any other forward hook."""

    def __init__(self, steps: set[int]):
        self.steps, self.active = steps, False

    def on_train_begin(self, args, state, control, model=None, **kw):
        model.register_forward_hook(self._poison, prepend=True)

    def on_step_begin(self, args, state, control, **kw):
        self.active = state.global_step + 1 in self.steps

    def _poison(self, module, inputs, output):
        if self.active and module.training:
            output["loss"] = output["loss"] * NAN
        return output


class PoisonWeight(TrainerCallback):
    """A trainable weight becomes `value` at the start of `step` (before its forward) or, with at_end, after the
    update of `step` (before that step's checkpoint): an update that overflowed."""

    def __init__(self, step: int, value: float = NAN, at_end: bool = False):
        self.step, self.value, self.at_end = step, value, at_end

    def _poison(self, model):
        with torch.no_grad():
            _trainable(model).view(-1)[0] = self.value

    def on_step_begin(self, args, state, control, model=None, **kw):
        if not self.at_end and state.global_step + 1 == self.step:
            self._poison(model)

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.at_end and state.global_step == self.step:
            self._poison(model)


class PoisonGradient(TrainerCallback):
    """One trainable weight's gradient becomes nan on `step`; the loss stays finite."""

    def __init__(self, step: int):
        self.step, self.handle = step, None

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step + 1 == self.step:
            self.handle = _trainable(model).register_hook(lambda grad: grad * NAN)

    def on_step_end(self, args, state, control, **kw):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class WatchStep(TrainerCallback):
    """Copies of the trainable weights before and after one step."""

    def __init__(self, step: int):
        self.step, self.before, self.after = step, None, None

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step + 1 == self.step:
            self.before = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.step:
            self.after = [p.detach().clone() for p in model.parameters() if p.requires_grad]


def _events(out: Path) -> list[dict]:
    lines = (out / engine.LOG_FILE).read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == "nonfinite"]


def _all_finite(folder: Path) -> bool:
    tensors = load_file(str(next(folder.glob("*.safetensors"))))
    return bool(tensors) and all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.slow
@pytest.mark.reliability("settings")
def test_nan_loss_stops_through_the_cli_and_keeps_the_last_good_checkpoint(run_config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    config = save_config(run_config(out=out, training={"save_steps": 2}), tmp_path / "config.yaml")
    monkeypatch.setattr(engine, "train", functools.partial(train, callbacks=[PoisonWeight(step=4)]))
    code = main(["train", str(config)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert "training stopped at step 4: the loss was nan" in err and "checkpoint-2" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert _all_finite(out / "checkpoint-2")
    assert not (out / "final").exists()
    assert [(e["step"], e["action"]) for e in _events(out)] == [(4, "stopped")]


@pytest.mark.slow
@pytest.mark.reliability("settings")
def test_nan_gradient_alone_stops_the_run(run_config, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="step 3: the gradient norm was nan") as info:
        train(run_config(out=out), callbacks=[PoisonGradient(step=3)])
    assert "no checkpoint was written before it" in str(info.value)
    assert not (out / "final").exists()


@pytest.mark.slow
@pytest.mark.reliability("settings")
def test_weights_overflowed_by_an_update_are_never_checkpointed(run_config, tmp_path):
    out = tmp_path / "run"
    config = run_config(out=out, training={"save_steps": 2})
    with pytest.raises(NonFiniteError, match=r"became non-finite in the update of step 4"):
        train(config, callbacks=[PoisonWeight(step=4, value=float("inf"), at_end=True)])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "final").exists()


@pytest.mark.slow
@pytest.mark.reliability("settings")
def test_skip_drops_the_step_and_the_run_finishes(run_config, tmp_path):
    out = tmp_path / "run"
    watch = WatchStep(3)
    result = train(run_config(out=out, training={"on_nonfinite": "skip"}), callbacks=[PoisonLoss({3}), watch])
    assert result.steps == 6 and result.skipped_steps == 1
    assert "skipped steps" in result.summary()
    assert all(torch.equal(a, b) for a, b in zip(watch.before, watch.after, strict=True))  # no update at step 3
    assert [(e["step"], e["action"], e["skipped_steps"]) for e in _events(out)] == [(3, "skipped", 1)]
    assert _all_finite(result.final_dir)


@pytest.mark.slow
@pytest.mark.reliability("settings")
def test_skip_stops_after_too_many_bad_steps_in_a_row(run_config, tmp_path, monkeypatch):
    monkeypatch.setattr(nonfinite, "MAX_CONSECUTIVE", 3)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"step 5: the loss was nan and the gradient norm was nan \(3 bad steps in a row\)"):
        train(run_config(out=out, training={"on_nonfinite": "skip"}), callbacks=[PoisonLoss({1, 3, 4, 5})])
    # step 2 was good: the count restarts
    assert [(e["step"], e["action"]) for e in _events(out)] == [
        (1, "skipped"), (3, "skipped"), (4, "skipped"), (5, "stopped")]
    assert not (out / "final").exists()


@pytest.mark.slow
def test_a_run_shorter_than_one_logging_interval_reports_its_loss(run_config, tmp_path):
    result = train(run_config(out=tmp_path / "run", training={"max_steps": 3, "logging_steps": 10}))
    assert result.train_loss_first is None and result.train_loss_mean is not None
    summary = result.summary()
    assert "n/a" not in summary and f"{result.train_loss_mean:.4f}" in summary


def test_summary_reads_the_last_run_of_the_log(tmp_path):
    log = tmp_path / "train_log.jsonl"
    records = [{"event": "start"}, {"event": "nonfinite", "action": "skipped"}, {"train_loss": 9.0},
               {"event": "start"}, {"step": 1, "loss": NAN}, {"event": "nonfinite", "action": "skipped"},
               {"event": "nonfinite", "action": "skipped"}, {"train_loss": 1.25}]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n{broken\n")
    result = TrainResult(output_dir=tmp_path, final_dir=tmp_path / "final", config_path=tmp_path / "config.yaml",
                         log_path=log, method="lora", family="qwen2_vl", steps=3, seconds=1.0,
                         train_loss_first=None, train_loss_last=None)
    assert (result.train_loss_mean, result.skipped_steps) == (1.25, 2)
    assert "train loss 1.2500 (average" in result.summary() and "skipped steps" in result.summary()
