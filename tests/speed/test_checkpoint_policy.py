"""speed.checkpoint_every_n_layers=auto (speed/checkpoint_policy.py): n chosen from the memory estimate against the
GPU's memory, with the margin; 1 (and why) where nothing better can be known; the same choice in the training
preflight, the dry run, the recorded estimate and the run's config.yaml. CPU only: the GPU is faked."""

from __future__ import annotations

import json
import logging

import pytest
import yaml
from fakes import FakeDataset

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.memory import estimate, get_gpu, inputs_from_config
from vlmtune.memory.gpus import GIB, GpuSpec
from vlmtune.speed.checkpoint_policy import (
    SAFETY_MARGIN,
    SAFETY_MARGIN_EXPANDABLE,
    CheckpointChoice,
    Room,
    candidates,
    decide_checkpointing,
    language_layers,
    safety_margin,
)
from vlmtune.train.gpu_memory import GpuMemory

MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"


def _config(**sections) -> VlmtuneConfig:
    return VlmtuneConfig.model_validate({"model": {"name_or_path": MODEL}, **sections})


def _estimate_at(config: VlmtuneConfig):
    inputs = inputs_from_config(config)
    return lambda n: estimate(inputs.with_(gradient_checkpointing=n is not None, checkpoint_every=n or 1))


def _card(gib: float) -> Room:
    return Room.catalogue(GpuSpec(f"{gib:g} GiB card", gib, int(gib * GIB), True, "test"))


def _rank(choice: CheckpointChoice, layers: int) -> int:
    """Checkpointed layers fewest last: every layer 1 ... no checkpointing layers + 1."""
    return choice.every if choice.checkpointing else layers + 1


def test_schema_takes_a_number_or_auto():
    assert VlmtuneConfig().speed.checkpoint_every_n_layers == "auto"
    assert _config(speed={"checkpoint_every_n_layers": 4}).speed.checkpoint_every_n_layers == 4
    assert _config(speed={"checkpoint_every_n_layers": "auto"}).speed.checkpoint_every_n_layers == "auto"
    for bad in (0, -2, "sometimes"):
        with pytest.raises(ValueError):
            _config(speed={"checkpoint_every_n_layers": bad})
    # estimate / recommend read auto as every layer
    assert inputs_from_config(_config()).checkpoint_every == 1


def test_candidates():
    assert candidates(28) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 28]
    assert candidates(32) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    assert candidates(4) == [1, 2, 3, 4] and candidates(1) == [1]


def test_n_grows_with_the_cards_memory_and_keeps_the_margin():
    """Qwen2.5-VL-7B LoRA (the estimator's real inputs) on cards of 16 to 141 GiB."""
    config = _config()
    layers, estimate_at = language_layers(MODEL), _estimate_at(config)
    assert layers == 28
    ranks = []
    for gib in (16, 20, 24, 28, 32, 36, 40, 48, 80, 141):
        room = _card(gib)
        choice = decide_checkpointing(config, room, estimate_at, layers)
        assert choice.auto and choice.breakdown is not None
        limit = room.capacity * (1 - safety_margin(choice.breakdown))
        at = choice.every if choice.checkpointing else None
        assert choice.breakdown == estimate_at(at)  # the estimate is the one at the choice
        if _rank(choice, layers) > 1:
            assert choice.breakdown.peak_total <= limit, (gib, choice.reason)
        # the largest that fits: the next candidate (or no checkpointing after n = layers) does not
        if choice.checkpointing:
            later = [n for n in candidates(layers) if n > choice.every]
            following = estimate_at(later[0] if later else None)
            assert following.peak_total > limit, (gib, choice.reason)
        ranks.append(_rank(choice, layers))
    assert ranks == sorted(ranks), ranks
    assert ranks[0] == 1 and ranks[-1] == layers + 1  # every layer on 16 GiB, none on 141
    assert len(set(ranks)) >= 3  # something in between too


