"""Keeps DeepSpeed's partial-offload GPU optimizer on the learning-rate schedule.

With `offload_optimizer.ratio` below 1 (distributed.offload_ratio), DeepSpeed 0.19's ZeRO-3 steps the sub-groups
kept on the GPU with a second optimizer, `backup_optimizer` (torch AdamW), built once from the CPU Adam's first
parameter group (stage3.py, `self.backup_optimizer = torch.optim.AdamW(..., lr=...)`). The scheduler only ever
updates the CPU Adam's groups, so without this the GPU sub-groups train at the learning rate the run had at
start-up for the whole run: no warmup, no decay. Before every step, the backup's groups get the CPU Adam's current
hyper-parameters (everything but the parameters themselves).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

_HYPER = ("lr", "betas", "eps", "weight_decay", "amsgrad")


def zero3_optimizer(optimizer: Any) -> Any | None:
    """The DeepSpeed ZeRO-3 optimizer behind the Trainer's optimizer (accelerate wraps it), or None."""
    seen = 0
    while optimizer is not None and seen < 4:
        if hasattr(optimizer, "backup_optimizer"):
            return optimizer
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return None


def sync_backup_optimizer(zero_optimizer: Any) -> int:
    """Copy the main (CPU) optimizer's hyper-parameters into the backup (GPU) optimizer's groups; returns how many
    groups were updated."""
    backup = getattr(zero_optimizer, "backup_optimizer", None)
    main = getattr(zero_optimizer, "optimizer", None)
    if backup is None or main is None:
        return 0
    updated = 0
    for source, target in zip(main.param_groups, backup.param_groups, strict=False):
        if source is target:
            continue  # DeepSpeed adds groups after the first by reference: already in step
        for key in _HYPER:
            if key in source and key in target:
                target[key] = source[key]
        updated += 1
    return updated


class PartialOffloadSchedule(TrainerCallback):
    """Before every optimizer step (the scheduler has moved since the last one), bring the GPU sub-groups' optimizer
    to the current learning rate. A no-op when DeepSpeed runs without partial offload."""

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        zero = zero3_optimizer(kwargs.get("optimizer"))
        if zero is not None:
            sync_backup_optimizer(zero)
