"""The typed config mapped onto `transformers.TrainingArguments`: the only place the two vocabularies meet."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from transformers import TrainingArguments

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.errors import require
from vlmtune.methods.base import PrecisionPlan

log = logging.getLogger(__name__)

_OPTIMIZERS = {
    "adamw_torch": "adamw_torch",
    "adamw_torch_fused": "adamw_torch_fused",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
}


def _checkpointing_args(enabled: bool, every_n_layers: int = 1, offload: bool = False) -> dict[str, Any]:
    """transformers 5.23 renamed gradient_checkpointing to activation_checkpointing; 5.17 knows only the old name.
    Both Trainers take `every_n_layers` / `offload` out of the kwargs for the model's checkpointing_enable."""
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    if not enabled:
        return {name: False}
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if every_n_layers > 1:
        kwargs["every_n_layers"] = every_n_layers
    if offload:
        kwargs["offload"] = True
    return {name: True, f"{name}_kwargs": kwargs}


def _every(value: int | str) -> int:
    """`auto` left unresolved (the preflight resolves it; arguments built without one, e.g. by benchmarks): every layer."""
    return 1 if value == "auto" else int(value)


def training_arguments(
    config: VlmtuneConfig,
    plan: PrecisionPlan,
    has_eval: bool,
    deepspeed: dict[str, Any] | None = None,
    world: int = 1,
) -> TrainingArguments:
    """deepspeed: the run's DeepSpeed config (None: no DeepSpeed). Under ZeRO-3 call this before loading the model:
    the arguments register the config globally, and `from_pretrained` then builds the model partitioned."""
    t, hw = config.training, config.hardware
    offload = config.speed.checkpoint_offload and hw.gradient_checkpointing
    if offload and plan.device != "cuda":  # PyTorch's offload pins host memory, which needs a GPU
        log.info("speed.checkpoint_offload: not applied: training runs on the CPU, where the checkpointed layer "
                 "inputs already live in CPU memory")
        offload = False
    if t.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        require("bitsandbytes", "qlora", f"training.optimizer={t.optimizer}")
    evaluate = has_eval and t.eval_steps is not None
    args = TrainingArguments(
        output_dir=str(config.output_dir),
        run_name=config.experiment_name,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio,
        max_grad_norm=t.max_grad_norm,
        optim=_OPTIMIZERS[t.optimizer],
        seed=t.seed,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a non-finite loss is logged as it is (train/nonfinite.py stops or skips it)
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps if evaluate else None,
        save_strategy="steps" if t.save_checkpoints else "no",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=[r for r in t.report_to if r != "none"] or "none",
        bf16=plan.bf16,
        fp16=plan.fp16,
        use_cpu=plan.device == "cpu",
        dataloader_num_workers=hw.dataloader_workers,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        deepspeed=deepspeed,
        ddp_backend="gloo" if plan.device == "cpu" and world > 1 else None,
        **_checkpointing_args(hw.gradient_checkpointing, _every(config.speed.checkpoint_every_n_layers), offload),
    )
    if deepspeed is not None and plan.device == "cpu":
        _init_deepspeed_comm()
    return args


def _init_deepspeed_comm() -> None:
    """On the CPU the arguments start torch.distributed (gloo) but not DeepSpeed's communication layer, which
    ZeRO-3's partitioned model construction reads its world size from; DeepSpeed adopts the running group."""
    import deepspeed
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