def test_reason_names_the_choice_and_the_margin():
    config = _config()
    choice = decide_checkpointing(config, Room.catalogue(get_gpu("RTX 5090")), _estimate_at(config), 28)
    assert choice.checkpointing and 1 < choice.every < 28
    assert choice.reason.startswith(f"speed.checkpoint_every_n_layers=auto -> {choice.every} (")
    assert "within 90% of RTX 5090" in choice.reason  # expandable segments: on by default on CUDA
    tight = decide_checkpointing(config, _card(12), _estimate_at(config), 28)
    assert tight.every == 1 and tight.checkpointing and "even then the estimate" in tight.reason


def test_visible_gpu_counts_its_free_memory_or_the_cap():
    from vlmtune.memory.estimator import CUDA_CONTEXT

    gpu = GpuMemory("Fake GPU", 80 * GIB, 79 * GIB, True)
    assert Room.visible(gpu).capacity == 79 * GIB + CUDA_CONTEXT and "free memory" in Room.visible(gpu).what
    capped = GpuMemory("Fake GPU", 80 * GIB, 79 * GIB, True, limit=20 * GIB)
    assert Room.visible(capped).capacity == 20 * GIB + CUDA_CONTEXT
    assert "memory_fraction" in Room.visible(capped).what
    config = _config()
    big, small = (decide_checkpointing(config, Room.visible(g), _estimate_at(config), 28) for g in (gpu, capped))
    assert _rank(small, 28) < _rank(big, 28)


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"device": "cpu"}, "no CUDA GPU"),
        ({"deepspeed": True}, "DeepSpeed"),
        ({"world": 2}, "several processes"),
        ({"room": None}, "memory is not known"),
        ({"estimate_at": None}, "cannot size this model"),
    ],
)
def test_every_layer_where_nothing_better_is_known(kwargs, says):
    config = _config()
    args = {"room": _card(141), "estimate_at": _estimate_at(config), "layers": 28, **kwargs}
    choice = decide_checkpointing(config, **args)
    assert choice.auto and choice.checkpointing and choice.every == 1 and choice.breakdown is None
    assert "-> 1 (every layer)" in choice.reason and says in choice.reason


def test_a_number_or_no_checkpointing_is_kept():
    fixed = _config(speed={"checkpoint_every_n_layers": 2})
    choice = decide_checkpointing(fixed, _card(141), _estimate_at(fixed), 28)
    assert not choice.auto and choice.every == 2 and choice.checkpointing
    off = _config(hardware={"gradient_checkpointing": False})
    choice = decide_checkpointing(off, _card(16), _estimate_at(off), 28)
    assert choice.auto and not choice.checkpointing and "not applicable" in choice.reason
    assert choice.apply(off).hardware.gradient_checkpointing is False


def test_apply_writes_the_choice():
    chosen = CheckpointChoice(True, 6, "why", auto=True).apply(_config())
    assert chosen.speed.checkpoint_every_n_layers == 6 and chosen.hardware.gradient_checkpointing
    assert inputs_from_config(chosen).checkpoint_every == 6
    off = CheckpointChoice(False, 1, "why", auto=True).apply(_config())
    assert not off.hardware.gradient_checkpointing and not inputs_from_config(off).gradient_checkpointing


def test_dry_run_prints_the_choice_for_the_named_gpu(capsys):
    from vlmtune.cli.main import main
    from vlmtune.train.dry_run import dry_run_estimate

    config = _config()
    for card in ("RTX 4090", "A100 40GB", "H100"):
        expected = decide_checkpointing(config, Room.catalogue(get_gpu(card)), _estimate_at(config), 28)
        assert main(["train", "--dry-run", "--gpu", card, f"model.name_or_path={MODEL}"]) == 0
        out = capsys.readouterr().out
        assert expected.reason in out
        assert f"{expected.breakdown.peak_total / GIB:.2f} GiB at the peak" in out
        printed = dry_run_estimate(config, card)  # the same estimate, with the card's verdict
        assert printed.phases == expected.breakdown.phases and printed.verdict is not None
        assert printed.inputs.with_(gpu=None) == expected.breakdown.inputs
    # a number: no choice printed, the estimate at that number
    assert main(["train", "--dry-run", "--gpu", "H100", f"model.name_or_path={MODEL}",
                 "speed.checkpoint_every_n_layers=1"]) == 0
    assert "checkpoint_every_n_layers=auto" not in capsys.readouterr().out


