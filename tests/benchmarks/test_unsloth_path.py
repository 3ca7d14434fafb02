"""The speed harness's Unsloth path (issue 21) as far as a CPU can check it: where it runs, its environment, the weights
it loads, the LoRA placement check, and the result line of a variant that failed. Unsloth itself needs the GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.speed import bench, unsloth_run
from benchmarks.speed.report import _targets, print_report
from benchmarks.speed.workloads import WORKLOADS


def test_unsloth_variant_on_the_issue_21_workloads():
    for name in ("W1", "W2", "W3"):
        variant = next(v for v in WORKLOADS[name].variants if v.name == "unsloth_gc")
        assert variant.path == "unsloth" and variant.gc
    assert WORKLOADS["W2"].method == "qlora"


def test_skipped_with_a_reason_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert "CUDA GPU" in unsloth_run.unavailable()


def test_child_env_is_offline_with_its_own_site_first(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/tmp/site:/repo/src")
    env = unsloth_run.child_env("W1-unsloth_gc", tmp_path)
    assert env["PYTHONPATH"] == f"{unsloth_run.SITE}:/tmp/site:/repo/src"
    assert env["HF_HUB_OFFLINE"] == "1" and env["UNSLOTH_DISABLE_STATISTICS"] == "1"
    assert Path(env["UNSLOTH_COMPILE_LOCATION"]).is_dir()
    assert str(tmp_path) in env["UNSLOTH_COMPILE_LOCATION"]


def test_a_failed_variant_leaves_a_row_with_its_reason(tmp_path, capsys):
    log = tmp_path / "W1-unsloth_gc.log"
    log.write_text(
        "Unsloth: loading\nTraceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
        "ModuleNotFoundError: No module named 'tyro'\n"
    )
    variant = next(v for v in WORKLOADS["W1"].variants if v.name == "unsloth_gc")
    message = bench._failed(tmp_path, "W1", variant, 0, 1, log)
    assert message == "failed: ModuleNotFoundError: No module named 'tyro'"
    row = json.loads((tmp_path / "results.jsonl").read_text())
    assert row["error"] == "ModuleNotFoundError: No module named 'tyro'" and row["path"] == "unsloth"
    assert row["log_tail"][-1] == row["error"]
    ok = {"workload": "W1", "variant": "plain_gc", "path": "plain", "tokens_per_second": 5000.0}
    with open(tmp_path / "results.jsonl", "a") as fh:
        fh.write(json.dumps(ok) + "\n")
    print_report(tmp_path / "results.jsonl")
    assert "- unsloth_gc: FAILED (exit 1): ModuleNotFoundError: No module named 'tyro'" in capsys.readouterr().out


def test_target_lines_against_unsloth():
    def row(path: str, tps: float, reserved: float) -> dict:
        return {"path": path, "tokens_per_second": tps, "tokens_per_second_median_step": tps,
                "peak_reserved_gib": reserved}

    rows = {"unsloth_gc": row("unsloth", 4000, 10.0), "vlmtune_gc": row("vlmtune", 6000, 9.0),
            "vlmtune_big": row("vlmtune", 9000, 12.0)}
    line = next(x for x in _targets("W3", rows) if "Unsloth" in x)
    assert "vlmtune_gc 1.50x at 9.00 GiB" in line
    w2 = [x for x in _targets("W2", rows) if "Unsloth" in x]
    assert any("vlmtune_gc 1.50x its tokens/s" in x and "9.00 vs 10.00 GiB" in x for x in w2)


def test_lora_placement_is_compared_with_the_harness_regex():
    import torch
    from peft import LoraConfig, get_peft_model

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = torch.nn.Module()
            self.self_attn.q_proj = torch.nn.Linear(8, 8)
            self.mlp = torch.nn.Module()
            self.mlp.down_proj = torch.nn.Linear(8, 8)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Module()
            self.model.language_model = torch.nn.Module()
            self.model.language_model.layers = torch.nn.ModuleList([Layer(), Layer()])
            self.model.visual = torch.nn.Module()
            self.model.visual.proj = torch.nn.Linear(8, 8)

    regex = r"(?:model\.language_model\.layers\.\d+\.(?:[\w.]+\.)?(?:q_proj|down_proj))"
    both = get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=4, lora_dropout=0.05, target_modules=regex))
    found = unsloth_run.describe(both, regex)
    assert found["lora_targets_match"] and found["lora_modules"] == 4 and found["lora_dropout"] == 0.05
    only_q = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=r".*q_proj"))
    found = unsloth_run.describe(only_q, regex)
    assert not found["lora_targets_match"] and found["lora_modules_expected"] == 4
    assert found["lora_targets_missing"] == ["model.language_model.layers.0.mlp.down_proj",
                                             "model.language_model.layers.1.mlp.down_proj"]


def test_weights_folder_keeps_the_harness_token_ids(tmp_path, monkeypatch):
    """The checkpoint Unsloth loads: random weights next to the harness's own config, tokenizer and processor."""
    from dataclasses import replace

    work = replace(WORKLOADS["W1"], arch="tiny")
    source = tmp_path / "models" / "qwen2_vl-tiny"
    target = tmp_path / "models" / "qwen2_vl-tiny-weights"
    monkeypatch.setattr(unsloth_run, "weights_dir", lambda w, root: target)
    out = unsloth_run.write_weights(work, tmp_path)
    assert out == target and not target.with_name(target.name + ".partial").exists()
    assert any(target.glob("*.safetensors"))
    assert (target / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    config, original = (json.loads((d / "config.json").read_text()) for d in (target, source))
    assert config["image_token_id"] == original["image_token_id"]
    assert unsloth_run.write_weights(work, tmp_path) == target  # written once
