"""What a training run returns: where it wrote things and how it went."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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

    def summary(self) -> str:
        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.4f}"

        lines = [
            f"{self.method} fine-tuning of a {self.family} model: {self.steps} steps in {self.seconds:.1f} s"
            + (f" (resumed from {self.resumed_from.name})" if self.resumed_from else ""),
            f"  trainable parameters: {self.trainable_params:,} of {self.total_params:,}",
            f"  train loss {fmt(self.train_loss_first)} -> {fmt(self.train_loss_last)}"
            + (f", last eval loss {fmt(self.eval_loss_last)}" if self.eval_loss_last is not None else ""),
        ]
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
