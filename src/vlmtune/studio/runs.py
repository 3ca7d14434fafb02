"""Train page: runs as the CLI makes them. A run is started as a `vlmtune train` process (the command the
Configure page shows), stopped with SIGINT (the engine finishes the step and saves a checkpoint, as on Ctrl-C) and
resumed with `--resume`; every run folder under the opened folders (the `.vlmtune-output` marker of kind "run") is
listed, CLI runs too, with its curves read from `train_log.jsonl`."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtune.errors import VlmtuneError
from vlmtune.studio.cli_args import command_text, parse
from vlmtune.studio.paths import Roots, model_ref

LOG_FILE = "train_log.jsonl"
CURVE_KEYS = ("loss", "eval_loss", "learning_rate", "tokens_per_second", "mem_reserved_gib", "mem_peak_gib",
              "mem_rss_gib")
"""What the page draws, by train_log.jsonl key (GPU memory on a GPU, the process's resident memory on the CPU)."""


@dataclass
class Job:
    argv: list[str]
    folder: Path
    process: subprocess.Popen[bytes]
    console: Path
    started: float = field(default_factory=time.time)
    stop_requested: bool = False

    @property
    def running(self) -> bool:
        return self.process.poll() is None


class Runs:
    """The `vlmtune train` processes this studio started (one per run folder) and the run folders it can see."""

    def __init__(self, roots: Roots, state_dir: Path) -> None:
        self.roots, self.state_dir = roots, state_dir
        self._jobs: dict[Path, Job] = {}
        self._lock = threading.Lock()

    def start(self, argv: list[str]) -> dict[str, Any]:
        """Start `vlmtune ARGV` (a train command) in the first opened folder once its config checks out and its
        run folder lies inside the opened folders."""
        from vlmtune.cli.train_cmd import resolve_config

        if argv[:1] != ["train"]:
            raise VlmtuneError("train: only `vlmtune train ...` commands start runs")
        config = resolve_config(parse(argv))
        folder = self.roots.resolve(str(self._in_home(config.output_dir)), "output_dir")
        for name, path in (("data.train_path", config.data.train_path), ("data.val_path", config.data.val_path),
                           ("data.image_root", config.data.image_root)):
            if path is not None:
                self.roots.resolve(str(self._in_home(path)), name)
        model_ref(self.roots, config.model.name_or_path, "model.name_or_path")  # a folder must be inside too
        with self._lock:
            job = self._jobs.get(folder)
            if job is not None and job.running:
                raise VlmtuneError(f"output_dir: a run is already training into {self.roots.shown(folder)}; stop it "
                                   "first, or set output_dir to another folder")
            console = Path(tempfile.mkstemp(prefix="train-", suffix=".log", dir=self.state_dir)[1])
            with open(console, "wb") as out:
                process = subprocess.Popen([sys.executable, "-m", "vlmtune.cli", *argv], cwd=self.roots.home,
                                           stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self._jobs[folder] = Job(argv, folder, process, console)
        return {"folder": self.roots.shown(folder), "command": command_text(argv), "pid": process.pid}

    def _in_home(self, path: Path) -> Path:
        return path if Path(path).is_absolute() else self.roots.home / path

    def resume_argv(self, folder: Path) -> list[str]:
        """`vlmtune train RUN/config.yaml output_dir=RUN --resume`: the run's own resolved config, CLI runs too."""
        config = folder / "config.yaml"
        if not config.is_file():
            raise VlmtuneError(f"resume: {self.roots.shown(folder)} has no config.yaml (not a vlmtune run folder, or "
                               "the run never started); start a new run instead")
        return ["train", str(config), f"output_dir={folder}", "--resume"]

    def stop(self, folder: Path) -> dict[str, Any]:
        """SIGINT, as Ctrl-C: the step finishes and a checkpoint is saved; a second stop stops at once."""
        job = self._jobs.get(folder)
        if job is None or not job.running:
            raise VlmtuneError(f"stop: no run started by this studio is training into {self.roots.shown(folder)} "
                               "(a run started from a terminal stops with Ctrl-C there)")
        job.process.send_signal(signal.SIGINT)
        again = job.stop_requested
        job.stop_requested = True
        return {"folder": self.roots.shown(folder), "signal": "SIGINT", "second": again}

    def stop_all(self, wait: float = 60.0) -> None:
        """On the studio's exit: every run it started saves a checkpoint and ends."""
        running = [j for j in self._jobs.values() if j.running]
        for job in running:
            job.process.send_signal(signal.SIGINT)
        for job in running:
            try:
                job.process.wait(wait)
            except subprocess.TimeoutExpired:
                job.process.terminate()

    def folders(self) -> list[Path]:
        """Run folders under the opened folders (marker of kind "run") and those this studio started."""
        from vlmtune.outputs import read_marker

        found = {f for f in self.roots.walk() if "run" in (read_marker(f).get("kinds") or [])}
        found |= set(self._jobs)
        return sorted(found)

    def listing(self) -> list[dict[str, Any]]:
        return [self.describe(f) for f in self.folders()]

    def describe(self, folder: Path) -> dict[str, Any]:
        from vlmtune.train.saving import find_checkpoints

        job = self._jobs.get(folder)
        rows = _rows(folder / LOG_FILE)
        steps = [r["step"] for r in rows if "loss" in r and "step" in r]
        finished = (folder / "final").is_dir()
        if job is not None and job.running:
            status = "stopping" if job.stop_requested else "running"
        elif job is not None and job.process.returncode not in (0, None):
            code = job.process.returncode
            if finished and (folder / "final").stat().st_mtime >= job.started:
                status = "finished"  # a stop that came as the run was ending
            else:
                status = "stopped" if code in (130, -signal.SIGINT) else f"failed (exit {code})"
        elif not finished and _age(folder / LOG_FILE) < ACTIVE_SECONDS:
            status = "running elsewhere"  # a CLI run writing its log
        else:
            status = "finished" if finished else ("stopped" if find_checkpoints(folder) else "not started")
        return {
            "folder": self.roots.shown(folder),
            "status": status,
            "started_here": job is not None,
            "command": command_text(job.argv) if job else None,
            "last_step": steps[-1] if steps else None,
            "checkpoints": [c.name for c in find_checkpoints(folder)],
            "adapter": self.roots.shown(folder / "final") if finished else None,
            "has_config": (folder / "config.yaml").is_file(),
        }

    def detail(self, folder: Path) -> dict[str, Any]:
        """The run's curves, loss picture, config and (for runs this studio started) the process's output."""
        from vlmtune.train.plot import render_loss_curve

        log = folder / LOG_FILE
        rows = _rows(log)
        curves = {k: [[r["step"], r[k]] for r in rows if k in r and "step" in r] for k in CURVE_KEYS}
        picture = None
        if log.is_file():
            with tempfile.TemporaryDirectory(prefix="vlmtune-studio-") as tmp:
                png = render_loss_curve(log, Path(tmp) / "loss.png", title=f"loss: {folder.name}")
                picture = base64.b64encode(png.read_bytes()).decode("ascii") if png else None
        job = self._jobs.get(folder)
        console = _tail(job.console) if job else None
        config = folder / "config.yaml"
        return {**self.describe(folder), "curves": {k: v for k, v in curves.items() if v}, "loss_png": picture,
                "events": [r for r in rows if "event" in r][-20:], "console": console,
                "config": config.read_text(encoding="utf-8") if config.is_file() else None}

    def run_folder(self, text: str) -> Path:
        folder = self.roots.resolve(text, "run folder")
        if folder not in self.folders():
            raise VlmtuneError(f"run folder: {text} is not a vlmtune run folder (no .vlmtune-output marker of a run); "
                               "pick one from the run list")
        return folder


ACTIVE_SECONDS = 60
"""A run folder whose log changed this recently (and has no final result) counts as training elsewhere."""


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _rows(log: Path) -> list[dict[str, Any]]:
    """train_log.jsonl's rows; a line being written (no newline yet) or not JSON is skipped."""
    try:
        text = log.read_text(encoding="utf-8")
    except OSError:
        return []
    rows = []
    for line in text.split("\n")[:-1]:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _tail(path: Path, size: int = 6000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-size:].decode("utf-8", errors="replace")
