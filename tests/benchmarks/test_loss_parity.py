"""The speed harness's paths train the same weights on the same samples in the same order with the same optimizer
settings, so their per-step losses compare: the plain loop's order against the HF Trainer's (vlmtune's engine), the
engine's training settings, the per-step losses read from a run's log, and the report's parity line. Also the
low-memory variants and their cap at Unsloth's peak (issue 21)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.speed import bench, engine_run
from benchmarks.speed.plain import EpochOrder
from benchmarks.speed.report import loss_parity
from benchmarks.speed.workloads import AT_UNSLOTH_PEAK, LOWMEM, WORKLOADS


def _vlmtune_config(work_name: str = "W1", variant_name: str = "vlmtune_gc", tmp: Path = Path("/tmp/x")):
    from vlmtune.config.loader import load_config

    work = WORKLOADS[work_name]
    variant = next(v for v in work.variants if v.name == variant_name)
    base = engine_run.config_dict(work, variant, tmp / "model", tmp / "train.jsonl", tmp / "out")
    return load_config(None, overrides=[], base=base)


def test_plain_order_is_the_order_of_vlmtunes_trainer(tmp_path):
    """accelerate's seedable sampler (the HF Trainer's, seed 0 as engine_run sets it) and the plain loop's
    EpochOrder give the same samples in the same order, pass after pass."""
    import torch
    from transformers import Trainer, TrainingArguments

    n = 23
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, seed=0, use_cpu=True,
                             report_to="none", dataloader_num_workers=0)
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=args, train_dataset=list(range(n)),
                      data_collator=lambda rows: rows)
    loader = trainer.get_train_dataloader()
    order = EpochOrder(n, seed=0)
    for _ in range(2):
        assert [i for batch in loader for i in batch] == list(order)
    shuffled = torch.utils.data.DataLoader(list(range(n)), batch_size=n, shuffle=True,
                                           generator=torch.Generator().manual_seed(0))
    assert next(iter(shuffled)).tolist() != list(EpochOrder(n, seed=0))  # what the plain loop drew before


def test_vlmtune_trains_with_the_plain_loops_settings():
    """Seed 0 (the plain loop's torch.manual_seed(0) before building the model), constant lr 1e-4 without warmup, no
    weight decay, fused AdamW with torch's betas and eps, clipping at 1, the loss logged at every step."""
    from vlmtune.methods.base import resolve_precision
    from vlmtune.train.args import training_arguments

    config = _vlmtune_config()
    t = config.training
    assert (t.seed, t.learning_rate, t.lr_scheduler, t.warmup_steps, t.warmup_ratio) == (0, 1e-4, "constant", 0, 0.0)
    assert (t.weight_decay, t.max_grad_norm, t.optimizer, t.logging_steps) == (0.0, 1.0, "adamw_torch_fused", 1)
    assert config.model.random_init
    args = training_arguments(config, resolve_precision(config), has_eval=False)
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert args.get_warmup_steps(13) == 0 and args.seed == 0 and args.logging_steps == 1


def test_step_losses_from_the_run_log(tmp_path):
    log = tmp_path / "train_log.jsonl"
    rows = [{"event": "start", "speed": {}}, {"step": 2, "loss": 11.5}, {"step": 1, "loss": 12.0712345678},
            {"step": 2, "eval_loss": 3.0}, {"step": 2, "train_loss": 11.7}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert engine_run.step_losses(log) == [12.07123, 11.5]


def test_report_compares_each_variant_with_plain_gc():
    work = WORKLOADS["W1"]

    def row(path: str, losses: list[float], embed: float = 1.5) -> dict:
        return {"path": path, "losses": losses, "init_fingerprint": {"embed": embed}}

    rows = {"plain_gc": row("plain", [12.0, 11.0, 10.0]), "vlmtune_gc": row("vlmtune", [12.0, 11.0, 10.1]),
            "unsloth_gc": row("unsloth", [12.012, 11.0, 9.99], embed=2.5)}
    line = loss_parity(work, rows)
    assert line.startswith("loss parity vs plain_gc (step 1 12.0000, step 3 10.0000)")
    assert "vlmtune_gc 12.0000 (+0.00%) / 10.1000 (+1.00%) at step 3" in line
    assert "unsloth_gc 12.0120 (+0.10%) / 9.9900 (-0.10%) at step 3 [other weights]" in line
    assert loss_parity(work, {"vlmtune_gc": rows["vlmtune_gc"]}) is None  # no plain run to compare with


@pytest.mark.parametrize("name", ["W1", "W3"])
def test_lowmem_variants_validate_and_run_after_unsloth(name, tmp_path):
    """vlmtune_lowmem's overrides are valid config (hardware.expandable_segments where the schema has it yet), and
    the capped variant runs after unsloth_gc, whose peak it needs."""
    from vlmtune.config.loader import load_config
    from vlmtune.config.schema import HardwareConfig

    work = WORKLOADS[name]
    names = [v.name for v in work.variants]
    assert names.index("unsloth_gc") < names.index("vlmtune_auto_at_unsloth")
    lowmem = next(v for v in work.variants if v.name == "vlmtune_lowmem")
    assert lowmem.overrides == LOWMEM and lowmem.gc
    overrides = {k: v for k, v in lowmem.overrides.items()
                 if k != "hardware.expandable_segments" or "expandable_segments" in HardwareConfig.model_fields}
    base = engine_run.config_dict(work, lowmem, tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "out")
    config = load_config(None, overrides=[f"{k}={v}" for k, v in overrides.items()], base=base)
    assert config.speed.loss_chunk_tokens == 256 and config.speed.checkpoint_every_n_layers == 1


def test_cap_at_unsloths_peak_of_the_same_round(tmp_path, monkeypatch):
    import torch

    class Card:
        total_memory = 80 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Card())
    monkeypatch.setenv("BENCH_ROUND", "1")
    variant = next(v for v in WORKLOADS["W1"].variants if v.name == "vlmtune_auto_at_unsloth")
    assert variant.overrides["hardware.memory_fraction"] == AT_UNSLOTH_PEAK
    with pytest.raises(SystemExit, match="needs unsloth_gc's peak reserved memory"):
        bench.resolved_overrides(variant, "W1", tmp_path)
    rows = [{"workload": "W1", "variant": "unsloth_gc", "round": 0, "peak_reserved_gib": 4.0},
            {"workload": "W1", "variant": "plain_gc", "round": 1, "peak_reserved_gib": 22.0},
            {"workload": "W1", "variant": "unsloth_gc", "round": 1, "peak_reserved_gib": 5.0}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    filled = bench.resolved_overrides(variant, "W1", tmp_path)
    assert filled.overrides["hardware.memory_fraction"] == 0.0625
    auto = next(v for v in WORKLOADS["W1"].variants if v.name == "vlmtune_auto")
    assert bench.resolved_overrides(auto, "W1", tmp_path).overrides["hardware.memory_fraction"] == 0.275


def test_every_vlmtune_variant_is_valid_config(tmp_path):
    """Each vlmtune variant's overrides (placeholders filled with a stand-in) load as a config: a typo in a field
    name would otherwise only show on the GPU machine, as a failed run."""
    from vlmtune.config.loader import load_config
    from vlmtune.config.schema import HardwareConfig

    stand_in = {"hardware.memory_fraction": 0.5, "model.name_or_path": str(tmp_path / "weights")}
    checked = 0
    for work in WORKLOADS.values():
        for variant in work.variants:
            if variant.path != "vlmtune":
                continue
            overrides = {k: (stand_in.get(k, v) if isinstance(v, str) and v.startswith("@") else v)
                         for k, v in variant.overrides.items()
                         if k != "hardware.expandable_segments"
                         or "expandable_segments" in HardwareConfig.model_fields}
            base = engine_run.config_dict(work, variant, tmp_path / "m", tmp_path / "t.jsonl", tmp_path / "o")
            config = load_config(None, overrides=[f"{k}={v}" for k, v in overrides.items()], base=base)
            assert config.training.max_steps == work.warmup + work.steps
            checked += 1
    assert checked > 40
    default = next(v for v in WORKLOADS["W1"].variants if v.name == "vlmtune_default1000")
    base = engine_run.config_dict(WORKLOADS["W1"], default, tmp_path / "m", tmp_path / "t.jsonl", tmp_path / "o")
    filled = {k: stand_in.get(k, v) for k, v in default.overrides.items()}
    config = load_config(None, overrides=[f"{k}={v}" for k, v in filled.items()], base=base)
    assert config.speed.compile == "auto" and config.speed.checkpoint_every_n_layers == "auto"
    assert default.overrides["hardware.memory_fraction"] == "@plain_gc_peak_reserved"  # at no more memory
    assert config.hardware.dataloader_workers == 0 and default.steps == 1000 and default.warmup == 0


def test_a_profile_fills_the_cap_from_the_suites_results(tmp_path, monkeypatch):
    """run.sh profiles into $OUT/logs beside the suite's $OUT/results.jsonl: a capped variant (vlmtune_auto) is
    profiled at plain_gc's peak, where it stopped at the placeholder before."""
    import torch

    from benchmarks.speed import engine_run as run
    from benchmarks.speed.profiling import profile_one

    class Card:
        total_memory = 80 * 2**30

    class Seen(Exception):
        pass

    def train(work, variant, *a, **k):
        raise Seen(variant.overrides["hardware.memory_fraction"])

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Card())
    monkeypatch.setattr(bench, "prepare", lambda work: (tmp_path / "model", tmp_path / "train.jsonl"))
    monkeypatch.setattr(run, "train", train)
    row = {"workload": "F7", "variant": "plain_gc", "round": 0, "peak_reserved_gib": 20.0}
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(Seen) as seen:
        profile_one("F7", "vlmtune_auto", tmp_path / "logs")
    assert seen.value.args == (0.25,)
