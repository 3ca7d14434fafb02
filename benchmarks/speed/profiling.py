"""Where a variant's step time goes: torch.profiler (CPU + CUDA) over a few steps after warm-up, and a text report.

    python3 -m benchmarks.speed.bench profile W1 vlmtune_nogc --out $OUT    # -> $OUT/profile-W1-vlmtune_nogc.txt

The step is cut into named phases (record_function ranges on the main thread, opened and closed at each boundary):
the plain loop marks its own lines; vlmtune's engine runs unchanged and the phases come from a TrainerCallback
(on_step_begin / on_pre_optimizer_step / on_optimizer_step / on_step_end, which also calls profiler.step()) plus a
forward pre-hook and hook on the model the Trainer calls. The report gives, per phase, the CPU wall time, the GPU
kernel time inside it and the GPU idle time inside it (the GPU waiting for the CPU: launch overhead, Python, syncs),
the host-device syncs seen in each phase, the span of the backward on the autograd threads, and the top ops by self
CUDA and self CPU time. Steps, phases and kernels are those of the `ACTIVE` profiled steps only.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, record_function, schedule
from transformers import TrainerCallback

ACTIVE = 3
"""Profiled steps (after the workload's warm-up steps and one profiler warm-up step)."""

SYNC_NAMES = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "aten::_local_scalar_dense",
)
"""CPU-side events that block on the GPU (an .item(), a bool() of a GPU tensor, a boolean-mask index...)."""


SYNC_HINTS = ("aten::item", "aten::nonzero", "aten::is_nonzero", "aten::masked_select", "aten::index")
"""Ops that usually mean a sync (a boolean-mask index runs nonzero; aten::index also counts gathers that do not)."""


class PhaseTracer:
    """Named, non-overlapping CPU ranges; `step()` closes the current one and advances the profiler."""

    def __init__(self, prof: Any):
        self.prof = prof
        self._range: Any = None
        self.steps = 0

    def phase(self, name: str | None) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if name is not None:
            self._range = record_function(f"phase: {name}")
            self._range.__enter__()

    def step(self) -> None:
        self.phase(None)
        self.prof.step()
        self.steps += 1

    def watch(self, model: Any) -> list[Any]:
        """Cut the forward into sub-phases with hooks on the vision tower and the language model (the shortest
        module names ending in `visual` / `vision_tower` and `language_model`); returns the hook handles."""
        named = sorted(model.named_modules(), key=lambda kv: len(kv[0]))
        vision = next((m for n, m in named if n.endswith(("visual", "vision_tower"))), None)
        language = next((m for n, m in named if n.endswith("language_model")), None)
        handles = []
        for module, before, after in (
            (vision, "forward: vision tower", "forward: image features merge, M-RoPE position index"),
            (language, "forward: language model (decoder layers)", "forward: lm_head + loss"),
        ):
            if module is not None:
                handles.append(module.register_forward_pre_hook(lambda *a, name=before: self.phase(name)))
                handles.append(module.register_forward_hook(lambda *a, name=after: self.phase(name)))
        return handles


