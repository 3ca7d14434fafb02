"""vlmtune's side of a benchmark run: `vlmtune.train.engine.train(config)` itself, on the same JSONL, with a callback
that times every optimizer step (the engine's data pipeline runs in dataloader workers, as it should on a GPU box)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from benchmarks.speed.data import data_config
from benchmarks.speed.measure import StepMeter, reset_peaks
from benchmarks.speed.workloads import MAX_LENGTH, Variant, Workload


class StepTimer(TrainerCallback):
    def __init__(self, warmup: int):
        self.meter = StepMeter(warmup)
        self._seen = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        reset_peaks()
        self._seen = state.num_input_tokens_seen
        self.meter.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.meter.step(state.num_input_tokens_seen - self._seen)
        self._seen = state.num_input_tokens_seen


def config_dict(
    work: Workload, variant: Variant, model_dir: Path, train_path: Path, out: Path
) -> dict[str, Any]:
    data = data_config(MAX_LENGTH[work.spread], work.image_side, work.spread).model_dump(exclude_unset=True)
    return {
        "output_dir": str(out),
        "model": {"name_or_path": str(model_dir), "random_init": True},
        "data": {
            **{k: v for k, v in data.items() if v is not None},
            "train_path": str(train_path),
            "check_before_training": False,
        },
        "method": {
            "name": work.method,
            "lora": {"rank": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all"},
        },
        "training": {
            "batch_size": variant.batch or work.batch,
            "max_steps": work.warmup + work.steps,
            "learning_rate": 1e-4,
            "optimizer": "adamw_torch_fused",
            "logging_steps": 5,
            "save_steps": 100_000,
            "eval_steps": None,
            "report_to": ["none"],
            "warmup_steps": 0,
        },
        "hardware": {
            "precision": "bf16",
            "gradient_checkpointing": variant.gc,
            "attn_implementation": "sdpa",
            "dataloader_workers": 4,
        },
        # eager unless the variant asks for compile (auto would decide by the run's length: 13 steps stay eager);
        # every layer checkpointed (with gc) unless the variant sets n (auto would choose n from the GPU's memory)
        "speed": {"compile": False, "checkpoint_every_n_layers": 1},
    }


def train(
    work: Workload,
    variant: Variant,
    model_dir: Path,
    train_path: Path,
    out: Path,
    callbacks: list[TrainerCallback] | None = None,
) -> dict[str, Any]:
    """callbacks: extra ones, called before the step timer (the profiler's, so the timer's sync is inside a step)."""
    from vlmtune.config.loader import load_config
    from vlmtune.train.engine import train as vlmtune_train

    overrides = [f"{k}={v}" for k, v in variant.overrides.items()]
    config = load_config(
        None, overrides=overrides, base=config_dict(work, variant, model_dir, train_path, out)
    )
    timer = StepTimer(work.warmup)
    shutil.rmtree(out, ignore_errors=True)
    try:
        result = vlmtune_train(config, callbacks=[*(callbacks or []), timer])
        speed = _speed_event(result.log_path)
        estimate = _event(result.log_path, "memory_preflight")
    finally:  # checkpoints of a full fine-tuning run are tens of GB: the disk would not hold the next ones
        shutil.rmtree(out, ignore_errors=True)
    return {
        **timer.meter.summary(),
        "loss_first": result.train_loss_first,
        "loss_last": result.train_loss_last,
        "trainable_params": result.trainable_params,
        "config_overrides": variant.overrides,
        "speed": speed,
        # what the run's preflight printed (GPU, main process): compared with the nvidia-smi peak in the report
        "estimate_total_gib": estimate.get("estimate_total_gib"),
        "estimate_reserved_gib": estimate.get("estimate_reserved_gib"),
        # what checkpointing the run trained with (speed.checkpoint_every_n_layers=auto's choice and reason)
        "checkpoint_every_n_layers": estimate.get("checkpoint_every_n_layers"),
        "checkpointing": estimate.get("checkpointing"),
    }


def _event(log_path: Path, name: str) -> dict[str, Any]:
    """The first `name` event of the run's log ({} when the run wrote none)."""
    import json

    for line in Path(log_path).read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == name:
            return record
    return {}


def _speed_event(log_path: Path) -> Any:
    """What apply_speed switched on / skipped, from the run's start event (the run folder is deleted after)."""
    import json

    for line in Path(log_path).read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "start":
            return record.get("speed")
    return None
