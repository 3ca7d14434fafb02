"""vlmtune's side of a benchmark run: `vlmtune.train.engine.train(config)` itself, on the same JSONL, with a callback
that times every optimizer step (the engine's data pipeline runs in dataloader workers, as it should on a GPU box).

The training settings are the plain loop's (plain.py), so the per-step losses compare: seed 0 (random weights built
on the GPU in bf16 after the seed, as the plain loop builds them; accelerate's sampler seeded 0, whose order the plain
loop's EpochOrder draws), constant lr 1e-4 without warmup, no weight decay, AdamW (fused) with the Trainer's default
betas (0.9, 0.999) and eps 1e-8 (torch's defaults, which the plain loop uses), clipping at 1.0, and the loss logged
at every step (the plain loop records every step's)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from benchmarks.speed.data import data_config
from benchmarks.speed.measure import StepMeter, init_fingerprint, reset_peaks
from benchmarks.speed.workloads import MAX_LENGTH, Variant, Workload


class StepTimer(TrainerCallback):
    def __init__(self, warmup: int):
        self.meter = StepMeter(warmup)
        self._seen = 0
        self.fingerprint: dict[str, float] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if kwargs.get("model") is not None:
            self.fingerprint = init_fingerprint(kwargs["model"])
        reset_peaks()
        self._seen = state.num_input_tokens_seen
        self.meter.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.meter.step(state.num_input_tokens_seen - self._seen)
        self._seen = state.num_input_tokens_seen


def config_dict(
    work: Workload, variant: Variant, model_dir: Path, train_path: Path, out: Path
) -> dict[str, Any]:
    data = data_config(MAX_LENGTH[work.spread], work.image_side, work.spread, work.family)
    data = data.model_dump(exclude_unset=True)
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
            "lr_scheduler": "constant",
            "warmup_steps": 0,
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "optimizer": "adamw_torch_fused",
            "seed": 0,
            "logging_steps": 1,
            "save_steps": 100_000,
            "eval_steps": None,
            "report_to": ["none"],
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
        start = _event(result.log_path, "start")
        estimate = _event(result.log_path, "memory_preflight")
        losses = step_losses(result.log_path)
    finally:  # checkpoints of a full fine-tuning run are tens of GB: the disk would not hold the next ones
        shutil.rmtree(out, ignore_errors=True)
    return {
        **timer.meter.summary(),
        "loss_first": losses[0] if losses else result.train_loss_first,
        "loss_last": losses[-1] if losses else result.train_loss_last,
        "losses": losses,
        "init_fingerprint": timer.fingerprint,
        "trainable_params": result.trainable_params,
        "config_overrides": variant.overrides,
        # what apply_speed switched on / skipped, and the allocator setting, from the run's start event
        "speed": start.get("speed"),
        "expandable_segments": start.get("expandable_segments"),
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


def step_losses(log_path: Path) -> list[float]:
    """The training loss of every logged step, in step order (training.logging_steps=1: every step)."""
    import json

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r["loss"] for r in records if "loss" in r and "step" in r}
    return [round(float(by_step[k]), 5) for k in sorted(by_step)]
