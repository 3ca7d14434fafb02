"""Through the one engine: the speed switches on give the losses of the switches off, step for step, and packing
trains and says so in the run log."""

from __future__ import annotations

import json
import logging

import pytest

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.families import get_family
from vlmtune.speed import span_layers
from vlmtune.train.engine import train

OFF = {"chunked_loss": False, "frozen_vision_no_grad": False, "packing": False, "fused_lora": False,
       "mlp_activation_recompute": False}


def _config(tiny_model_dir, varied_jsonl, out, speed: dict, family: str = "qwen2_vl") -> VlmtuneConfig:
    return VlmtuneConfig.model_validate(
        {
            "output_dir": str(out),
            "model": {"name_or_path": str(tiny_model_dir(family))},
            "data": {"train_path": str(varied_jsonl), "check_before_training": False},
            "method": {"name": "lora", "lora": {"dropout": 0.0}},
            "training": {
                "max_steps": 3,
                "batch_size": 2,
                "learning_rate": 5e-3,
                "logging_steps": 1,
                "save_steps": 100,
                "report_to": ["none"],
                "seed": 3,
            },
            "hardware": {"precision": "fp32", "use_cpu": True, "gradient_checkpointing": True},
            "speed": speed,
        }
    )


def _start(result) -> dict:
    lines = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    return next(e for e in lines if e.get("event") == "start")


def _losses(result) -> list[float]:
    lines = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    return [e["loss"] for e in lines if "loss" in e]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_switches_keep_the_losses(tiny_model_dir, varied_jsonl, tmp_path, family):
    plain = train(_config(tiny_model_dir, varied_jsonl, tmp_path / "off", OFF, family=family))
    fast = train(_config(tiny_model_dir, varied_jsonl, tmp_path / "on", {"checkpoint_every_n_layers": 2}, family))
    assert _start(fast)["speed"]["active"] == ["chunked_loss", "frozen_vision_no_grad", "fused_lora",
                                               "mlp_activation_recompute"]
    assert "runs on the CPU" in _start(fast)["speed"]["skipped"]["sdpa_without_cudnn"]
    assert plain.steps == fast.steps == 3
    for a, b in zip(_losses(plain), _losses(fast), strict=True):
        assert abs(a - b) <= 1e-3 * abs(a), (_losses(plain), _losses(fast))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "gemma3", "qwen3_5"])
def test_packing_trains(tiny_model_dir, varied_jsonl, tmp_path, caplog, monkeypatch, family):
    """gemma3 packs with the masks its family builds (image blocks bidirectional), not per-sample spans; qwen3_5 runs
    its DeltaNet layers once per sample span (packed_span_modules)."""
    descriptor, built = get_family(family), []
    original = type(descriptor).packed_attention_masks
    monkeypatch.setattr(type(descriptor), "packed_attention_masks",
                        lambda self, *args: built.append(original(self, *args)) or built[-1])
    spans = []

    def spy(self, hidden_states, *args, **kwargs):
        spans.append(kwargs.get(span_layers.SPANS_KEY) or [])
        return real(self, hidden_states, *args, **kwargs)

    real = span_layers._per_span_forward
    monkeypatch.setattr(span_layers, "_per_span_forward", spy)
    config = _config(
        tiny_model_dir,
        varied_jsonl,
        tmp_path / "packed",
        {"packing": True, "packing_max_tokens": 150},
        family=family,
    )
    with caplog.at_level(logging.WARNING, logger="transformers"):
        result = train(config)
    isolation = "family_mask" if descriptor.packed_row_attention == "family_mask" else "spans"
    assert {"packing", f"packed_attention={isolation}"} <= set(_start(result)["speed"]["active"])
    assert bool(built) == (isolation == "family_mask") and all(m is not None for m in built)
    assert ("packed_attention=spans" in _start(result)["speed"]["active"]) == (isolation == "spans")
    assert ("packed_layers=per_sample" in _start(result)["speed"]["active"]) == bool(descriptor.packed_span_modules)
    if descriptor.packed_span_modules:  # a span cut in a DeltaNet forward during training
        assert spans and max(len(row) for rows in spans for row in rows) > 1
    losses = _losses(result)
    assert len(losses) == 3 and all(loss == loss and loss > 0 for loss in losses)
    # packed rows have no attention mask: the token count still leaves their padding out, without a warning
    assert not [r for r in caplog.records if "count non-padding tokens" in r.getMessage()]


