"""Method strategies on every family's tiny model: which weights train, which are quantized, in which dtype."""

from __future__ import annotations

import pytest
import torch

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.errors import ConfigError
from vlmtune.families import get_family
from vlmtune.methods import count_parameters, get_method
from vlmtune.methods.base import has_prefix

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava"]


def _config(model_dir, method: str, lora: dict | None = None, **extra) -> VlmtuneConfig:
    return VlmtuneConfig.model_validate(
        {
            "model": {"name_or_path": str(model_dir)},
            "method": {"name": method, "lora": lora or {}, **extra},
            "hardware": {"precision": "bf16" if method == "qlora" else "fp32", "use_cpu": True},
        }
    )


def _prepare(tiny_model_dir, family_name: str, method: str, lora: dict | None = None, **extra):
    family = get_family(family_name)
    config = _config(tiny_model_dir(family_name), method, lora, **extra)
    return family, get_method(config.method.name).load_and_prepare(config, family)


def _base_name(name: str) -> str:
    return name.removeprefix("base_model.model.")


def _trainable(model) -> list[str]:
    return [_base_name(n) for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("family_name", FAMILIES)
def test_lora_trains_only_language_adapters(tiny_model_dir, family_name):
    family, model = _prepare(tiny_model_dir, family_name, "lora")
    trainable = _trainable(model)
    assert trainable and all("lora_" in n for n in trainable)
    assert all(has_prefix(n, [family.language_layers_prefix]) for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == set(family.lora_targets("all"))
    assert not any(has_prefix(n, family.vision_prefixes) for n in trainable)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_lora_vision_adapters_and_trainable_projector(tiny_model_dir, family_name):
    family, model = _prepare(
        tiny_model_dir,
        family_name,
        "lora",
        {"adapt_vision_tower": True, "train_projector": True, "target_modules": "minimal"},
    )
    trainable = _trainable(model)
    vision = [n for n in trainable if has_prefix(n, [family.vision_layers_prefix])]
    assert vision and all("lora_" in n for n in vision)
    projector = [n for n in trainable if "modules_to_save" in n]
    assert projector and all(has_prefix(n, family.projector_prefixes) for n in projector)
    saved = model.peft_config["default"].modules_to_save  # a module list is saved by its items (DeepStack)
    assert {p for p in family.projector_prefixes for n in saved if has_prefix(n, [p])} == set(
        family.projector_prefixes
    ) and all(has_prefix(n, family.projector_prefixes) for n in saved)


def test_unknown_lora_target_is_a_config_error(tiny_model_dir):
    with pytest.raises(ConfigError, match="matches no linear layer.*q_proj"):
        _prepare(tiny_model_dir, "qwen2_vl", "lora", {"target_modules": ["nope_proj"]})


@pytest.mark.parametrize("family_name", FAMILIES)
def test_qlora_quantizes_only_the_language_model(tiny_model_dir, family_name):
    import bitsandbytes as bnb

    family, model = _prepare(tiny_model_dir, family_name, "qlora")
    four_bit = {_base_name(n): m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit, "nothing was quantized"
    assert all(has_prefix(n, family.language_prefixes) for n in four_bit)
    assert all(m.support_avx512bf16_for_cpu is False for m in four_bit.values())  # the CPU trap fix
    for name, module in model.named_modules():
        base = _base_name(name)
        if isinstance(module, torch.nn.Linear) and has_prefix(
            base, (*family.vision_prefixes, *family.lm_head_names)
        ):
            assert not isinstance(module, bnb.nn.Linear4bit), f"{base} was quantized"
            assert module.weight.dtype == torch.bfloat16, f"{base} is {module.weight.dtype}"
    # No prepare_model_for_kbit_training: frozen floating-point weights stay 16-bit, only adapters are fp32.
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_qlora_skip_modules_use_full_prefixes(tiny_model_dir):
    from vlmtune.methods.qlora import skip_modules

    family = get_family("qwen2_vl")
    config = _config(tiny_model_dir("qwen2_vl"), "qlora")
    assert "model.visual" in skip_modules(config, family) and "lm_head" in skip_modules(config, family)
    config.method.quantization.quantize_vision_tower = True
    assert "model.visual" not in skip_modules(config, family)
    assert "model.visual.merger" in skip_modules(config, family)  # the projector always stays 16-bit


@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("freeze", [True, False])
def test_full_freezes_vision_tower_but_not_projector(tiny_model_dir, family_name, freeze):
    family, model = _prepare(tiny_model_dir, family_name, "full", freeze_vision_tower=freeze)
    for name, param in model.named_parameters():
        component = family.component_of(name)
        expected = not (freeze and component == "vision")
        assert param.requires_grad == expected, f"{name} ({component})"
    trainable, total = count_parameters(model)
    assert 0 < trainable <= total and (trainable < total) == freeze


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_random_init_builds_the_architecture_without_reading_weights(tiny_model_dir, method):
    import bitsandbytes as bnb

    family = get_family("qwen2_vl")
    config = _config(tiny_model_dir("qwen2_vl"), method)
    config.model.random_init = True
    model = get_method(config.method.name).load_and_prepare(config, family)
    quantized = any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert quantized == (method == "qlora")
    assert count_parameters(model)[0] > 0