def test_dry_run_on_the_visible_gpu_decides_as_training_does(capsys, monkeypatch):
    import torch

    from vlmtune.cli.main import main
    from vlmtune.train import gpu_memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_memory, "read_gpu_memory",
                        lambda index: GpuMemory("Fake GPU", 80 * GIB, 79 * GIB, True))
    assert main(["train", "--dry-run", f"model.name_or_path={MODEL}"]) == 0
    assert "auto -> no checkpointing" in capsys.readouterr().out
    assert main(["train", "--dry-run", f"model.name_or_path={MODEL}", "hardware.memory_fraction=0.3"]) == 0
    out = capsys.readouterr().out
    assert "auto -> " in out and "hardware.memory_fraction cap" in out and "no checkpointing" not in out
    assert main(["train", "--dry-run", f"model.name_or_path={MODEL}", "distributed.num_gpus=2"]) in (0, 1)
    assert "DeepSpeed" in capsys.readouterr().out  # two processes: DeepSpeed, every layer


# -- the training preflight, against a fake GPU ----------------------------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    import vlmtune.train.preflight as pf

    state = {}
    monkeypatch.setattr(pf, "read_gpu_memory", lambda index: state["gpu"])
    monkeypatch.setattr(pf, "apply_memory_fraction", lambda fraction, index: None)
    monkeypatch.setattr(pf, "available_host_ram", lambda: 1024 * GIB)

    def set_gpu(free_gib: float, total_gib: float = 80.0) -> None:
        state["gpu"] = GpuMemory("Fake GPU", int(total_gib * GIB), int(free_gib * GIB), True)

    return set_gpu


