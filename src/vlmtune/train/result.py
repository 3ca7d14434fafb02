"""What a training run returns: where it wrote things and how it went."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    output_dir: Path
    """The run folder: config.yaml, train_log.jsonl, checkpoints, TensorBoard logs (runs/)."""
    final_dir: Path
    """The adapter (lora/qlora) or full model (full), with the processor: loadable by `from_pretrained`."""
    config_path: Path
    log_path: Path
    method: str
    family: str
    steps: int
    """Optimizer steps completed (global step, counting the steps before a resume)."""
    seconds: float
    """Wall time of this call, model loading and data checks included."""
    train_loss_first: float | None
    train_loss_last: float | None
    eval_loss_last: float | None = None
    dropped_train: int = 0
    """Training samples dropped because an image did not fit data.max_length."""
    dropped_val: int = 0
    checkpoints: list[Path] = field(default_factory=list)
    resumed_from: Path | None = None
    trainable_params: int = 0
    total_params: int = 0
    train_loss_mean: float | None = None
    """The Trainer's average loss over this call's steps (its final `train_loss` record); read from log_path when
    not given. A run shorter than one logging interval has no other loss."""
    skipped_steps: int = 0
    """Steps whose loss or gradients were not finite and were skipped (training.on_nonfinite=skip); read from
    log_path when not given."""

    def __post_init__(self) -> None:
        if self.train_loss_mean is None or not self.skipped_steps:
            mean, skipped = read_run_log(self.log_path)
            self.train_loss_mean = self.train_loss_mean if self.train_loss_mean is not None else mean
            self.skipped_steps = self.skipped_steps or skipped

    def summary(self) -> str:
        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.4f}"

        if self.train_loss_first is not None:
            loss = f"  train loss {fmt(self.train_loss_first)} -> {fmt(self.train_loss_last)}"
        elif self.train_loss_mean is not None:  # no logging step was reached
            loss = f"  train loss {fmt(self.train_loss_mean)} (average over the run's steps)"
        else:
            loss = "  train loss n/a"
        lines = [
            f"{self.method} fine-tuning of a {self.family} model: {self.steps} steps in {self.seconds:.1f} s"
            + (f" (resumed from {self.resumed_from.name})" if self.resumed_from else ""),
            f"  trainable parameters: {self.trainable_params:,} of {self.total_params:,}",
            loss + (f", last eval loss {fmt(self.eval_loss_last)}" if self.eval_loss_last is not None else ""),
        ]
        if self.skipped_steps:
            lines.append(f"  skipped steps (non-finite loss or gradients, training.on_nonfinite=skip): "
                         f"{self.skipped_steps}")
        if self.dropped_train or self.dropped_val:
            lines.append(
                f"  dropped samples (longer than data.max_length): {self.dropped_train} train, "
                f"{self.dropped_val} val"
            )
        lines.append(f"  result: {self.final_dir}")
        lines.append(
            f"  run folder: {self.output_dir} (config.yaml, {self.log_path.name}, checkpoints, runs/)"
        )
        return "\n".join(lines)


def read_run_log(path: Path) -> tuple[float | None, int]:
    """(the last run's final train_loss, its skipped non-finite steps) from train_log.jsonl. The run's records
    follow its last `start` event (a resumed run appends to the same file)."""
    mean: float | None = None
    skipped = 0
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None, 0
    for line in lines:
        try:
            record: Any = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if record.get("event") == "start":
            mean, skipped = None, 0
        elif record.get("event") == "nonfinite" and record.get("action") == "skipped":
            skipped += 1
        elif isinstance(record.get("train_loss"), (int, float)) and math.isfinite(record["train_loss"]):
            mean = float(record["train_loss"])
    return mean, skipped
