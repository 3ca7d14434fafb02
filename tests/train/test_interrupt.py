"""Ctrl-C saves (issue 20 item 5): a real SIGINT to a `vlmtune train` process. The first finishes the step, writes a
checkpoint through the atomic save (manifest included) and prints the exact command that continues the run, which
then finishes it; a second stops at once."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
STEPS = 60


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


class Run:
    """A `vlmtune train` subprocess whose merged output is collected as it comes."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "vlmtune.cli", *args], cwd=REPO, env=_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.output = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self.output += chunk

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while needle not in self.text:
            if self.proc.poll() is not None or time.monotonic() > end:
                self.kill()
                pytest.fail(f"never printed {needle!r}:\n{self.text[-3000:]}")
            time.sleep(0.02)

    def finish(self, timeout: float = 180) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"no exit after {timeout} s:\n{self.text[-3000:]}")
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


def _config(tmp_path: Path, model: Path, data: Path, workers: int = 0) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(model)}, "data": {"train_path": str(data)},
        "method": {"name": "lora"},
        "training": {"max_steps": STEPS, "batch_size": 2, "logging_steps": 1, "save_steps": 1000,
                     "report_to": ["none"]},
        "hardware": {"precision": "fp32", "use_cpu": True, "dataloader_workers": workers},
    }))
    return path


@pytest.mark.slow
def test_first_ctrl_c_saves_and_prints_the_resume_command(tiny_model_dir, shapes_data, tmp_path):
    config = _config(tmp_path, tiny_model_dir("qwen2_vl"), shapes_data[0])
    run = Run(["train", str(config)])
    run.wait_for("step 2/")
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130, run.text[-3000:]
    text = run.text
    assert "Traceback" not in text and "finishing this step, then saving a checkpoint" in text
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "vlmtune_manifest.json").is_file()
    step = int(checkpoints[0].name.split("-")[1])
    assert 2 <= step < STEPS and not (tmp_path / "run" / "final").exists()
    assert f"interrupted (Ctrl-C) after step {step}; checkpoint saved: {checkpoints[0]}" in text
    command = text.split("Continue the run with:\n")[1].strip().splitlines()[0]
    assert command == shlex.join(["vlmtune", "train", str(config), "--resume"])

    resumed = Run(shlex.split(command)[1:])  # the printed command, as `python -m vlmtune.cli`
    assert resumed.finish() == 0, resumed.text[-3000:]
    events = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    starts = [e for e in events if e.get("event") == "start"]
    assert starts[-1]["resumed_from"] == str(checkpoints[0])
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    assert max(e["step"] for e in events if "loss" in e) == STEPS


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once(tiny_model_dir, shapes_data, tmp_path):
    config = _config(tmp_path, tiny_model_dir("qwen2_vl"), shapes_data[0])
    run = Run(["train", str(config)])
    run.wait_for("step 2/")
    run.proc.send_signal(signal.SIGINT)
    run.wait_for("press Ctrl-C again")
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130, run.text[-3000:]
    assert "Continue the run with" not in run.text and "Traceback" not in run.text
    assert run.text.rstrip().endswith("interrupted")


@pytest.mark.slow
def test_ctrl_c_with_data_loader_workers(tiny_model_dir, shapes_data, tmp_path):
    """Workers are forked with the handler (and get the terminal's SIGINT too): they ignore it, the main process
    saves once."""
    config = _config(tmp_path, tiny_model_dir("qwen2_vl"), shapes_data[0], workers=2)
    run = Run(["train", str(config)])
    run.wait_for("step 2/")
    os.killpg(run.proc.pid, signal.SIGINT)  # the whole process group, as a terminal's Ctrl-C
    assert run.finish() == 130, run.text[-3000:]
    assert run.text.count("finishing this step") == 1 and "Traceback" not in run.text
    assert len(list((tmp_path / "run").glob("checkpoint-*/vlmtune_manifest.json"))) == 1
