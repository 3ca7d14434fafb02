"""Ctrl-C saves: a first SIGINT lets the current optimizer step finish, writes a checkpoint (the Trainer's save, so
through trainer.py's staging + manifest, docs/RELIABILITY.md) and ends the run with the command that continues it; a
second SIGINT stops at once (KeyboardInterrupt, as without this).

Installed by the engine around `trainer.train()` only, in the main thread of a single-process run: before training
starts (data checks, model loading) there is nothing to save and Ctrl-C stops at once; under torchrun each worker
gets the launcher's signal, and ranks could disagree on the step, so several processes keep the default.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from transformers import TrainerCallback

from vlmtune.errors import VlmtuneError


class TrainingInterrupted(VlmtuneError):
    """The run stopped on Ctrl-C after saving `checkpoint`; `command` (set by the CLI) continues it."""

    exit_code = 130

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        self.step, self.checkpoint, self.command = step, checkpoint, None
        super().__init__("")

    def __str__(self) -> str:
        saved = f"checkpoint saved: {self.checkpoint}" if self.checkpoint else "no checkpoint could be written"
        how = self.command or "the same `vlmtune train` command with --resume (or train(config, resume=True))"
        return f"interrupted (Ctrl-C) after step {self.step}; {saved}. Continue the run with:\n  {how}"


class SaveOnInterrupt(TrainerCallback):
    """`with SaveOnInterrupt() as stop:` ... `trainer.train()`; afterwards `stop.requested` says a Ctrl-C came."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False
        self._pid = 0

    def __enter__(self) -> SaveOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a data loader worker forked with this handler: the main process decides
            return
        if self.requested:  # the second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, then saving a checkpoint (press Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
