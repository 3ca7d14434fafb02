"""Config -> precision plan and TrainingArguments: pure mapping, no model."""

from __future__ import annotations

import pytest
import torch

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.methods.base import resolve_precision
from vlmtune.train.args import training_arguments


def _config(tmp_path, method="lora", precision="bf16", use_cpu=False, **training) -> VlmtuneConfig:
    return VlmtuneConfig.model_validate(
        {
            "output_dir": str(tmp_path / "run"),
            "method": {"name": method},
            "training": training,
            "hardware": {"precision": precision, "use_cpu": use_cpu},
        }
    )


@pytest.mark.parametrize(
    "method, precision, cuda, dtype, bf16, fp16",
    [
        ("lora", "bf16", True, torch.bfloat16, True, False),
        ("qlora", "bf16", True, torch.bfloat16, True, False),
        ("full", "bf16", True, torch.bfloat16, True, False),
        ("lora", "fp16", True, torch.float16, False, True),
        ("full", "fp16", True, torch.float32, False, True),  # loss scaling needs fp32 master weights
        ("lora", "fp32", True, torch.float32, False, False),
        ("lora", "bf16", False, torch.float32, False, False),  # CPU: fp32, no autocast
        ("full", "fp16", False, torch.float32, False, False),
        ("qlora", "bf16", False, torch.bfloat16, False, False),  # CPU QLoRA keeps 16-bit parts 16-bit
    ],
)
def test_precision_plan(tmp_path, monkeypatch, method, precision, cuda, dtype, bf16, fp16):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    plan = resolve_precision(_config(tmp_path, method, precision))
    assert (plan.device, plan.weights_dtype, plan.bf16, plan.fp16) == (
        "cuda" if cuda else "cpu",
        dtype,
        bf16,
        fp16,
    )
    assert plan.note


def test_use_cpu_wins_over_a_visible_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision(_config(tmp_path, use_cpu=True)).device == "cpu"


def test_training_arguments_follow_the_config(tmp_path):
    config = _config(
        tmp_path,
        precision="fp32",
        use_cpu=True,
        max_steps=40,
        batch_size=3,
        gradient_accumulation_steps=2,
        learning_rate=1e-4,
        lr_scheduler="linear",
        warmup_ratio=0.1,
        eval_steps=5,
        save_steps=10,
        save_total_limit=2,
        logging_steps=4,
        report_to=["none"],
    )
    args = training_arguments(config, resolve_precision(config), has_eval=True)
    assert args.max_steps == 40 and args.per_device_train_batch_size == 3
    assert args.gradient_accumulation_steps == 2 and args.learning_rate == 1e-4
    assert args.lr_scheduler_type.value == "linear" and args.warmup_steps == pytest.approx(0.1)
    assert args.eval_strategy.value == "steps" and args.eval_steps == 5
    assert args.save_steps == 10 and args.save_total_limit == 2 and args.logging_steps == 4
    assert args.remove_unused_columns is False
    assert args.include_num_input_tokens_seen == "non_padding"
    assert args.report_to == []
    assert args.use_cpu and not args.bf16 and not args.fp16
    checkpointing = getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs
    assert checkpointing and kwargs == {"use_reentrant": False}


def test_no_eval_without_a_validation_set(tmp_path):
    config = _config(tmp_path, precision="fp32", use_cpu=True, warmup_steps=7)
    args = training_arguments(config, resolve_precision(config), has_eval=False)
    assert args.eval_strategy.value == "no" and args.warmup_steps == 7
    assert args.report_to == ["tensorboard"]


def test_checkpoint_offload_goes_to_the_trainer_on_a_gpu_and_not_on_the_cpu(tmp_path, caplog):
    """speed.checkpoint_offload keeps the checkpointed layer inputs in pinned CPU memory: on a CPU run PyTorch's
    offload cannot pin (no accelerator) and stopped the first step with a RuntimeError; there the activations already
    live in CPU memory, so it is not applied, and the log says so."""
    import logging

    from vlmtune.methods.base import PrecisionPlan

    config = _config(tmp_path, precision="fp32", use_cpu=True).model_copy(deep=True)
    config.speed.checkpoint_offload = True

    def kwargs_of(args):
        return getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs

    with caplog.at_level(logging.INFO, logger="vlmtune.train.args"):
        on_cpu = training_arguments(config, resolve_precision(config), has_eval=False)
    assert "offload" not in kwargs_of(on_cpu)
    assert "checkpoint_offload: not applied: training runs on the CPU" in caplog.text
    gpu = PrecisionPlan("cuda", torch.float32, False, False, "test: a GPU")
    cuda_config = config.model_copy(update={"hardware": config.hardware.model_copy(update={"use_cpu": False})})
    assert kwargs_of(training_arguments(cuda_config, gpu, has_eval=False))["offload"] is True
