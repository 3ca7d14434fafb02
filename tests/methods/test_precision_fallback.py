"""A GPU without bf16 (T4, V100, RTX 20xx): the default hardware.precision=bf16 trains in fp16 with loss scaling
there, says so, and the estimate for such a card is made in fp16 too (full fine-tuning: fp32 master weights)."""

from __future__ import annotations

import pytest
import torch

from vlmtune.cli.main import main
from vlmtune.config.schema import VlmtuneConfig
from vlmtune.memory import EstimateInputs, estimate
from vlmtune.memory.inputs import inputs_from_config
from vlmtune.methods.base import resolve_precision


@pytest.fixture
def turing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")


@pytest.mark.parametrize(("method", "weights", "fp16"), [("lora", torch.float16, True), ("qlora", torch.float16, True),
                                                         ("full", torch.float32, True)])
def test_bf16_runs_as_fp16_on_a_card_without_it(turing, method, weights, fp16):
    plan = resolve_precision(VlmtuneConfig.model_validate({"method": {"name": method}}))
    assert plan.device == "cuda" and plan.weights_dtype == weights
    assert plan.fp16 is fp16 and plan.bf16 is False
    assert "Tesla T4 has no bf16" in plan.note


def test_a_card_with_bf16_keeps_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    plan = resolve_precision(VlmtuneConfig())
    assert plan.weights_dtype == torch.bfloat16 and plan.bf16 and not plan.fp16 and "no bf16" not in plan.note


def test_the_estimate_for_such_a_card_is_made_in_fp16(capsys):
    config = VlmtuneConfig.model_validate({"model": {"name_or_path": "Qwen/Qwen2-VL-2B-Instruct"},
                                           "method": {"name": "full"}})
    assert inputs_from_config(config, gpu="T4").precision == "fp16"
    assert inputs_from_config(config, gpu="A100 40GB").precision == "bf16"
    assert inputs_from_config(config.model_copy(update={"hardware": config.hardware.model_copy(
        update={"precision": "fp32"})}), gpu="T4").precision == "fp32"  # an explicit choice stays
    t4 = estimate(inputs_from_config(config, gpu="T4"))
    a100 = estimate(EstimateInputs(model="Qwen/Qwen2-VL-2B-Instruct", method="full", gpu="A100 40GB"))
    assert t4.peak_total > a100.peak_total * 1.4  # fp32 master weights, gradients and fp32 Adam inputs
    assert main(["estimate", "--model", "Qwen/Qwen2-VL-2B-Instruct", "--gpu", "T4"]) == 0
    out = capsys.readouterr().out
    assert ", fp16," in out and "T4 16GB has no bf16: estimated in fp16" in out


def test_qlora_computes_in_fp16_there(turing):
    from vlmtune.families import get_family
    from vlmtune.methods.qlora import bnb_config

    config = VlmtuneConfig.model_validate({"method": {"name": "qlora"}})
    assert bnb_config(config, get_family("qwen2_vl")).bnb_4bit_compute_dtype == torch.float16
