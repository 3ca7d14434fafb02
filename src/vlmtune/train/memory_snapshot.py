"""Developer diagnostic: what occupies GPU memory during a run, allocated and cached-but-free, by call site.

The memory estimator misses DeepSpeed ZeRO-3 offload points by 8-25%, mostly in the reserved-minus-allocated
gap. `torch.cuda.max_memory_reserved()` says how big the gap is; this says which allocations make it up, from
the caching allocator's own snapshot (`torch.cuda.memory._snapshot()`) with the Python stack of each allocation.

Switched on by environment variables, read by the engine (`train/engine.py: _debug_callbacks`):
    VLMTUNE_MEMORY_SNAPSHOT=/path/snapshot.jsonl    one JSON line per snapshot step (summary only, small)
    VLMTUNE_MEMORY_SNAPSHOT_STEPS=1,2               global steps whose end is snapshotted (default 1,2; 0 = when
                                                    training begins, after DeepSpeed's initialisation)
    VLMTUNE_MEMORY_SNAPSHOT_HISTORY=0               do not record allocation history: no call sites, blocks are
                                                    grouped by size only. Needed under DeepSpeed ZeRO-3, whose
                                                    autograd functions fail while torch records Python stacks
                                                    (`SystemError: ... returned NULL`, benchmarks/RESULTS.md session 4)
    VLMTUNE_MEMORY_SNAPSHOT_RAW=1                   also pickle the raw snapshot of the last of those steps next to
                                                    the .jsonl (large; open it in https://pytorch.org/memory_viz)
    VLMTUNE_MEMORY_TIMELINE=2                       also record allocated memory at every block's forward entry and
                                                    exit (vision blocks, decoder layers, lm_head; under checkpointing
                                                    the recomputation in backward too) during step 2, and snapshot
                                                    the allocator in step 3 at the point where step 2 peaked: where
                                                    in the step the allocated peak is, and which blocks make it up
Read the lines with `python3 benchmarks/memory_snapshot.py snapshot.jsonl` (benchmarks/gpu_train_run.sh: SNAPSHOT=1).

History recording starts when the callback is built, which the engine does before the model loads, so the
weights, the ZeRO-3 partitions and DeepSpeed's buffers get call sites too. Allocations without Python frames
show as "unknown": made before recording started, or by autograd's backward thread (gradients of ops that have no
Python backward). Only rank 0 records; on a machine without CUDA the callback does nothing.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from vlmtune.errors import VlmtuneError

_GIB = 1024**3
_PACKAGE_ROOTS = ("site-packages/", "dist-packages/")
UNKNOWN = "unknown"


def from_env(env: Mapping[str, str]) -> MemorySnapshotCallback:
    """The callback that VLMTUNE_MEMORY_SNAPSHOT (path) and VLMTUNE_MEMORY_SNAPSHOT_STEPS ("1,2") ask for."""
    text = env.get("VLMTUNE_MEMORY_SNAPSHOT_STEPS", "1,2")
    try:
        steps = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise VlmtuneError(
            f"VLMTUNE_MEMORY_SNAPSHOT_STEPS={text!r}: give comma-separated global steps, e.g. 1,2"
        ) from None
    raw = env.get("VLMTUNE_MEMORY_SNAPSHOT_RAW") == "1"
    history = env.get("VLMTUNE_MEMORY_SNAPSHOT_HISTORY", "1") != "0"
    timeline = env.get("VLMTUNE_MEMORY_TIMELINE", "")
    if timeline and not timeline.isdigit():
        raise VlmtuneError(f"VLMTUNE_MEMORY_TIMELINE={timeline!r}: give the global step to trace, e.g. 2")
    return MemorySnapshotCallback(
        Path(env["VLMTUNE_MEMORY_SNAPSHOT"]),
        steps or (1, 2),
        raw=raw,
        history=history,
        timeline_step=int(timeline) if timeline else None,
    )


def _rank_zero() -> bool:
    """torchrun sets RANK before the process group exists; once it does, the group is the authority."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


