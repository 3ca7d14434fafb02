"""A full disk during training: the save that fails is removed, the earlier checkpoints stay intact and resumable,
and the message names the folder, the free space and about what the save needs, without a traceback.

On a real small file system (a tmpfs, where this machine lets the tests mount one: CI runs as root) the libraries
fail as they really do (`torch.save` raises "unexpected pos", safetensors its own error); elsewhere ENOSPC is
simulated.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from vlmtune.cli.main import main
from vlmtune.train.checkpoints import verify_checkpoint
from vlmtune.train.engine import train
from vlmtune.train.saving import find_checkpoints
from vlmtune.train.trainer import VlmTrainer

TRAINING = {"max_steps": 4, "save_steps": 1, "save_total_limit": None}


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(bytes) -> a folder on a tmpfs of that size (skips where mounting is not allowed)."""
    mounted = []

    def make(size: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:100]}); the simulated case covers it")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _config_file(run_config, out: Path, folder: Path, method: str) -> Path:
    config = run_config(method=method, out=out, training=TRAINING, hardware={"precision": "fp32"})
    path = folder / f"config-{method}.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


@pytest.mark.slow
@pytest.mark.reliability("disk")
@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_real_full_disk_keeps_the_earlier_checkpoints(method, run_config, small_disk, tmp_path, capsys):
    # Measure one checkpoint of this run, then train on a disk with room for two checkpoints and the logs only.
    probe = train(run_config(method=method, out=tmp_path / "probe", training={**TRAINING, "max_steps": 1},
                             hardware={"precision": "fp32"}))
    checkpoint = sum(p.stat().st_size for p in probe.checkpoints[0].rglob("*") if p.is_file())
    disk = small_disk(int(checkpoint * 2.6) + 256 * 1024)
    config = _config_file(run_config, disk / "run", tmp_path, method)

    code = main(["train", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert "the disk is full" in err and str(disk / "run") in err and "free there" in err
    assert "continue with --resume (checkpoint-2 is intact)" in err
    kept = find_checkpoints(disk / "run")
    assert [p.name for p in kept] == ["checkpoint-1", "checkpoint-2"]
    assert all(verify_checkpoint(p).ok for p in kept)
    assert not (disk / "run" / ".staging").exists()

    # Moved to a disk with room, the run continues from the newest intact checkpoint and finishes.
    shutil.copytree(disk / "run", tmp_path / "roomy")
    assert main(["train", str(config), f"output_dir={tmp_path / 'roomy'}", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out or (tmp_path / "roomy" / "final").is_dir()
    assert (tmp_path / "roomy" / "final").is_dir()


@pytest.mark.slow
@pytest.mark.reliability("disk")
def test_a_simulated_full_disk_at_the_rng_state(run_config, monkeypatch, tmp_path):
    original = VlmTrainer._save_rng_state

    def full_at_step_3(self, output_dir):
        if self.state.global_step == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "rng_state.pth"))
        original(self, output_dir)

    monkeypatch.setattr(VlmTrainer, "_save_rng_state", full_at_step_3)
    config = run_config(out=tmp_path / "run", training=TRAINING)
    from vlmtune.errors import VlmtuneError

    with pytest.raises(VlmtuneError, match=r"disk is full: writing checkpoint-3 .*checkpoint-2 is intact"):
        train(config)
    assert [p.name for p in find_checkpoints(tmp_path / "run")] == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / "run" / ".staging").exists()
