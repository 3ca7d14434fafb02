from __future__ import annotations

import json

import pytest

from vlmtune.errors import ConfigError, VlmtuneError
from vlmtune.memory import EstimateInputs, estimate, inputs_from_config

QWEN7 = "Qwen/Qwen2.5-VL-7B-Instruct"


def _rows(b) -> int:
    return (
        sum(b.weights.values())
        + b.adapters
        + b.gradients
        + b.optimizer_states
        + b.zero_gathered
        + b.comm_buffers
        + b.activations_vision
        + b.activations_language
        + b.logits_loss
        + b.transient
        + b.runtime
    )


@pytest.mark.parametrize(
    "inputs",
    [
        EstimateInputs(model=QWEN7),
        EstimateInputs(model=QWEN7, method="qlora"),
        EstimateInputs(model=QWEN7, method="full", gradient_checkpointing=False, optimizer="adamw_torch"),
        EstimateInputs(model=QWEN7, zero_stage=3, num_gpus=4, offload="optimizer"),
        EstimateInputs(model="llava-hf/llava-1.5-7b-hf", gradient_accumulation_steps=4, batch_size=2),
    ],
)
def test_table_rows_add_up_to_the_peak(inputs):
    b = estimate(inputs)
    assert _rows(b) == b.peak_allocated == b.phases[b.peak_phase] == max(b.phases.values())
    assert b.peak_total == b.peak_allocated + b.allocator_overhead + b.cuda_context
    json.dumps(b.to_dict(), default=str)
    assert "PEAK (nvidia-smi)" in b.to_table()


def test_orderings_that_must_hold():
    base = EstimateInputs(model=QWEN7)
    lora, qlora = estimate(base), estimate(base.with_(method="qlora"))
    assert qlora.peak_total < lora.peak_total - 8 * 2**30  # 6.5 B language weights at 0.52 instead of 2 bytes
    assert estimate(base.with_(gradient_checkpointing=False)).peak_total > lora.peak_total
    assert estimate(base.with_(seq_len=4096)).peak_total > lora.peak_total
    assert estimate(base.with_(method="full")).peak_total > lora.peak_total
    per_gpu = [estimate(base.with_(method="full", zero_stage=3, num_gpus=g)).peak_total for g in (1, 2, 4, 8)]
    assert per_gpu == sorted(per_gpu, reverse=True)


def test_qlora_keeps_vision_and_lm_head_in_16bit():
    b = estimate(EstimateInputs(model=QWEN7, method="qlora"))
    full = estimate(EstimateInputs(model=QWEN7))
    assert b.weights["vision"] == full.weights["vision"] and b.weights["lm_head"] == full.weights["lm_head"]
    assert b.weights["language"] < full.weights["language"] * 0.3
    quantized = estimate(EstimateInputs(model=QWEN7, method="qlora", quantize_vision_tower=True))
    assert quantized.weights["vision"] < b.weights["vision"] * 0.3


def test_offload_reports_cpu_ram():
    b = estimate(
        EstimateInputs(
            model=QWEN7, method="full", freeze_vision_tower=False, zero_stage=3, offload="all", num_gpus=8
        )
    )
    # 16-bit weights, fp32 master + moments + gradients and the 16-bit gradients of every parameter, x ZeRO-3's 1.3
    assert b.offloaded > 0 and b.cpu_ram == pytest.approx(1.3 * 20 * 8292166656, rel=0.01)
    assert sum(b.weights.values()) == 0


def test_verdicts():
    b = estimate(EstimateInputs(model=QWEN7, gpu="RTX 4090"))
    assert b.verdict.status == "tight" and 0 < b.verdict.headroom < 0.1 * b.verdict.capacity
    assert estimate(EstimateInputs(model=QWEN7, gpu="H100")).verdict.status == "fits"
    assert estimate(EstimateInputs(model=QWEN7, gpu="RTX 4060")).verdict.status == "does not fit"
    assert estimate(EstimateInputs(model=QWEN7)).verdict is None


def test_images_larger_than_the_sequence_are_flagged():
    b = estimate(EstimateInputs(model=QWEN7, image_hw=(2000, 2000), seq_len=1024))
    assert b.image_tokens > 1024 and "more than seq_len" in b.notes[0]


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        estimate(EstimateInputs(batch_size=0, seq_len=-1, method="qlora", precision="fp32", offload="all"))
    assert len(err.value.problems) == 4


def test_unknown_gpu_and_model_are_clear():
    with pytest.raises(VlmtuneError, match="known GPUs are"):
        estimate(EstimateInputs(gpu="GTX 280"))
    with pytest.raises(VlmtuneError, match="Built-in models"):
        estimate(EstimateInputs(model="nobody/nothing"))


def test_inputs_from_a_vlmtune_config():
    from vlmtune.config.loader import load_config

    config = load_config(None, ["method.name=qlora", "data.image_size=336", "training.batch_size=2"])
    inputs = inputs_from_config(config, num_gpus=2)
    assert (inputs.method, inputs.image_hw, inputs.image_size, inputs.batch_size, inputs.num_gpus) == (
        "qlora",
        (336, 336),
        336,
        2,
        2,
    )
    assert estimate(inputs).peak_total > 0