class MemorySnapshotCallback(TrainerCallback):
    """Appends allocator snapshots, summarised by call site, to a .jsonl at the end of the given global steps.

    raw: also pickle the whole snapshot of the last step to `path.with_suffix(".pickle")` (tens of MB and more).
    """

    def __init__(
        self,
        path: Path,
        steps: tuple[int, ...] = (1, 2),
        raw: bool = False,
        history: bool = True,
        timeline_step: int | None = None,
    ) -> None:
        import torch

        self.path, self.steps, self.raw = Path(path), tuple(steps), raw
        record = getattr(torch.cuda.memory, "_record_memory_history", None)
        self.recording = torch.cuda.is_available() and record is not None and _rank_zero()
        self.timeline = Timeline(timeline_step) if timeline_step and self.recording else None
        self.history = history and self.recording
        if self.history:
            # Python stacks only: C++ frames would have to be symbolised at every snapshot (minutes).
            record(enabled="all", context="all", stacks="python", max_entries=200_000)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.timeline is not None and kwargs.get("model") is not None:
            self.timeline.attach(kwargs["model"])
        if 0 in self.steps:
            self._snapshot(0)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.timeline is not None:
            self.timeline.begin(state.global_step + 1)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.timeline is not None:
            self.timeline.mark("before optimizer step")

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.timeline is not None:
            self.timeline.mark("step end")
            line = self.timeline.end(state.global_step)
            if line is not None:
                self._append(line)
        self._snapshot(state.global_step)

    def _append(self, line: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def _snapshot(self, step: int) -> None:
        if not self.recording or step not in self.steps:
            return
        import torch

        snapshot = torch.cuda.memory._snapshot()
        line = {
            "step": step,
            "allocated": torch.cuda.memory_allocated(),
            "reserved": torch.cuda.memory_reserved(),
            "peak_allocated": torch.cuda.max_memory_allocated(),
            "peak_reserved": torch.cuda.max_memory_reserved(),
            "summary": summarise(snapshot),
        }
        self._append(line)
        if self.raw and step == max(self.steps):
            with self.path.with_suffix(".pickle").open("wb") as f:
                pickle.dump(snapshot, f)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.history:
            import torch

            torch.cuda.memory._record_memory_history(enabled=None)
        if self.timeline is not None:
            self.timeline.detach()
        self.recording = self.history = False
        self.timeline = None


class Timeline:
    """Allocated memory at each block's forward entry and exit during one step (`step`), then, during the next
    step, an allocator snapshot at the event where that step's allocated memory was highest (the steps repeat)."""

    def __init__(self, step: int):
        self.step = step
        self.rows: list[dict[str, Any]] = []
        self._handles: list[Any] = []
        self._current = self._index = 0
        self._peak_event = -1
        self._at_peak: dict[str, Any] | None = None

    def attach(self, model: Any) -> None:
        """Hooks on every member of a module list (vision blocks, decoder layers) and on lm_head."""
        from torch import nn

        for name, module in model.named_modules():
            members = isinstance(module, nn.ModuleList)
            for child_name, child in module.named_children() if members else ():
                self._hook(child, f"{name}.{child_name}")
            if name.endswith("lm_head"):
                self._hook(module, name)

    def _hook(self, module: Any, name: str) -> None:
        short = name.removeprefix("base_model.model.")
        self._handles += [
            module.register_forward_pre_hook(lambda *a, n=short: self.mark(f"{n} in")),
            module.register_forward_hook(lambda *a, n=short: self.mark(f"{n} out")),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def begin(self, step: int) -> None:
        self._current, self._index = step, 0
        if step == self.step:
            self.rows = []
        self.mark("step begin")

    def mark(self, event: str) -> None:
        if self._current not in (self.step, self.step + 1):
            return
        import torch

        if self._current == self.step:
            self.rows.append(
                {
                    "event": event,
                    "allocated": torch.cuda.memory_allocated(),
                    "max_allocated": torch.cuda.max_memory_allocated(),
                }
            )
        elif self._index == self._peak_event and self._at_peak is None:
            self._at_peak = {"event": event, "allocated": torch.cuda.memory_allocated(),
                             "summary": summarise(torch.cuda.memory._snapshot())}
        self._index += 1

    def end(self, step: int) -> dict[str, Any] | None:
        """The line to write at the end of `step` (the timeline, then the snapshot at its peak), or None."""
        if step == self.step and self.rows:
            self._peak_event = max(range(len(self.rows)), key=lambda i: self.rows[i]["allocated"])
            return {"step": step, "timeline": self.rows}
        if step == self.step + 1 and self._at_peak is not None:
            return {"step": step, "at_peak": self._at_peak}
        return None


def _is_site(filename: str) -> bool:
    """A frame that names who asked for the memory: not torch's own machinery (its optimizers do count), and a
    Python file (C++ frames, present when history records them, end in .cpp / .h or are '??')."""
    if not filename or filename == "??" or not filename.endswith(".py"):
        return False
    return "/torch/" not in filename or "/torch/optim/" in filename


def _short(filename: str) -> str:
    """Path from the package on: 'deepspeed/runtime/zero/stage3.py', 'vlmtune/train/trainer.py'."""
    for roots in (_PACKAGE_ROOTS, ("/src/",)):
        cut = max((filename.rfind(r) + len(r) for r in roots if r in filename), default=-1)
        if cut >= 0:
            return filename[cut:]
    return filename.removeprefix("src/")


def site(frames: Iterable[Mapping[str, Any]] | None) -> str:
    """The innermost frame outside torch (frames are innermost first), as 'pkg/file.py:LINE name'."""
    for frame in frames or ():
        if _is_site(frame.get("filename", "")):
            return f"{_short(frame['filename'])}:{frame.get('line', '?')} {frame.get('name', '?')}"
    return UNKNOWN


def _segment_site(segment: Mapping[str, Any]) -> str:
    """Who made the segment: its own frames where torch records them, else its first block that has frames (the
    allocation that created it, approximately: a split segment's first block may be a later tenant)."""
    if segment.get("frames"):
        return site(segment["frames"])
    return next((site(b["frames"]) for b in segment.get("blocks", ()) if b.get("frames")), UNKNOWN)


def _top(groups: Mapping[str, list[int]], n: int, count_key: str) -> list[dict[str, Any]]:
    ranked = sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0]))[:n]
    return [{"site": name, "bytes": total, count_key: count} for name, (total, count) in ranked]


