"""What is special about Qwen3-VL MoE, on its tiny model (4 fused experts, 2 per token): LoRA on the fused 3-D expert
parameters through PEFT's target_parameters (trained, merged equal to the adapter's outputs), the router left
frozen, why QLoRA keeps the experts 16-bit, and the 30B-A3B architecture against the catalogue."""

from __future__ import annotations

import pytest
import torch

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.families import get_family
from vlmtune.methods.base import PrecisionPlan
from vlmtune.methods.lora import add_adapters, lora_parameter_names

FAMILY = get_family("qwen3_vl_moe")
_FP32 = PrecisionPlan(device="cpu", weights_dtype=torch.float32, bf16=False, fp16=False, note="")


@pytest.fixture(scope="module")
def tiny_path(tiny_model_dir):
    return tiny_model_dir("qwen3_vl_moe")


def _model(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path)


def _config(path, targets: str) -> VlmtuneConfig:
    return VlmtuneConfig.model_validate({"model": {"name_or_path": str(path)}, "method": {
        "name": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": targets}}})


def test_every_layer_is_sparse_with_fused_experts(tiny_path):
    model = _model(tiny_path)
    for layer in model.model.language_model.layers:
        assert layer.mlp.experts.gate_up_proj.dim() == 3 and layer.mlp.experts.down_proj.dim() == 3
        assert not any(isinstance(m, torch.nn.Linear) for m in layer.mlp.modules())


@pytest.mark.parametrize("targets, experts", [("attention", 0), ("all", 2 * 2)])
def test_target_sets(tiny_path, targets, experts):
    model = _model(tiny_path)
    names = lora_parameter_names(model, _config(tiny_path, targets), FAMILY)
    assert len(names) == experts and all(".mlp.experts." in n for n in names)
    assert not any("mlp.gate" in n for n in names)  # the router stays frozen


def test_expert_adapters_train_and_merge_equal(tiny_path):
    torch.manual_seed(0)
    model = add_adapters(_model(tiny_path), _config(tiny_path, "all"), FAMILY, _FP32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".mlp.experts." in n and "lora_A" in n for n in trainable)
    assert not any("mlp.gate." in n for n in trainable)
    ids = torch.randint(10, 100, (2, 16))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    expert_b = [p for n, p in model.named_parameters() if ".mlp.experts." in n and "lora_B" in n]
    assert expert_b and all(p.abs().sum() > 0 for p in expert_b)  # the expert updates moved off zero
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_qlora_is_experimental_and_expert_adapters_refuse_dropout():
    config = VlmtuneConfig.model_validate({"model": {"name_or_path": "x"}, "method": {"name": "qlora"}})
    assert FAMILY.check(config) == []  # the default dropout becomes 0 for the expert adapters (methods/lora.py)
    assert any("expert" in n and "16-bit" in n for n in FAMILY.notes(config))
    config = VlmtuneConfig.model_validate({"model": {"name_or_path": "x"}, "method": {
        "name": "lora", "lora": {"dropout": 0.1}}})
    assert FAMILY.check(config) == ["method.lora.dropout=0.1: target_modules='all' adapts qwen3_vl_moe's parameters "
                                    "['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'] through PEFT's "
                                    "target_parameters, which takes no dropout; set method.lora.dropout: 0 (the "
                                    "default for it), or target_modules: attention"]
    attention = config.model_copy(update={"method": config.method.model_copy(update={
        "lora": config.method.lora.model_copy(update={"target_modules": "attention"})})})
    assert FAMILY.check(attention) == []


def test_the_30b_a3b_architecture_is_the_catalogues(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.memory.catalogue import lookup_model
    from vlmtune.memory.params import count_params

    spec = lookup_model("Qwen/Qwen3-VL-30B-A3B-Instruct")
    assert spec.model_type == "qwen3_vl_moe" and count_params(spec).total == spec.params
    config = AutoConfig.from_pretrained(FAMILY.build_tiny(tmp_path / "30b", arch="30b-a3b"))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == spec.params


def test_zero3_is_refused_with_the_reason():
    config = VlmtuneConfig.model_validate({"model": {"name_or_path": "x"}, "distributed": {"zero_stage": 3}})
    assert [p for p in FAMILY.check(config) if p.startswith("distributed.zero_stage=3")]
    assert FAMILY.check(config.model_copy(update={"distributed": config.distributed.model_copy(
        update={"zero_stage": 2})})) == []
