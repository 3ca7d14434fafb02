"""scripts/setup.sh picks the PyTorch build for the machine: a local wheel when pip has one, the CPU build from
PyTorch's CPU index when there is no NVIDIA GPU, the CUDA build the driver runs otherwise (checked through
--dry-run with a stand-in nvidia-smi); and the package builds a wheel that works outside the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _fake_smi(folder: Path, output: str | None) -> Path:
    """A stand-in nvidia-smi printing `output` (None: fails as it does on a machine without a GPU driver)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    if output is None:
        script.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver'\nexit 9\n")
    else:
        script.write_text(f"#!/bin/sh\necho '{output}'\n")
    script.chmod(0o755)
    return folder


def _dry_run(tmp_path: Path, smi: str | None, *args: str, **env: str) -> subprocess.CompletedProcess:
    bin_dir = _fake_smi(tmp_path / "bin", smi)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VLMTUNE_")}
    environ.update({"PATH": f"{bin_dir}:{environ['PATH']}", "VLMTUNE_LOCAL_WHEELS": "0", **env})
    return subprocess.run(["bash", "scripts/setup.sh", "--dry-run", *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=60)


def _smi_header(cuda: str) -> str:
    return f"| NVIDIA-SMI 580.65   Driver Version: 580.65   CUDA Version: {cuda} |"


def test_no_gpu_gets_the_cpu_build(tmp_path):
    result = _dry_run(tmp_path, None, "dev")
    assert result.returncode == 0, result.stderr
    assert "CPU build: no NVIDIA GPU found" in result.stdout
    assert "--index-url https://download.pytorch.org/whl/cpu" in result.stdout
    assert "-e .[dev,qlora,deepspeed,datasets]" in result.stdout
    assert not (tmp_path / ".venv").exists()


@pytest.mark.parametrize(("cuda", "variant"), [("12.6", "cu126"), ("12.8", "cu128"), ("12.9", "cu128"),
                                                ("13.0", "cu130"), ("13.1", "cu130")])
def test_a_gpu_gets_the_cuda_build_its_driver_runs(tmp_path, cuda, variant):
    result = _dry_run(tmp_path, _smi_header(cuda))
    assert result.returncode == 0, result.stderr
    assert f"CUDA build {variant}: the NVIDIA driver runs CUDA {cuda}" in result.stdout
    assert f"--index-url https://download.pytorch.org/whl/{variant}" in result.stdout


def test_a_driver_too_old_is_told_what_to_do(tmp_path):
    result = _dry_run(tmp_path, _smi_header("11.8"))
    assert result.returncode == 1
    assert "runs CUDA 11.8" in result.stderr and "VLMTUNE_TORCH=" in result.stderr


def test_the_user_choice_wins(tmp_path):
    result = _dry_run(tmp_path, _smi_header("12.8"), VLMTUNE_TORCH="torch==2.11.0",
                      VLMTUNE_TORCH_INDEX="https://mirror.example/whl/cpu")
    assert result.returncode == 0, result.stderr
    assert "would run: pip install torch==2.11.0 --index-url https://mirror.example/whl/cpu" in result.stdout


def test_a_local_wheel_wins_when_pip_has_one(tmp_path):
    """pip's configured local wheel folders (find-links) are asked first, without the network."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    # an empty but valid wheel named as a torch build for any platform: `pip download --no-index` accepts it
    # pip's own configuration is left out (this machine's points at a folder holding a real torch wheel)
    only_these = {"VLMTUNE_LOCAL_WHEELS": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(wheels)}
    result = _dry_run(tmp_path, None, **only_these)
    assert "CPU build: no NVIDIA GPU found" in result.stdout, result.stdout + result.stderr  # the folder is empty
    name = "torch-2.13.0-py3-none-any.whl"
    with zipfile.ZipFile(wheels / name, "w") as whl:
        whl.writestr("torch-2.13.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0\n")
        whl.writestr("torch-2.13.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr("torch-2.13.0.dist-info/RECORD", "")
    result = _dry_run(tmp_path, None, **only_these)
    assert result.returncode == 0, result.stderr
    assert "a matching wheel in pip's local wheel folder" in result.stdout
    assert "would run: pip install torch==2.13.0\n" in result.stdout


def test_unknown_argument_is_refused(tmp_path):
    result = _dry_run(tmp_path, None, "--devv")
    assert result.returncode == 2 and "unknown argument '--devv'" in result.stderr


@pytest.mark.slow
def test_the_built_wheel_works_outside_the_source_tree(tmp_path):
    """`pip install vlmtune` from a built wheel: every data file of the package is in it, and the installed copy
    (not src/) answers `vlmtune presets` and an offline estimate."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, timeout=300, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("vlmtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    source = REPO / "src"
    data_files = [p.relative_to(source).as_posix() for p in (source / "vlmtune").rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    missing = [f for f in data_files if f not in names]
    assert not missing, f"package files missing from the wheel (pyproject's package-data): {missing}"
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    code = ("import vlmtune, sys; assert vlmtune.__file__.startswith(sys.argv[1]), vlmtune.__file__;"
            "from vlmtune.cli.main import main; sys.exit(main(sys.argv[2:]))")
    for args in (["presets", "list"], ["estimate", "--model", "Qwen/Qwen2-VL-2B-Instruct", "--method", "lora"]):
        result = subprocess.run([sys.executable, "-c", code, str(target), *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