@pytest.fixture
def dataset(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    path = tmp_path / "image.png"
    Image.new("RGB", (448, 448)).save(path)
    return FakeDataset([SimpleNamespace(images=[path]) for _ in range(8)], [1500] * 8, [1000] * 8)


def _preflight_config(tmp_path, **speed) -> VlmtuneConfig:
    return _config(output_dir=str(tmp_path / "run"), data={"train_path": str(tmp_path / "t.jsonl"), "image_size": 448},
                   training={"batch_size": 2}, speed=speed)


@pytest.mark.parametrize("free_gib", [30, 40, 79])
def test_preflight_prints_and_records_the_estimate_at_the_choice(tmp_path, dataset, fake_gpu, caplog, capsys,
                                                                 free_gib):
    import torch

    import vlmtune.train.preflight as pf
    from vlmtune.methods.base import PrecisionPlan

    fake_gpu(free_gib)
    config = _preflight_config(tmp_path)
    with caplog.at_level(logging.INFO, logger="vlmtune.train.preflight"):
        result = pf.preflight(config, PrecisionPlan("cuda", torch.bfloat16, True, False, "bf16"), dataset,
                              tmp_path / "log.jsonl")
    resolved = result.config
    assert resolved.speed.checkpoint_every_n_layers != "auto"
    inputs = result.breakdown.inputs
    assert inputs.checkpoint_every == resolved.speed.checkpoint_every_n_layers
    assert inputs.gradient_checkpointing == resolved.hardware.gradient_checkpointing
    assert result.checkpointing in caplog.text and result.checkpointing.startswith("speed.checkpoint_every_n_layers=auto")
    assert f"{result.breakdown.peak_reserved / GIB:.2f} GiB reserved" in capsys.readouterr().out
    event = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert event["checkpoint_every_n_layers"] == resolved.speed.checkpoint_every_n_layers
    assert event["gradient_checkpointing"] == resolved.hardware.gradient_checkpointing
    assert event["inputs"]["checkpoint_every"] == inputs.checkpoint_every
    assert event["estimate_reserved_gib"] == round(result.breakdown.peak_reserved / GIB, 3)
    assert event["checkpointing"] == result.checkpointing
    if resolved.hardware.gradient_checkpointing and resolved.speed.checkpoint_every_n_layers > 1:
        assert result.breakdown.peak_total <= (free_gib * GIB + result.breakdown.cuda_context) * (
            1 - safety_margin(result.breakdown))


def test_preflight_on_the_cpu_and_with_deepspeed_checkpoints_every_layer(tmp_path, dataset, fake_gpu, caplog):
    import torch

    import vlmtune.train.preflight as pf
    from vlmtune.methods.base import PrecisionPlan

    with caplog.at_level(logging.INFO, logger="vlmtune.train.preflight"):
        cpu = pf.preflight(_preflight_config(tmp_path), PrecisionPlan("cpu", torch.float32, False, False, "fp32"),
                           dataset)
    assert cpu.config.speed.checkpoint_every_n_layers == 1 and "no CUDA GPU" in caplog.text
    fake_gpu(79)
    config = _config(output_dir=str(tmp_path / "run"), data={"image_size": 448}, training={"batch_size": 2},
                     distributed={"engine": "deepspeed", "zero_stage": 2})
    ds = pf.preflight(config, PrecisionPlan("cuda", torch.bfloat16, True, False, "bf16"), dataset)
    assert ds.config.speed.checkpoint_every_n_layers == 1 and "DeepSpeed" in ds.checkpointing
    assert ds.breakdown.inputs.checkpoint_every == 1


@pytest.mark.slow
def test_the_run_folder_records_the_chosen_n(run_config, monkeypatch, caplog):
    """config.yaml in the run folder holds the n the preflight chose (here faked as 2: the CPU always gets 1)."""
    import vlmtune.train.preflight as pf
    from vlmtune.train.engine import train

    real = pf.preflight

    def chose_two(config, plan, dataset, log_path=None, **kwargs):
        result = real(config, plan, dataset, log_path, **kwargs)
        from dataclasses import replace

        return replace(result, config=CheckpointChoice(True, 2, "test", auto=True).apply(result.config))

    monkeypatch.setattr(pf, "preflight", chose_two)
    config = run_config(training={"max_steps": 1}, hardware={"gradient_checkpointing": True})
    assert config.speed.checkpoint_every_n_layers == "auto"
    result = train(config)
    written = yaml.safe_load(result.config_path.read_text())
    assert written["speed"]["checkpoint_every_n_layers"] == 2 and written["hardware"]["gradient_checkpointing"]
    assert written["training"]["batch_size"] == 2
    monkeypatch.setattr(pf, "preflight", real)
    with caplog.at_level(logging.INFO):
        cpu = train(run_config(out=result.output_dir.parent / "cpu", training={"max_steps": 1}))
    assert yaml.safe_load(cpu.config_path.read_text())["speed"]["checkpoint_every_n_layers"] == 1
    assert "speed.checkpoint_every_n_layers=auto -> 1 (every layer): no CUDA GPU" in caplog.text


def test_the_margin_is_smaller_with_expandable_segments():
    """Expandable segments (the default) keep 10% free, fixed segments 15%: their estimates' measured error bands
    differ (session 13: -4.3% to +2.6% with them; session 10: -7.1% to +3.9% without). So the same card checkpoints
    fewer layers with them, and each choice keeps its own margin."""
    on = _config(hardware={"expandable_segments": True})
    off = _config(hardware={"expandable_segments": False})
    # a card on which the estimate without checkpointing fits inside the 10% margin but not the 15% one
    room = _card(_estimate_at(on)(None).peak_total / 0.875 / GIB)
    assert inputs_from_config(on).expandable and not inputs_from_config(off).expandable
    with_them = decide_checkpointing(on, room, _estimate_at(on), 28)
    without = decide_checkpointing(off, room, _estimate_at(off), 28)
    assert safety_margin(with_them.breakdown) == SAFETY_MARGIN_EXPANDABLE < SAFETY_MARGIN == safety_margin(
        without.breakdown)
    assert "within 90%" in with_them.reason and "within 85%" in without.reason
    assert _rank(with_them, 28) > _rank(without, 28), (with_them.reason, without.reason)
    assert with_them.breakdown.peak_total <= room.capacity * (1 - SAFETY_MARGIN_EXPANDABLE)
    assert without.breakdown.peak_total <= room.capacity * (1 - SAFETY_MARGIN)