@pytest.mark.slow
def test_switches_come_off_when_training_fails(tiny_model_dir, varied_jsonl, tmp_path, monkeypatch):
    """Some switches are process-wide (SDPA's backends): a run that fails must still take them off."""
    from transformers import TrainerCallback

    import vlmtune.speed as speed_module

    removed: list[int] = []
    original = speed_module.SpeedSetup.remove
    monkeypatch.setattr(speed_module.SpeedSetup, "remove", lambda self: (removed.append(1), original(self)))

    class Boom(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            raise RuntimeError("boom at the first step")

    with pytest.raises(RuntimeError, match="boom"):
        train(_config(tiny_model_dir, varied_jsonl, tmp_path / "fails", {}), callbacks=[Boom()])
    assert removed == [1]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_training_forward_builds_no_kv_cache(tiny_model_dir, varied_jsonl, tmp_path, family):
    """The Trainer's forward gets use_cache=False (transformers would otherwise build and update a KV cache in every
    training forward)."""
    from transformers import TrainerCallback

    from vlmtune.speed.loss_hook import unwrap_peft

    seen: list = []

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            unwrap_peft(model).register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("use_cache")), with_kwargs=True)

    train(_config(tiny_model_dir, varied_jsonl, tmp_path / "run", {}, family=family), callbacks=[Spy()])
    assert seen and all(value is False for value in seen), seen


def test_engine_hands_auto_compile_the_runs_length(monkeypatch, tiny_model_dir, varied_jsonl, tmp_path):
    """The engine tells speed.compile=auto how many optimizer steps the run takes, how many processes run it, and
    whether the memory estimate is tight; on the CPU auto stays eager and the start event says why."""
    from vlmtune.speed import compile_policy

    seen: list[tuple] = []
    real = compile_policy.decide_compile

    def spy(config, device, world=1, steps=None, deepspeed=False, tight_memory=None, span_layers=(),
            layer_refusal=None):
        seen.append((device, world, steps, deepspeed, tight_memory))
        return real(config, device, world, steps, deepspeed, tight_memory, span_layers, layer_refusal)

    monkeypatch.setattr(compile_policy, "decide_compile", spy)
    config = _config(tiny_model_dir, varied_jsonl, tmp_path / "run", {})
    config = config.model_copy(update={"training": config.training.model_copy(update={"max_steps": 2})})
    result = train(config)
    assert seen == [("cpu", 1, 2, False, None)]
    assert "no CUDA GPU" in _start(result)["speed"]["skipped"]["compile"]


def test_auto_compile_counts_the_steps_the_run_takes(monkeypatch, tiny_model_dir, varied_jsonl, tmp_path):
    """Without max_steps, the steps auto is told are those the Trainer then takes, packed rows counted as rows."""
    from vlmtune.speed import compile_policy

    seen: list[int | None] = []
    real = compile_policy.decide_compile

    def spy(config, device, world=1, steps=None, deepspeed=False, tight_memory=None, span_layers=(),
            layer_refusal=None):
        seen.append(steps)
        return real(config, device, world, steps, deepspeed, tight_memory, span_layers, layer_refusal)

    monkeypatch.setattr(compile_policy, "decide_compile", spy)
    for name, speed in (("padded", {}), ("packed", {"packing": True, "packing_max_tokens": 4096})):
        config = _config(tiny_model_dir, varied_jsonl, tmp_path / name, speed)
        config = config.model_copy(
            update={"training": config.training.model_copy(update={"max_steps": None, "epochs": 1.0})}
        )
        result = train(config)
        assert seen[-1] == result.steps, (name, seen, result.steps)
    assert seen[1] < seen[0]  # several samples per packed row
