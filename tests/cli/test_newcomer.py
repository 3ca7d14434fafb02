"""A newcomer's first session, scripted (issue 20, Done when): the setup's choice of PyTorch build (dry run; the
install itself is what CI's own setup runs) -> the demo -> a tiny model served by its hub id through a local fake hub
(fake_hub.py) -> data check -> train -> Ctrl-C -> the printed resume command -> predict (base read from the adapter)
-> export; no traceback and no other library's warning anywhere."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
from fake_hub import FakeHub
from terminal import Run, noise

REPO_ID = "tiny-org/tiny-qwen2-vl"


@pytest.mark.slow
def test_newcomer_session(tiny_model_dir, shapes_data, tmp_path):
    train, val = shapes_data
    outputs = []

    def vlmtune(*args: str) -> Run:
        run = Run(list(args), env, cwd=tmp_path)
        outputs.append(run)
        return run

    repo = Path(__file__).resolve().parents[2]
    setup = subprocess.run(["bash", "scripts/setup.sh", "--dry-run", "dev"], cwd=repo, capture_output=True,
                           text=True, timeout=120)
    assert setup.returncode == 0 and "setup (dry run): PyTorch: " in setup.stdout, setup.stdout + setup.stderr

    with FakeHub({REPO_ID: {"main": tiny_model_dir("qwen2_vl")}}) as hub:
        env = hub.env(tmp_path, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        demo = vlmtune("demo", "--out", "demo")
        assert demo.finish() == 0, demo.text[-3000:]
        summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
        assert summary["accuracy_after"] > summary["accuracy_before"], summary
        check = vlmtune("data", "check", str(train), "--model", REPO_ID)
        assert check.finish() == 0, check.text[-3000:]
        assert "16 ok, 0 bad" in check.text and "tokens: p50" in check.text  # counted by the hub model

        command = ["train", "--model", REPO_ID, "--train-data", str(train), "--output-dir", "run",
                   "method.name=lora", "training.max_steps=40", "training.logging_steps=1", "hardware.use_cpu=true"]
        first = vlmtune(*command)
        first.wait_for("step 2/40")
        first.proc.send_signal(signal.SIGINT)
        assert first.finish() == 130, first.text[-3000:]
        resume = first.text.split("Continue the run with:\n")[1].strip().splitlines()[0]
        assert resume == shlex.join(["vlmtune", *command, "--resume"])

        second = vlmtune(*shlex.split(resume)[1:])
        assert second.finish() == 0, second.text[-3000:]
        assert "result: " in second.text and (tmp_path / "run" / "final" / "adapter_config.json").is_file()

        predict = vlmtune("predict", "--adapter", "run/final", "--data", str(val), "--out", "predictions")
        assert predict.finish() == 0, predict.text[-3000:]
        assert len((tmp_path / "predictions" / "predictions.jsonl").read_text().splitlines()) == 4

        export = vlmtune("export", "--adapter", "run/final", "--out", "merged")
        assert export.finish() == 0, export.text[-3000:]
        merged = json.loads((tmp_path / "merged" / "config.json").read_text())
        assert merged["model_type"] == "qwen2_vl"

    for run in outputs:
        assert not noise(run.text), (run.proc.args, noise(run.text))
