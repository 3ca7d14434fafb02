"""Gradient accumulation: the step's loss is the token mean over the whole accumulated batch, whatever the model
class declares (transformers marks Qwen2-VL ... Qwen3.5 `accepts_loss_kwargs = False`) and however the samples are
laid out in micro-batches (padded one by one, or packed rows)."""

from __future__ import annotations

import json

import pytest

from vlmtune.train.engine import train

ANSWERS = ["yes", "a much longer answer that holds many more tokens than the others, " * 3, "no", "blue"]


@pytest.mark.parametrize(("family", "chunked"), [("qwen3_vl", True), ("qwen3_vl", False), ("gemma3", True)])
def test_accumulated_step_loss_is_the_whole_batch_token_mean(run_config, tmp_path, family, chunked):
    """chunked=False: the model's own loss, which for Qwen3-VL the Trainer would average per micro-batch."""
    data = tmp_path / "varied.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                     {"role": "assistant", "content": answer}]}) + "\n"
                            for i, answer in enumerate(ANSWERS)), encoding="utf-8")

    def first_loss(name: str, batch: int, accumulate: int, packing: bool) -> float:
        config = run_config(family, "lora", out=tmp_path / name, data={"train_path": str(data)},
                            hardware={"precision": "fp32"}, speed={"packing": packing, "chunked_loss": chunked},
                            training={"max_steps": 1, "batch_size": batch, "gradient_accumulation_steps": accumulate,
                                      "learning_rate": 1e-6})
        return train(config).train_loss_first

    whole = first_loss("whole", 4, 1, False)
    assert first_loss("accumulated", 1, 4, False) == pytest.approx(whole, rel=1e-5)
    assert first_loss("packed", 1, 4, True) == pytest.approx(whole, rel=1e-5)