class ProfilerCallback(TrainerCallback):
    """The phases of one HF Trainer step, from the callback events and hooks on the model the Trainer calls."""

    def __init__(self, tracer: PhaseTracer):
        self.tracer = tracer
        self._handles: list[Any] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            self._handles = [
                model.register_forward_pre_hook(lambda *a: self.tracer.phase("forward")),
                model.register_forward_hook(
                    lambda *a: self.tracer.phase(
                        "after forward -> pre_optimizer: compute_loss rest, backward, Trainer nan check / token "
                        "count / flos, clip_grad_norm"
                    )
                ),
                *self.tracer.watch(model),
            ]
        self.tracer.phase("first batch")

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.tracer.phase("step_begin -> forward: training_step prep (inputs, autocast wrappers)")

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.tracer.phase("optimizer.step")

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.tracer.phase("after optimizer: lr, scheduler, zero_grad, global step")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.tracer.step()
        self.tracer.phase(
            "step_end -> step_begin: step timer sync, Trainer log/save check, next batch (get_batch_samples)"
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.tracer.phase(None)
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _overlap(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    return _union([(max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi])


def _annotation(event: Any) -> bool:
    """A record_function range (ours or a library's) rather than a kernel or a copy."""
    return bool(getattr(event, "is_user_annotation", False)) or event.name.startswith("phase: ")


def gpu_intervals(events: list[Any]) -> list[tuple[float, float]]:
    """(start, end) of the GPU's own work: kernels and copies. record_function ranges (our "phase: ..." marks) are
    mirrored on the GPU timeline as user annotations with device type CUDA; counting them as kernels made every
    phase look busy (the first reports said 95.5% busy for W1 vlmtune_nogc, whose kernels took 128 ms of a 540 ms
    profiled step)."""
    return [
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and not _annotation(e)
    ]


KERNEL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # attention before matmul: PyTorch's memory-efficient SDPA kernels are CUTLASS ones (`fmha_cutlassF_...`)
    ("attention (SDPA, flash, varlen)", ("flash", "fmha", "attention", "attn", "sdpa", "cudnn")),
    ("matmul (cuBLAS, CUTLASS, scaled FP8)", ("gemm", "xmma", "cutlass", "cublas", "nvjet", "matmul", "scaled_mm",
                                             "splitk", "gemv")),
    ("optimizer (foreach / fused AdamW)", ("multi_tensor", "foreach", "adam")),
    ("copies and fills (memcpy, memset)", ("memcpy", "memset")),
    ("inductor (Triton, compiled layers)", ("triton_",)),
    ("elementwise and reductions (eager)", ("elementwise", "vectorized", "reduce", "unrolled", "softmax", "norm",
                                           "index", "gather", "scatter", "cat", "copy", "fill", "where", "silu",
                                           "gelu", "exp", "mul", "add")),
)
"""Kernel name fragments (lower case, first match wins) by what the GPU spends its time on: matmuls are what MFU
counts; the rest is the gap to the matmul limit, together with the time the GPU idles."""


def kernel_category(name: str) -> str:
    low = name.lower()
    for category, fragments in KERNEL_CATEGORIES:
        if any(f in low for f in fragments):
            return category
    return "other"


def kernel_breakdown(events: list[Any], steps: int) -> list[tuple[str, float, float]]:
    """(category, GPU ms per step, kernels per step) of the GPU's own work (`gpu_intervals`' events), largest first.
    Summed kernel time: kernels on several streams overlapping count twice (rare in these runs: one stream)."""
    ms: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA and not _annotation(e):
            category = kernel_category(e.name)
            ms[category] += (e.time_range.end - e.time_range.start) / 1e3
            count[category] += 1
    steps = max(steps, 1)
    return sorted(((c, ms[c] / steps, count[c] / steps) for c in ms), key=lambda row: -row[1])


def report(prof: Any, title: str, wall_steps: list[float]) -> str:
    """The text report of one profiled run (times in ms)."""
    events = list(prof.events())
    cuda = torch.cuda.is_available()
    kernels = gpu_intervals(events)
    phases = [e for e in events if e.name.startswith("phase: ")]
    main_threads = {e.thread for e in phases}
    starts = [e.time_range.start for e in phases]
    ends = [e.time_range.end for e in phases]
    window = (min(starts), max(ends)) if phases else (0.0, 0.0)
    window_ms = (window[1] - window[0]) / 1e3
    busy_ms = _overlap(kernels, *window) / 1e3
    summed_ms = sum(b - a for a, b in kernels) / 1e3
    steps = max(len(wall_steps), 1)
    lines = [f"# profile: {title}", ""]
    lines.append(
        f"profiled steps: {len(wall_steps)}; step wall time (perf_counter, profiler on) median "
        f"{statistics.median(wall_steps) * 1e3:.1f} ms"
        if wall_steps
        else "profiled steps: none recorded"
    )
    if cuda:
        lines.append(
            f"phases cover {window_ms:.1f} ms = {window_ms / steps:.1f} ms/step; GPU kernels busy {busy_ms:.1f} ms "
            f"({busy_ms / steps:.1f} ms/step, summed {summed_ms / steps:.1f} ms/step): GPU busy fraction "
            f"{busy_ms / window_ms if window_ms else 0:.1%}, idle {(window_ms - busy_ms) / steps:.1f} ms/step"
        )
    lines.append("")
    lines.append(
        "## phases (main thread), ms per step: CPU wall | GPU kernels inside | GPU idle inside | syncs"
    )
    lines.append("")
    syncs = [e for e in events if e.name in SYNC_NAMES]  # any thread: the autograd threads block too
    table: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    order: list[str] = []
    for e in phases:
        name = e.name[len("phase: ") :]
        if name not in table:
            order.append(name)
        lo, hi = e.time_range.start, e.time_range.end
        row = table[name]
        row[0] += (hi - lo) / 1e3
        inside = _overlap(kernels, lo, hi) / 1e3
        row[1] += inside
        row[2] += (hi - lo) / 1e3 - inside
        row[3] += sum(
            1 for s in syncs if lo <= s.time_range.start < hi and s.name != "aten::_local_scalar_dense"
        )
    lines.append("| phase | CPU wall | GPU busy | GPU idle | blocking syncs |")
    lines.append("|---|---|---|---|---|")
    for name in order:
        wall, busy, idle, n = table[name]
        lines.append(
            f"| {name} | {wall / steps:.2f} | {busy / steps:.2f} | {idle / steps:.2f} | {n / steps:.1f} |"
        )
    lines.append("")
    lines.append(
        "GPU idle inside a phase = the GPU had nothing queued while the CPU was in that phase (launch-bound Python, "
        "or waiting right after a sync). A sync makes the CPU wait for the GPU: the phase holding it shows long CPU "
        "wall and high GPU busy, and the GPU idles afterwards until the CPU has launched enough work again."
    )
    if cuda and kernels:
        rows = kernel_breakdown(events, steps)
        total = sum(ms for _, ms, _ in rows) or 1.0
        step_ms = window_ms / steps
        lines += ["", "## GPU time by kernel kind, ms per step (the gap to the matmul limit)", "",
                  "| kind | GPU ms | share of kernel time | share of the step | kernels |", "|---|---|---|---|---|"]
        lines += [f"| {c} | {ms:.2f} | {ms / total:.1%} | {ms / step_ms if step_ms else 0:.1%} | {n:.0f} |"
                  for c, ms, n in rows]
        idle = step_ms - busy_ms / steps
        lines.append(f"| GPU idle (nothing queued) | {idle:.2f} | | {idle / step_ms if step_ms else 0:.1%} | |")
    backward = [e for e in events if e.thread not in main_threads and e.name.startswith("autograd::engine")]
    if backward:
        span = (max(e.time_range.end for e in backward) - min(e.time_range.start for e in backward)) / 1e3
        lines.append(
            f"\nbackward ops on autograd threads: first to last over the window {span / steps:.1f} ms/step"
        )
    counts: dict[str, int] = defaultdict(int)
    for e in events:
        if e.name in SYNC_NAMES or e.name in SYNC_HINTS or e.name.startswith("Memcpy DtoH"):
            counts[e.name] += 1
    if counts:
        lines.append(
            "\nsync-ish calls per step (all threads): "
            + ", ".join(f"{k} {v / steps:.1f}" for k, v in sorted(counts.items()))
        )
    averages = prof.key_averages()
    for key, label in (
        ("self_cuda_time_total" if cuda else None, "self CUDA"),
        ("self_cpu_time_total", "self CPU"),
    ):
        if key is None:
            continue
        lines += ["", f"## top 25 ops by {label} time (all {len(wall_steps)} profiled steps)", "", "```"]
        try:
            lines.append(averages.table(sort_by=key, row_limit=25, max_name_column_width=70))
        except (AttributeError, KeyError):
            lines.append(
                averages.table(sort_by=key.replace("cuda", "device"), row_limit=25, max_name_column_width=70)
            )
        lines.append("```")
    return "\n".join(lines) + "\n"


def profile_one(workload: str, variant_name: str, out: Path, trace: bool = False) -> Path:
    """Run (workload, variant) for its warm-up + 1 + ACTIVE + 1 steps under the profiler; write the report."""
    from dataclasses import replace

    from benchmarks.speed import bench
    from benchmarks.speed.workloads import WORKLOADS

    work = WORKLOADS[workload]
    work = replace(work, steps=ACTIVE + 2)
    variant = next(v for v in work.variants if v.name == variant_name)
    if variant.warmup is not None:  # a compiled variant: its compilations fall before the profiled steps
        work = replace(work, warmup=variant.warmup)
    # placeholders (a cap at plain_gc's peak, weights on disk) filled from the suite's results.jsonl: run.sh profiles
    # into $OUT/logs, beside which the suite wrote it
    results = out if (out / "results.jsonl").is_file() else out.parent
    variant = bench.resolved_overrides(variant, workload, results)
    model, path = bench.prepare(work)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    walls: list[float] = []
    title = f"{workload} {variant_name} ({work.title}; overrides {variant.overrides or 'none'})"
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"profile-{workload}-{variant_name}.txt"

    def ready(prof: Any) -> None:
        started = time.perf_counter()
        text = report(prof, title, walls[-ACTIVE:])
        target.write_text(text + f"\n(report built in {time.perf_counter() - started:.1f} s)\n")
        if trace:
            prof.export_chrome_trace(str(out / f"trace-{workload}-{variant_name}.json"))

    sched = schedule(skip_first=work.warmup, wait=0, warmup=1, active=ACTIVE, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=sched, on_trace_ready=ready) as prof:
        tracer = _TimedTracer(prof, walls)
        if variant.path == "vlmtune":
            from benchmarks.speed.engine_run import train

            train(
                work,
                variant,
                model,
                path,
                bench.ROOT / "runs" / f"profile-{workload}-{variant_name}",
                callbacks=[ProfilerCallback(tracer)],
            )
        else:
            bench.run_plain(work, variant, model, path, tracer=tracer)
    return target


class _TimedTracer(PhaseTracer):
    """PhaseTracer that also records each step's wall time (synchronized, as the step meter is)."""

    def __init__(self, prof: Any, walls: list[float]):
        super().__init__(prof)
        self.walls = walls
        self._last: float | None = None

    def step(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._last is not None:
            self.walls.append(now - self._last)
        self._last = now
        super().step()