def summarise(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """Totals, allocated bytes by call site, cached-but-free bytes by the site that made their segment, and the
    largest segments. Sums agree with the snapshot: totals.allocated is the sum of by_site over all sites."""
    segments = snapshot.get("segments", [])
    by_site: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    cached: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    totals = {
        "segments": len(segments),
        "reserved": 0,
        "allocated": 0,
        "requested": 0,
        "inactive": 0,
        "pending_free": 0,
    }
    largest = []
    inactive_sizes: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    allocated_sizes: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for segment in segments:
        totals["reserved"] += segment["total_size"]
        inactive = 0
        for block in segment.get("blocks", ()):
            state, size = block["state"], block["size"]
            if state in ("active_allocated", "inactive"):
                sizes = allocated_sizes if state == "active_allocated" else inactive_sizes
                entry = sizes[_size_key(size)]
                entry[0] += size
                entry[1] += 1
            if state == "active_allocated":
                totals["allocated"] += size
                totals["requested"] += block.get("requested_size", size)
                entry = by_site[site(block.get("frames"))]
                entry[0] += size
                entry[1] += 1
            elif state == "inactive":
                inactive += size
            else:  # active_awaiting_free (torch's name; some docs say active_pending_free)
                totals["pending_free"] += size
        totals["inactive"] += inactive
        made_by = _segment_site(segment)
        if inactive:
            cached[made_by][0] += inactive
            cached[made_by][1] += 1
        largest.append(
            {
                "total_size": segment["total_size"],
                "allocated_size": segment.get("allocated_size", 0),
                "inactive": inactive,
                "site": made_by,
            }
        )
    largest.sort(key=lambda s: -s["total_size"])
    return {
        "totals": totals,
        "by_site": _top(by_site, 25, "blocks"),
        "cached_by_segment_site": _top(cached, 15, "segments"),
        "largest_segments": largest[:15],
        "inactive_by_size": _top(inactive_sizes, 15, "blocks"),
        "allocated_by_size": _top(allocated_sizes, 15, "blocks"),
    }


def _size_key(size: int) -> str:
    """Blocks grouped by size, to 0.1 MiB: without history, sizes are what tells a parameter-shaped block (and so
    its likely owner) from an activation's."""
    return f"{size / 2**20:.1f} MiB"


def _gib(n: int) -> str:
    return f"{n / _GIB:.2f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def format_markdown(records: list[dict[str, Any]]) -> str:
    """Readable tables (GiB) for the lines `MemorySnapshotCallback` wrote, one section per snapshot."""
    out = []
    for record in records:
        if "timeline" in record:
            out += _timeline_table(record["step"], record["timeline"])
            continue
        if "at_peak" in record:
            peak = record["at_peak"]
            out += [
                f"### step {record['step']}, at `{peak['event']}` (where step {record['step'] - 1} peaked): "
                f"allocated {_gib(peak['allocated'])} GiB",
                "",
                *_summary_tables(peak["summary"]),
            ]
            continue
        s = record["summary"]
        out += [
            f"### step {record['step']}",
            "",
            f"allocated {_gib(record['allocated'])} GiB, reserved {_gib(record['reserved'])} GiB; peak allocated "
            f"{_gib(record['peak_allocated'])} GiB, peak reserved {_gib(record['peak_reserved'])} GiB",
            *_summary_tables(s),
        ]
    return "\n".join(out)


def _timeline_table(step: int, rows: list[dict[str, Any]], min_change: int = 64 * 2**20) -> list[str]:
    """The events where allocated memory moved by at least `min_change` since the last row shown (and the peak)."""
    peak = max(range(len(rows)), key=lambda i: rows[i]["allocated"])
    out = [
        f"### step {step}: allocated memory through the step ({len(rows)} events; rows where it moved by 64 MiB "
        f"or more, and the peak)",
        "",
        "| # | event | allocated GiB | change | peak so far GiB |",
        "|---:|---|---:|---:|---:|",
    ]
    shown = None
    for i, row in enumerate(rows):
        change = row["allocated"] - (shown if shown is not None else 0)
        if shown is None or abs(change) >= min_change or i == peak:
            mark = " **peak**" if i == peak else ""
            out.append(
                f"| {i} | {_cell(row['event'])}{mark} | {_gib(row['allocated'])} | {change / _GIB:+.2f} | "
                f"{_gib(row['max_allocated'])} |"
            )
            shown = row["allocated"]
    return out + [""]


def _summary_tables(s: dict[str, Any]) -> list[str]:
    t = s["totals"]
    return [
            f"snapshot: {t['segments']} segments, reserved {_gib(t['reserved'])}, allocated {_gib(t['allocated'])} "
            f"(requested {_gib(t.get('requested', t['allocated']))}), cached free {_gib(t['inactive'])}, "
            f"pending free {_gib(t.get('pending_free', 0))} GiB",
            "",
            "| allocated by site | GiB | blocks |",
            "|---|---:|---:|",
            *(f"| {_cell(r['site'])} | {_gib(r['bytes'])} | {r['blocks']} |" for r in s["by_site"]),
            "",
            "| cached free, by the site that made the segment | GiB | segments |",
            "|---|---:|---:|",
            *(
                f"| {_cell(r['site'])} | {_gib(r['bytes'])} | {r['segments']} |"
                for r in s["cached_by_segment_site"]
            ),
            "",
            "| cached free blocks of size | GiB | blocks |",
            "|---|---:|---:|",
            *(f"| {r['site']} | {_gib(r['bytes'])} | {r['blocks']} |" for r in s.get("inactive_by_size", ())),
            "",
            "| allocated blocks of size | GiB | blocks |",
            "|---|---:|---:|",
            *(f"| {r['site']} | {_gib(r['bytes'])} | {r['blocks']} |" for r in s.get("allocated_by_size", ())),
            "",
            "| largest segments: GiB | allocated | free | made by |",
            "|---:|---:|---:|---|",
            *(
                f"| {_gib(r['total_size'])} | {_gib(r['allocated_size'])} | {_gib(r['inactive'])} | {_cell(r['site'])} |"
                for r in s["largest_segments"]
            ),
            "",
    ]
