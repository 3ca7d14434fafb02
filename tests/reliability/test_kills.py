"""kill -9 at a random training step and at each phase of a checkpoint save, for full fine-tuning, LoRA, QLoRA,
DeepSpeed ZeRO-2 (one CPU process, gloo) and LoRA with padding-free packing; then `vlmtune train --resume` must give the uninterrupted run's losses,
step for step and bit for bit, and the same final weights.

Every run is a real `vlmtune train` process (tests/reliability/kill_runner.py kills it with SIGKILL from inside, at
the chosen moment). The step of the "step" kill is drawn from VLMTUNE_KILL_SEED (default 0; scripts/reliability.sh
draws a new one each time and prints it).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("kill_runner.py")
STEPS, SAVE_EVERY, KILLED_SAVE = 6, 2, 4
SEED = int(os.environ.get("VLMTUNE_KILL_SEED", "0"))
PHASES = ["step", "weights", "optimizer", "rng", "manifest", "rename"]
METHODS = ["full", "lora", "qlora", "zero2", "packed"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"no result after {timeout} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def _config(folder: Path, model: Path, data: Path, method: str) -> Path:
    name = {"zero2": "full", "packed": "lora"}.get(method, method)
    config = {
        "output_dir": str(folder / "run"),
        "model": {"name_or_path": str(model)},
        "data": {"train_path": str(data)},
        "method": {"name": name, "lora": {"dropout": 0.1}},  # dropout on: the RNG state must come back too
        "training": {"max_steps": STEPS, "batch_size": 2, "learning_rate": 5e-3, "logging_steps": 1,
                     "save_steps": SAVE_EVERY, "save_total_limit": 2, "report_to": ["none"]},
        "hardware": {"precision": "bf16" if method == "qlora" else "fp32", "use_cpu": True},
    }
    if method == "zero2":
        config["distributed"] = {"engine": "deepspeed", "zero_stage": 2}
    if method == "packed":  # padding-free packing: rows of several samples, positions restarting per sample
        config["speed"] = {"packing": True, "packing_max_tokens": 256}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train_cmd(method: str, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vlmtune.cli", "train", str(config), *extra]


def _kill_cmd(method: str, phase: str, step: int, config: Path) -> list[str]:
    inner = [str(RUNNER), phase, str(step), "--", "train", str(config)]
    if method == "zero2":  # the process DeepSpeed trains in is the one that must die
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *inner]
    return [sys.executable, *inner]


def _losses(run: Path) -> dict[int, float]:
    """The loss of each step; a step logged twice (before a kill and again after the resume) keeps its last value."""
    out = {}
    for line in (run / "train_log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "loss" in entry and "step" in entry:
            out[entry["step"]] = entry["loss"]
    return out


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(final / name)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, shapes_data) -> tuple[Path, Path]:
    return tiny_model_dir("qwen2_vl"), shapes_data[0]


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    """method -> the run folder of a run that was never stopped."""
    done: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in done:
            folder = tmp_path_factory.mktemp(f"whole-{method}")
            result = _run(_train_cmd(method, _config(folder, *setup, method)))
            assert result.returncode == 0, result.stdout[-4000:]
            done[method] = folder / "run"
        return done[method]

    return get


def _kill_step(method: str) -> int:
    """The step a "step" kill hits: drawn per method from VLMTUNE_KILL_SEED among the steps after a checkpoint."""
    return random.Random(f"{SEED}-{method}").choice([3, 4, 5, 6])


def _requirements(method: str) -> None:
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    if method == "zero2":
        pytest.importorskip("deepspeed")


# The full matrix trains 65 tiny runs (about 10 minutes on 2 cores): CI runs a quick subset, the script all of it.
# CI's subset kills every method once and leaves a save in each state a kill can: none begun (step), an unfinished
# staging folder (optimizer: a half-written file; rng: a file not yet written), hashed but no manifest, renamed but
# not rotated. ("full", "weights"), a half-written file in the staging folder as ("lora", "optimizer") is, runs in
# the script only (~25 s of CI time).
QUICK = {("full", "step"), ("lora", "optimizer"), ("qlora", "manifest"), ("zero2", "rename"), ("packed", "rng")}


@pytest.mark.reliability("kills")
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("method", METHODS)
def test_killed_run_resumes_bit_for_bit(method, phase, setup, uninterrupted, tmp_path):
    if (method, phase) not in QUICK and not os.environ.get("VLMTUNE_ALL_KILLS"):
        pytest.skip("part of the full kill matrix: bash scripts/reliability.sh")
    _requirements(method)
    whole = uninterrupted(method)
    config = _config(tmp_path, *setup, method)
    run = tmp_path / "run"
    step = _kill_step(method) if phase == "step" else KILLED_SAVE

    killed = _run(_kill_cmd(method, phase, step, config))
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL, 1), killed.stdout[-3000:]  # torchrun: 1
    assert not (run / "final").exists(), "the killed run got to the end"
    newest_intact = max(s for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY) if s < step
                        or (s == step and phase == "rename"))

    resumed = _run(_train_cmd(method, config, "--resume"))
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    start = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()
             if '"event": "start"' in line][-1]
    assert Path(start["resumed_from"]).name == f"checkpoint-{newest_intact}"
    assert _losses(run) == _losses(whole)  # bit for bit: the JSON floats are the same
    got, want = _final_weights(run), _final_weights(whole)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert not (run / ".staging").exists()
