"""Helpers for tests that read the CLI's output as a user sees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

NOISE = ("Warning:", "warnings.warn", "[WARNING]", "Setting accelerator", "gemm_4bit_forward", "Loading weights",
         "Writing model shards")
"""Text of other libraries' notes that vlmtune hides unless --verbose (cli/quiet.py)."""


def screen(raw: str) -> list[str]:
    """The lines a terminal shows for `raw` (stdout and stderr merged): a carriage return goes back to column 0 and
    overwrites, as tqdm's redraws and clears do."""
    lines = []
    for line in raw.split("\n"):
        shown: list[str] = []
        for segment in line.split("\r"):
            shown[: len(segment)] = segment
        lines.append("".join(shown).rstrip())
    return [line for line in lines if line]


def noise(raw: str) -> list[str]:
    return [line for line in screen(raw) if any(n in line for n in NOISE) or "Traceback" in line]


class Run:
    """`vlmtune ARGS` in a subprocess (as `python -m vlmtune.cli`), its merged output collected as it comes."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "vlmtune.cli", *args], env=env, cwd=cwd,
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

    def finish(self, timeout: float = 240) -> int:
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
