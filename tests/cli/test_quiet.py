"""Quiet by default (issue 20 item 6): a `vlmtune train` prints vlmtune's own lines and one progress bar; other
libraries' notes (transformers' FutureWarning, DeepSpeed's accelerator note, bitsandbytes' kernel note, transformers'
loading bars) only with --verbose; step lines and log lines never share a screen line with the bar."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from terminal import NOISE, screen


def _train(tmp_path: Path, model: Path, data: Path, *flags: str) -> str:
    tmp_path.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(model)}, "data": {"train_path": str(data)},
        "method": {"name": "qlora"},
        "training": {"max_steps": 3, "batch_size": 2, "logging_steps": 1, "save_steps": 2, "report_to": ["none"]},
        "hardware": {"use_cpu": True},
    }))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PYTHONWARNINGS")}
    res = subprocess.run([sys.executable, "-m", "vlmtune.cli", "train", str(config), *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                         env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:]
    return res.stdout


@pytest.mark.slow
def test_train_is_quiet_and_verbose_shows_the_rest(tiny_model_dir, shapes_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    model, data = tiny_model_dir("qwen2_vl"), shapes_data[0]
    out = _train(tmp_path / "quiet", model, data)
    shown = screen(out)
    assert not [line for line in shown if any(n in line for n in NOISE)], shown
    steps = [line for line in shown if "step " in line and "/3  loss" in line]
    assert [line.split()[1] for line in steps] == ["1/3", "2/3", "3/3"]
    for line in steps + [line for line in shown if line.startswith(("family ", "data check:", "loss curve:"))]:
        assert "%|" not in line and "step/s" not in line, line  # no bar fragment on a log or step line
    assert "Traceback" not in out

    verbose = _train(tmp_path / "verbose", model, data, "--verbose")
    assert "FutureWarning" in verbose  # hidden by default, not gone
