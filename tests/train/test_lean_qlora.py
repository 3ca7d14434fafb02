"""Lean QLoRA (method.quantization.lean) through the one engine on the CPU: what it quantizes, and that it trains."""

from __future__ import annotations

import math

from vlmtune.config.schema import VlmtuneConfig


def _lean(run_config, family: str) -> VlmtuneConfig:
    data = run_config(family, "qlora").model_dump(mode="json", exclude_unset=True)
    data["method"]["quantization"] = {"lean": True}
    return VlmtuneConfig.model_validate(data)


def test_lean_quantizes_vision_tower_and_lm_head(run_config):
    from vlmtune.families import get_family
    from vlmtune.methods import get_method

    config = _lean(run_config, "qwen2_5_vl")
    assert config.training.optimizer == "paged_adamw_8bit" and config.speed.embeddings_on_cpu
    family = get_family("qwen2_5_vl")
    model = get_method("qlora").load_and_prepare(config, family)
    quantized = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    vision = [n for n in quantized if any(f"{p}." in n for p in family.vision_prefixes)]
    assert vision, "lean QLoRA quantizes the vision tower's linear layers"
    head = [n for n in quantized if n.endswith(tuple(family.lm_head_names))]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert head or tied, "lean QLoRA quantizes an untied lm_head"


def test_lean_qlora_trains(run_config):
    from vlmtune.train.engine import train

    config = _lean(run_config, "qwen2_5_vl")
    config = config.model_copy(update={"training": config.training.model_copy(update={"max_steps": 4})})
    result = train(config)
    first, last = result.train_loss_first, result.train_loss_last
    assert result.steps == 4 and math.isfinite(first) and math.isfinite(last) and last < first
