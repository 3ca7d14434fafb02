"""The GPU optimizer of DeepSpeed's partial offload follows the schedule (DeepSpeed builds it once, at start-up lr)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.train.engine import _deepspeed_callbacks
from vlmtune.train.partial_offload import PartialOffloadSchedule, sync_backup_optimizer, zero3_optimizer


def _zero3_like() -> SimpleNamespace:
    """What stage3.DeepSpeedZeroOptimizer_Stage3 holds under offload_optimizer.ratio < 1: the CPU optimizer with the
    Trainer's two groups (decay / no decay) and a backup AdamW built from the first group's lr, the second group
    added by reference (stage3.py)."""
    cpu = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.01},
                             {"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.0}], lr=2e-4)
    backup = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cpu.param_groups[0]["lr"],
                               weight_decay=cpu.param_groups[0]["weight_decay"])
    backup.param_groups.append(cpu.param_groups[1])
    return SimpleNamespace(optimizer=cpu, backup_optimizer=backup)


def test_backup_optimizer_follows_the_scheduler():
    zero = _zero3_like()
    schedule = torch.optim.lr_scheduler.LambdaLR(zero.optimizer, lambda step: 1.0 / (step + 1))
    wrapper = SimpleNamespace(optimizer=zero)  # accelerate's DeepSpeedOptimizerWrapper
    assert zero3_optimizer(wrapper) is zero and zero3_optimizer(zero.optimizer) is None
    callback = PartialOffloadSchedule()
    for step in range(3):
        callback.on_step_begin(None, None, None, optimizer=wrapper)
        assert zero.backup_optimizer.param_groups[0]["lr"] == zero.optimizer.param_groups[0]["lr"] == 2e-4 / (step + 1)
        assert zero.backup_optimizer.param_groups[0]["weight_decay"] == 0.01
        assert len(zero.backup_optimizer.param_groups[0]["params"]) == 1  # its own parameters are left alone
        schedule.step()
    assert sync_backup_optimizer(SimpleNamespace(optimizer=zero.optimizer)) == 0  # no partial offload: nothing


def test_engine_adds_it_only_for_partial_offload():
    partial = VlmtuneConfig.model_validate({"distributed": {"zero_stage": 3, "offload": "optimizer",
                                                            "offload_ratio": 0.5}})
    whole = VlmtuneConfig.model_validate({"distributed": {"zero_stage": 3, "offload": "optimizer"}})
    assert [type(c) for c in _deepspeed_callbacks(partial, {"zero_optimization": {}}, 1)] == [PartialOffloadSchedule]
    assert _deepspeed_callbacks(whole, {"zero_optimization": {}}, 1) == []
    assert _deepspeed_callbacks(partial, None, 1) == []  # DeepSpeed not in use
