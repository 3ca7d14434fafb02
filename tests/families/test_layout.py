"""Module prefixes and LoRA targets, checked against the modules of the instantiated tiny models."""

from __future__ import annotations

import re

import pytest
import torch

from vlmtune.errors import ConfigError
from vlmtune.families import get_family

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "instructblip", "gemma3", "smolvlm", "qwen3_5", "internvl",
            "qwen_vl", "mllama", "qwen3_vl_moe"]
# Qwen-VL keeps its checkpoint's own layer names (fused c_attn, w1/w2/c_proj): its target sets are tested in
# test_qwen_vl.py
STANDARD_NAMES = [n for n in FAMILIES if n != "qwen_vl"]


def _model(tiny_model_dir, name: str) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir(name))


@pytest.fixture(scope="module")
def models(tiny_model_dir) -> dict[str, torch.nn.Module]:
    return {name: _model(tiny_model_dir, name) for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_prefixes_name_real_modules(models, name):
    family, model = get_family(name), models[name]
    modules = {**dict(model.named_modules()), **dict(model.named_parameters())}  # InstructBLIP's query_tokens
    for prefix in (*family.vision_prefixes, *family.projector_prefixes, *family.language_prefixes,
                   *family.lm_head_names, family.language_layers_prefix, family.vision_layers_prefix):
        assert prefix in modules, f"{name}: {prefix} is not a module"


@pytest.mark.parametrize("name", FAMILIES)
def test_partition_covers_every_parameter_once(models, name):
    family, model = get_family(name), models[name]
    parts: dict[str | None, list[str]] = {}
    for param_name, _ in model.named_parameters():
        parts.setdefault(family.component_of(param_name), []).append(param_name)
    assert None not in parts, f"unassigned parameters: {parts.get(None)}"
    assert {"vision", "projector", "language"} <= set(parts)
    assert sum(len(v) for v in parts.values()) == len(list(model.named_parameters()))
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert ("lm_head" in parts) == (not tied)  # a tied lm_head shares the embedding and is listed once
    projector_names = ("merger", "multi_modal_projector", "qformer", "query_tokens", "language_projection",
                       "connector", "attn_pool", "ln_post", "visual.proj")
    assert all(any(p in n for p in projector_names) for n in parts["projector"])
    assert family.component_of("base_model.model." + parts["language"][0]) == "language"  # PEFT-wrapped names


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


# hybrid layers: test_qwen3_5.py; fused experts (no MLP linears): test_qwen3_vl_moe.py
@pytest.mark.parametrize("name", [n for n in STANDARD_NAMES if n not in ("qwen3_5", "qwen3_vl_moe")])
@pytest.mark.parametrize("kind, per_layer", [("minimal", 3), ("attention", 4), ("all", 7)])
def test_lora_targets_reach_only_language_layers(models, name, kind, per_layer):
    family, model = get_family(name), models[name]
    regex = family.lora_target_regex(kind)
    hits = [n for n, _ in model.named_modules() if re.fullmatch(regex, n)]
    layers = model.config.text_config.num_hidden_layers
    assert len(hits) == layers * per_layer
    assert all(family.component_of(n) == "language" for n in hits)
    assert set(hits) <= set(_linear_names(model))
    assert {n.rsplit(".", 1)[-1] for n in hits} == set(family.lora_targets(kind))


@pytest.mark.parametrize("name", [n for n in STANDARD_NAMES if n != "qwen3_vl_moe"])  # no mlp.down_proj linear
def test_explicit_targets_and_vision_targets(models, name):
    family, model = get_family(name), models[name]
    assert family.lora_targets(["q_proj", "mlp.down_proj"]) == ["q_proj", "mlp.down_proj"]
    regex = family.lora_target_regex(["q_proj", "mlp.down_proj"], adapt_vision_tower=True)
    hits = [n for n, _ in model.named_modules() if re.fullmatch(regex, n)]
    parts = {family.component_of(n) for n in hits}
    assert parts == {"language", "vision"}, "vision targets added, projector untouched"
    vision = [n for n in hits if family.component_of(n) == "vision"]
    assert set(vision) <= set(_linear_names(model))
    assert {n.rsplit(".", 1)[-1] for n in vision} == set(family.vision_lora_targets)
    with pytest.raises(ConfigError, match="target_modules='most'"):
        family.lora_targets("most")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", FAMILIES)
def test_peft_accepts_the_regex(tiny_model_dir, name):
    from peft import LoraConfig, get_peft_model

    family = get_family(name)
    model = get_peft_model(_model(tiny_model_dir, name),
                           LoraConfig(r=4, target_modules=family.lora_target_regex("all"), task_type="CAUSAL_LM"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {family.component_of(n) for n in trainable} == {"language"}
