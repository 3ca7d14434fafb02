"""The studio's HTTP endpoints, driven without a browser (CI): each page's action gives what the CLI command
gives, paths stay inside the opened folders, and a run started here trains, stops with a checkpoint and resumes."""

from __future__ import annotations

import base64
import json
import shlex
import time
from pathlib import Path

import pytest
from studio_client import bad_data, tiny_form


def test_info_lists_every_config_field_with_its_doc(studio):
    info = studio.ok("/api/info")
    fields = {f["path"]: f for f in info["fields"]}
    from vlmtune.config.loader import field_info

    assert fields["training.batch_size"]["doc"] == " ".join(field_info("training.batch_size").description.split())
    assert set(fields["method.name"]["choices"]) == {"lora", "qlora", "full"}
    assert "balanced" in [p["name"] for p in info["presets"]] and "RTX 4090 24GB" in info["gpus"]


def test_data_check_reports_the_bad_line(studio, workspace):
    from vlmtune.cli.data_cmd import check
    from vlmtune.studio.cli_args import parse

    path = bad_data(workspace)
    report = studio.ok("/api/data/check", {"file": "bad.jsonl", "model": str(workspace["model"])})
    assert not report["ok"] and [p["line"] for p in report["errors"]] == [2]
    assert "invalid JSON" in report["errors"][0]["message"]
    assert report["summary"]["records_ok"] == 2 and "tokens" in report["summary"]
    assert sum(b["records"] for b in report["summary"]["token_histogram"]) == 2
    assert report["summary"]["image_sides"] == {"1-128": 2}  # the shapes are 56 px
    cli, _ = check(parse(["data", "check", str(path), "--model", str(workspace["model"])]))
    assert report["summary"] == json.loads(json.dumps(cli.to_dict()["summary"]))  # the CLI's own report
    assert report["command"] == f"vlmtune data check {path} --model {workspace['model']}"


def test_samples_mark_the_trained_tokens(studio, workspace):
    out = studio.ok("/api/data/samples", {"file": str(workspace["train"]), "model": str(workspace["model"]),
                                          "start": 1, "count": 2})
    assert [s["line"] for s in out["samples"]] == [2, 3] and out["family"] == "qwen2_vl"
    sample = out["samples"][0]
    trained = "".join(t["text"] for t in sample["tokens"] if t["trained"])
    answer = json.loads(workspace["train"].read_text().splitlines()[1])["messages"][1]["content"][0]["text"]
    assert trained == answer + "<|im_end|>"
    images = [t for t in sample["tokens"] if t.get("image")]
    assert len(images) == 1 and images[0]["count"] > 1 and not images[0]["trained"]
    assert [s["labelled"] for s in sample["segments"]] == [False, True, False]
    assert sample["images"][0]["png"] and sample["trained_tokens"] == sum(t["trained"] for t in sample["tokens"])


def test_estimate_follows_the_batch_size_and_matches_the_cli(studio, workspace):
    from vlmtune.cli.estimate_cmd import estimate_args
    from vlmtune.studio.cli_args import parse

    small = studio.ok("/api/config/estimate", {"form": tiny_form(workspace)})
    large = studio.ok("/api/config/estimate", {"form": tiny_form(workspace, **{"training.batch_size": "16"})})
    assert large["peak_gib"] > small["peak_gib"]
    assert base64.b64decode(small["png"])[:4] == b"\x89PNG"
    argv = shlex.split(large["command"])[1:]
    _, breakdown, _ = estimate_args(parse(argv))
    assert breakdown.to_table() == large["table"]


def test_resolve_shows_the_command_yaml_and_problems(studio, workspace):
    out = studio.ok("/api/config/resolve", {"form": {"preset": "balanced", "settings": {"method.lora.rank": "8"}}})
    assert out["command"] == "vlmtune train --preset balanced method.lora.rank=8"
    assert out["values"]["method.lora.rank"] == "8" and out["values"]["data.image_size"] == "448"
    assert "rank: 8" in out["yaml"]
    bad = studio.ok("/api/config/resolve", {"form": {"settings": {"training.batch_sise": "2"}}})
    assert any("training.batch_size" in p for p in bad["problems"])  # did you mean


def test_recommend_fills_the_form(studio, workspace):
    out = studio.ok("/api/config/recommend", {"form": tiny_form(workspace)})
    assert out["command"].startswith("vlmtune recommend ") and "--gpu 'RTX 4090'" in out["command"]
    assert out["settings"]["model.name_or_path"] == str(workspace["model"])
    assert "method.name" in out["settings"] and "training.batch_size" in out["settings"]
    again = studio.ok("/api/config/resolve", {"form": {"settings": out["settings"]}})
    assert again["problems"] == []


def test_save_writes_yaml_the_cli_reads_with_the_output_rules(studio, workspace):
    from vlmtune.config.loader import load_config

    form = tiny_form(workspace)
    assert studio.ok("/api/config/save", {"form": form, "path": "configs/tiny.yaml"})["saved"] == "configs/tiny.yaml"
    saved = load_config(workspace["work"] / "configs/tiny.yaml")
    assert saved.training.max_steps == 6 and str(saved.model.name_or_path) == str(workspace["model"])
    studio.ok("/api/config/save", {"form": form, "path": "configs/tiny.yaml"})  # its own file: replaced
    (workspace["work"] / "mine.yaml").write_text("# mine\n")
    status, out = studio.call("/api/config/save", {"form": form, "path": "mine.yaml"})
    assert status == 400 and "mine.yaml" in out["error"] and "--overwrite" in out["error"]


