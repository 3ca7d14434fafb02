"""The (family x method) table: each combination trains a few steps on a tiny model through the one engine, the
loss falls, and the saved result reloads with the same outputs as the model that was just trained."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from vlmtune.config.loader import load_config
from vlmtune.data.collate import Collator
from vlmtune.data.processing import encode
from vlmtune.data.records import read_records
from vlmtune.export.predict import load_for_inference
from vlmtune.train.engine import train

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "instructblip", "gemma3", "smolvlm", "qwen3_5", "internvl",
            "qwen_vl", "mllama", "qwen3_vl_moe"]
METHODS = ["lora", "qlora", "full"]


class KeepModel(TrainerCallback):
    """Holds on to the trained in-memory model."""

    model: torch.nn.Module | None = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def _batch(loaded, config) -> dict[str, torch.Tensor]:
    records = read_records(config.data.train_path)[:3]
    samples = [encode(r, loaded.processor, loaded.family, config.data) for r in records]
    return Collator(loaded.processor.tokenizer.pad_token_id)(samples)


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**batch).logits.float()


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_train_then_reload(run_config, family, method):
    # Adapters also train the projector (saved with the adapter); LoRA also adapts the vision tower.
    lora = {"train_projector": method != "full", "adapt_vision_tower": method == "lora"}
    config = run_config(family, method, val=family == "qwen2_vl", training={"eval_steps": 6}, lora=lora)
    keep = KeepModel()
    result = train(config, callbacks=[keep])

    assert result.steps == 6 and result.method == method and result.family == family
    assert result.train_loss_last < result.train_loss_first, (result.train_loss_first, result.train_loss_last)
    assert result.dropped_train == 0
    if family == "qwen2_vl":
        assert result.eval_loss_last is not None

    # The run folder: resolved config, log lines with the promised metrics, the result next to its processor.
    # speed.checkpoint_every_n_layers=auto is recorded as the n the run chose (every layer on the CPU).
    resolved = config.model_copy(update={"speed": config.speed.model_copy(update={"checkpoint_every_n_layers": 1})})
    assert load_config(result.config_path) == resolved
    logs = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    start = logs[0]
    assert start["event"] == "start" and start["method"] == method and start["precision"].startswith("CPU")
    assert start["expandable_segments"] is None and start["allocator"] == "expandable segments: not a CUDA run"
    assert (
        0
        < start["trainable_params"]
        == result.trainable_params
        < start["total_params"]
        == result.total_params
    )
    steps = [e for e in logs if "loss" in e]
    assert [e["step"] for e in steps] == list(range(1, 7))
    assert {"learning_rate", "grad_norm", "mem_rss_gib"} <= set(steps[0])
    assert all(e["tokens_per_second"] > 0 for e in steps[1:])
    expected = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert (result.final_dir / expected).is_file() and (result.final_dir / "processor_config.json").is_file()

    loaded = load_for_inference(result.final_dir, device="cpu")
    if method == "qlora":  # reloaded as it was trained: 4-bit language model
        assert any(type(m).__name__ == "Linear4bit" for m in loaded.model.modules())
    batch = _batch(loaded, config)
    trained, reloaded = _logits(keep.model, batch), _logits(loaded.model, batch)
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-5)
    untrained = _logits(load_for_inference(config.model.name_or_path, device="cpu").model, batch)
    assert (untrained - trained).abs().max() > 1e-3  # training changed the outputs that were compared
