"""Where a variant's host-device syncs come from: one training step with `torch.cuda.set_sync_debug_mode("warn")`,
every synchronizing CUDA call attributed to the innermost line of model or library code that made it.

    python3 -m benchmarks.speed.bench syncs W1 vlmtune_nogc --out $OUT    # -> $OUT/syncs-W1-vlmtune_nogc.txt

The profiles count about 290 blocking syncs per W1 forward (an .item(), .tolist(), a boolean-mask index ...) and
show the no-checkpointing step launch-bound: each sync drains the GPU's queue, after which the GPU waits for the CPU
to launch again. This report names the lines, so the ones worth removing can be chosen. On a machine without CUDA
it runs the step and reports nothing (sync debug mode is a CUDA feature).
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

SKIP = ("/torch/", "/warnings.py", "/contextlib.py", "/functools.py")
"""Frames that are not the caller worth naming (torch internals, the warnings machinery); this module's own too."""


def caller(frames: Iterable[traceback.FrameSummary]) -> str:
    """'file.py:line function' of the innermost frame outside torch and this module (the code that asked for the
    sync), with the package folder for model and library code."""
    chosen = None
    for frame in frames:
        if frame.filename != __file__ and not any(part in frame.filename for part in SKIP):
            chosen = frame
    if chosen is None:
        return "?"
    path = Path(chosen.filename)
    return f"{path.parent.name}/{path.name}:{chosen.lineno} {chosen.name}"


class SyncRecorder:
    """While `on` is set, counts sync warnings by `caller`; `counts` holds the result."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.on = False
        self._saved: Any = None

    def __enter__(self) -> SyncRecorder:
        self._saved = warnings.catch_warnings()  # filters and showwarning come back on exit
        self._saved.__enter__()
        warnings.simplefilter("always")
        show_other = warnings.showwarning

        def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None):
            if self.on and "synchroniz" in str(message):
                self.counts[caller(traceback.extract_stack()[:-1])] += 1
            else:
                show_other(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        return self

    def __exit__(self, *exc: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0)
        self._saved.__exit__(*exc)

    def record(self, on: bool) -> None:
        self.on = on
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn" if on else 0)


class _StepSwitch:
    """Records one step cycle, from the end of step `skip` - 1 (so the next batch's fetch is in it) to the end of
    step `skip`; called at each step's end by the Trainer callback or as the plain loop's tracer."""

    def __init__(self, recorder: SyncRecorder, skip: int):
        self.recorder, self.skip, self.done = recorder, skip, 0
        recorder.record(skip == 0)

    def end(self) -> None:
        self.done += 1
        self.recorder.record(self.done == self.skip)


class _Callback(TrainerCallback):
    def __init__(self, switch: _StepSwitch):
        self.switch = switch

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.switch.end()


class _Tracer:
    """The plain loop's tracer interface (`phase`, `step`)."""

    def __init__(self, switch: _StepSwitch):
        self.switch = switch

    def phase(self, name: str | None) -> None:
        return None

    def step(self) -> None:
        self.switch.end()


def report(counts: Counter[str], title: str) -> str:
    total = sum(counts.values())
    lines = [f"# host-device syncs in one step: {title}", "", f"{total} synchronizing CUDA calls", "",
             "| calls | where (innermost line outside torch) |", "|---|---|"]
    lines += [f"| {n} | `{where}` |" for where, n in counts.most_common()]
    return "\n".join(lines) + "\n"


def syncs_one(workload: str, variant_name: str, out: Path) -> Path:
    """Run (workload, variant) for its warm-up + 2 steps, record the syncs of the step after the warm-up."""
    from dataclasses import replace

    from benchmarks.speed import bench
    from benchmarks.speed.workloads import WORKLOADS

    work = replace(WORKLOADS[workload], steps=2)
    variant = next(v for v in work.variants if v.name == variant_name)
    model, path = bench.prepare(work)
    out.mkdir(parents=True, exist_ok=True)
    with SyncRecorder() as recorder:
        switch = _StepSwitch(recorder, work.warmup)
        if variant.path == "vlmtune":
            from benchmarks.speed.engine_run import train

            train(work, variant, model, path, bench.ROOT / "runs" / f"syncs-{workload}-{variant_name}",
                  callbacks=[_Callback(switch)])
        else:
            bench.run_plain(work, variant, model, path, tracer=_Tracer(switch))
    target = out / f"syncs-{workload}-{variant_name}.txt"
    target.write_text(report(recorder.counts, f"{workload} {variant_name}"))
    return target