def test_paths_outside_the_opened_folders_are_refused(studio, workspace, tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_text(workspace["train"].read_text())
    status, out = studio.call("/api/data/check", {"file": str(outside)})
    assert status == 400 and "outside the folders this studio opened" in out["error"] and "data file" in out["error"]
    status, out = studio.call("/api/files?folder=..")
    assert status == 400 and "folder" in out["error"]
    status, out = studio.call("/api/config/save", {"form": tiny_form(workspace), "path": "../x.yaml"})
    assert status == 400
    status, out = studio.call("/api/train/start", {"form": tiny_form(workspace, output_dir=str(tmp_path / "elsewhere"))})
    assert status == 400 and "output_dir" in out["error"]
    form = tiny_form(workspace, **{"model.name_or_path": str(tmp_path / "other-model")})
    status, out = studio.call("/api/train/start", {"form": form})
    assert status == 400 and "model.name_or_path" in out["error"]
    listing = studio.ok("/api/files?folder=.")
    assert listing["folder"] == "." and listing["parent"] is None


def test_requests_must_name_this_server_and_post_json(studio):
    status, out = studio.call("/api/info", headers={"Host": "evil.example:80"})
    assert status == 403
    status, out = studio.call("/api/config/resolve", {"form": {}}, headers={"Content-Type": "text/plain"})
    assert status == 400 and "JSON" in out["error"]
    status, out = studio.call("/api/nothing")
    assert status == 404


def test_the_cli_binds_to_localhost_by_default():
    from vlmtune.cli.main import parse_args

    args = parse_args(["studio"])
    assert (args.host, args.port, args.folders) == ("127.0.0.1", 7860, [])


def test_a_cli_run_folder_is_listed_with_its_curves(studio, workspace):
    from vlmtune.outputs import record

    run = workspace["work"] / "cli-run"
    run.mkdir()
    record(run, kind="run")
    rows = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-3, "tokens_per_second": 100.0 + s} for s in (1, 2, 3)]
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    runs = studio.ok("/api/runs")["runs"]
    assert [r["folder"] for r in runs] == ["cli-run"] and runs[0]["started_here"] is False
    assert runs[0]["status"] == "running elsewhere"  # its log was just written, no final result yet
    detail = studio.ok("/api/run?folder=cli-run")
    assert detail["curves"]["loss"] == [[1, 2.0], [2, 1.0], [3, 2.0 / 3]]  # the half-written line is skipped
    assert detail["loss_png"] and detail["last_step"] == 3
    status, out = studio.call("/api/train/stop", {"folder": "cli-run"})
    assert status == 400 and "Ctrl-C" in out["error"]


def _wait(studio, folder: str, until, timeout: float = 240) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        run = studio.ok(f"/api/run?folder={folder}")
        if until(run):
            return run
        assert not run["status"].startswith("failed"), run["console"]
        time.sleep(0.5)
    raise AssertionError(f"timed out: {run}")


@pytest.mark.slow
def test_train_stop_resume_then_try_and_export(studio, workspace):
    """A run started here: loss logged, SIGINT saves a checkpoint, --resume finishes it; then the adapter answers
    (next to its base), predict --data scores a file, export merges it (refused into a data folder)."""
    # long enough to stop mid-way on a fast machine (24 steps finished in 0.4 s on one, before the stop landed: the
    # studio sees a step only at its next 0.5 s poll); no periodic save, so the checkpoint is the stop's
    form = tiny_form(workspace, **{"training.max_steps": "300", "training.save_steps": "1000"})
    started = studio.ok("/api/train/start", {"form": form})
    assert started["folder"] == "runs/tiny" and started["command"].startswith("vlmtune train model.name_or_path=")
    status, out = studio.call("/api/train/start", {"form": form})
    assert status == 400 and "already training" in out["error"]
    run = _wait(studio, "runs/tiny", lambda r: (r["last_step"] or 0) >= 1)
    assert run["status"] == "running" and run["curves"]["loss"]
    studio.ok("/api/train/stop", {"folder": "runs/tiny"})
    run = _wait(studio, "runs/tiny", lambda r: r["status"] not in ("running", "stopping"))
    assert run["status"] == "stopped" and run["checkpoints"] and run["adapter"] is None, run["console"]
    resumed = studio.ok("/api/train/resume", {"folder": "runs/tiny"})
    assert resumed["command"].endswith("--resume")
    run = _wait(studio, "runs/tiny", lambda r: r["status"] not in ("running", "stopping"))
    assert run["status"] == "finished" and run["last_step"] == 300, run["console"]
    assert run["adapter"] == "runs/tiny/final" and "resumed from checkpoint" in run["console"]

    image = next((workspace["data"] / "images").iterdir())
    upload = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    asked = studio.ok("/api/try/ask", {"adapter": run["adapter"], "prompt": "What colour is the shape?",
                                       "uploads": [{"data": upload}], "compare": True})
    assert isinstance(asked["answer"], str) and isinstance(asked["base_answer"], str)
    assert asked["base_command"].startswith(f"vlmtune predict --model {workspace['model']}")
    status, out = studio.call("/api/try/ask", {"adapter": run["adapter"], "prompt": "x", "uploads": ["bm90IGFu"]})
    assert status == 400 and "image" in out["error"]

    scored = studio.ok("/api/try/predict", {"adapter": run["adapter"], "data": str(workspace["val"])})
    assert scored["total"] == 4 and len(scored["wrong"]) == 4 - scored["correct"]
    assert Path(scored["predictions"]) == workspace["work"] / "runs/tiny/final/predictions.jsonl"

    exported = studio.ok("/api/export", {"adapter": run["adapter"], "out": "merged"})
    assert exported["out"] == "merged" and "model.safetensors" in exported["files"]
    status, out = studio.call("/api/export", {"adapter": run["adapter"], "out": str(workspace["data"])})
    assert status == 400 and "did not write" in out["error"]
