"""What the engine reports while training: tokens/s, memory, a progress bar, and the run folder's train_log.jsonl."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

_GIB = 1024**3


def memory_stats(device: str) -> dict[str, float]:
    """GPU: allocated / reserved / peak allocated / peak reserved (GiB). CPU: the process's resident set now and
    at its peak."""
    if device == "cuda" and torch.cuda.is_available():
        return {
            "mem_allocated_gib": round(torch.cuda.memory_allocated() / _GIB, 3),
            "mem_reserved_gib": round(torch.cuda.memory_reserved() / _GIB, 3),
            "mem_peak_gib": round(torch.cuda.max_memory_allocated() / _GIB, 3),
            "mem_reserved_peak_gib": round(torch.cuda.max_memory_reserved() / _GIB, 3),
        }
    import resource

    import psutil

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB
    rss = psutil.Process().memory_info().rss
    return {
        "mem_rss_gib": round(rss / _GIB, 3),
        "mem_rss_peak_gib": round(max(peak_kib * 1024, rss) / _GIB, 3),
    }


class ThroughputMeter(TrainerCallback):
    """Non-padding tokens per second between logging steps (Trainer counts them: include_num_input_tokens_seen).

    The interval restarts when training (re)starts, after an evaluation and after a checkpoint save, so neither
    the dataloader fast-forward of a resumed run nor evaluation or saving is counted as training time.
    """

    def __init__(self) -> None:
        self._tokens: int | None = None
        self._time = 0.0

    def reset(self, tokens_seen: int) -> None:
        self._tokens, self._time = tokens_seen, time.perf_counter()

    def rate(self, tokens_seen: int) -> float | None:
        """Tokens/s since the interval began (None before training started), and begin a new interval."""
        now = time.perf_counter()
        previous, since = self._tokens, self._time
        self.reset(tokens_seen)
        if previous is None or now <= since:
            return None
        return (tokens_seen - previous) / (now - since)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.reset(state.num_input_tokens_seen)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.reset(state.num_input_tokens_seen)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.reset(state.num_input_tokens_seen)


def write_event(path: Path, event: str, **fields: Any) -> None:
    """Append one non-metric record (run start: what was decided and why) to train_log.jsonl."""
    _append(path, {"event": event, "time": round(time.time(), 3), **fields}, default=str)


def _append(path: Path, record: dict[str, Any], default: Any) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=default) + "\n")


class JsonlLogCallback(TrainerCallback):
    """Appends every log record (training and evaluation) to `train_log.jsonl`; a resumed run appends to it."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        _append(self.path, {"step": state.global_step, "time": round(time.time(), 3), **logs}, default=float)


def _fmt(logs: dict[str, Any]) -> str:
    parts = []
    for key, label, spec in (
        ("loss", "loss", ".4f"),
        ("eval_loss", "eval_loss", ".4f"),
        ("learning_rate", "lr", ".2e"),
        ("grad_norm", "grad_norm", ".3f"),
        ("tokens_per_second", "tok/s", ".0f"),
        ("mem_allocated_gib", "alloc", ".2f"),
        ("mem_reserved_gib", "reserved", ".2f"),
        ("mem_peak_gib", "peak", ".2f"),
        ("mem_rss_gib", "rss", ".2f"),
    ):
        value = logs.get(key)
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            unit = " GiB" if key.startswith("mem_") else ""
            parts.append(f"{label} {value:{spec}}{unit}")
    return "  ".join(parts)


class ProgressCallback(TrainerCallback):
    """A tqdm bar over optimizer steps, with one readable line per logging step (replaces the Trainer's dict dump)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.bar is None or not logs:
            return
        line = _fmt(logs)
        if line:
            self.bar.write(f"step {state.global_step}/{state.max_steps}  {line}")
        if "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close()

    def close(self) -> None:
        """Also when training ends by an exception (Ctrl-C, an error): what is printed next starts on its own line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
