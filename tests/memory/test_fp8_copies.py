"""speed.fp8's weight copies in the memory estimate."""

from __future__ import annotations

import pytest

from vlmtune.memory import EstimateInputs
from vlmtune.memory.catalogue import lookup_model
from vlmtune.memory.params import count_params


def test_fp8_weight_copies_are_in_the_estimate():
    """speed.fp8 keeps both e4m3 layouts of every adapted base weight beside the bf16 one: for Qwen2.5-VL-7B with
    LoRA on all linears of the language model, 2 bytes per adapted weight (~12 GiB); none for QLoRA or without it."""
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.memory import estimate
    from vlmtune.memory.inputs import inputs_from_config
    from vlmtune.memory.params import adapted_base_shapes

    base = EstimateInputs(model="Qwen/Qwen2.5-VL-7B-Instruct", method="lora", lora_rank=16, lora_targets="all",
                          batch_size=1, seq_len=770)
    counts = count_params(lookup_model(base.model))
    adapted = sum(o * i * n for o, i, n in adapted_base_shapes(counts, base.target_list(
        lookup_model(base.model).arch.lora_targets)))
    assert 6.0e9 < adapted < 7.0e9  # q/k/v/o + gate/up/down of 28 layers
    grown = estimate(base.with_(fp8_base=True)).peak_allocated - estimate(base).peak_allocated
    assert grown == pytest.approx(2 * adapted, rel=0.01)
    assert estimate(base.with_(method="qlora", fp8_base=True)).peak_allocated == estimate(
        base.with_(method="qlora")).peak_allocated
    on = VlmtuneConfig.model_validate({"model": {"name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"},
                                      "speed": {"fp8": True}})
    assert inputs_from_config(on).fp8_base
    assert not inputs_from_config(on.model_copy(update={"speed": on.speed.model_copy(update={"fp8": "auto"})})).fp8_base


def test_fp8_copies_counted_the_same_under_compile():
    """With speed.compile the e4m3 copies are buffers on the base layers (speed/fp8_compiled.py), the same bytes
    (`planned_bytes(..., keep_transposed=True)`): the estimate counts them as it does for the fused path."""
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.memory import estimate
    from vlmtune.memory.inputs import inputs_from_config

    def grown(compile_: bool) -> int:
        config = VlmtuneConfig.model_validate({"model": {"name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"},
                                               "speed": {"fp8": True, "compile": compile_}})
        inputs = inputs_from_config(config)
        assert inputs.fp8_base
        return estimate(inputs).peak_allocated - estimate(inputs.with_(fp8_base=False)).peak_allocated

    assert grown(True) == grown(False) > 12e9
