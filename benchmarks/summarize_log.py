"""Summarise a run's train_log.jsonl (+ an nvidia-smi memory.used trace in MiB): steady tokens/s, peaks, estimate.

    python benchmarks/summarize_log.py RUN/train_log.jsonl [smi.csv] --label NAME [--ram ram_kib.txt --ram-base KIB]
        [--rc CODE] [--wall SECONDS]
Steady state skips the first logged interval (warm-up, allocator growth). The trace is `memory.used` lines (one
GPU) or `index, memory.used` lines (every GPU): the peak is given per GPU and as the largest. The estimate is the
one the run printed before loading the model (its `memory_preflight` event: per GPU). Tokens/s are those of all
processes together (the Trainer gathers the token counts).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def smi_peaks(path: Path) -> dict[int, float]:
    """GPU index -> peak memory.used in GiB."""
    peaks: dict[int, int] = defaultdict(int)
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if not all(p.isdigit() for p in parts) or not parts or not parts[0]:
            continue
        index, used = (0, int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
        peaks[index] = max(peaks[index], used)
    return {i: round(v / 1024, 2) for i, v in sorted(peaks.items())}


def summarize(args: argparse.Namespace) -> dict:
    rows = []
    if args.log.is_file():
        rows = [json.loads(ln) for ln in args.log.read_text().splitlines() if ln.strip()]
    steps = [r for r in rows if "tokens_per_second" in r]
    tps = [r["tokens_per_second"] for r in steps[1:]] or [r["tokens_per_second"] for r in steps]
    start = next((r for r in rows if r.get("event") == "start"), {})
    pre = next((r for r in rows if r.get("event") == "memory_preflight"), {})
    out = {
        "label": args.label,
        "processes": start.get("processes"),
        "steps": steps[-1]["step"] if steps else 0,
        "tokens_per_second_median": round(statistics.median(tps), 1) if tps else None,
        "peak_allocated_gib": max((r.get("mem_peak_gib", 0) for r in steps), default=None),
        "peak_reserved_gib": max(
            (r.get("mem_reserved_peak_gib", r.get("mem_reserved_gib", 0)) for r in steps), default=None
        ),
        "estimate_allocated_gib": pre.get("estimate_allocated_gib"),
        "estimate_reserved_gib": pre.get("estimate_reserved_gib"),
        "estimate_total_gib": pre.get("estimate_total_gib"),
        "loss_first": steps[0].get("loss") if steps else None,
        "loss_last": steps[-1].get("loss") if steps else None,
    }
    if args.smi and args.smi.is_file():
        peaks = smi_peaks(args.smi)
        out["nvidia_smi_peak_gib"] = max(peaks.values()) if peaks else None
        if len(peaks) > 1:
            out["nvidia_smi_peak_per_gpu_gib"] = list(peaks.values())
    if args.ram and args.ram.is_file():
        ram = [int(x) for x in args.ram.read_text().split() if x.isdigit()]
        out["host_ram_peak_gib"] = round((max(ram, default=args.ram_base) - args.ram_base) / 2**20, 2)
    if args.rc is not None:
        out["rc"] = args.rc
    if args.wall is not None:
        out["wall_s"] = args.wall
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("log", type=Path)
    ap.add_argument("smi", type=Path, nargs="?")
    ap.add_argument("--label", default="")
    ap.add_argument("--ram", type=Path, help="host memory in use (KiB), one sample per line")
    ap.add_argument("--ram-base", type=int, default=0, help="host memory in use before the run (KiB)")
    ap.add_argument("--rc", type=int)
    ap.add_argument("--wall", type=int)
    print(json.dumps(summarize(ap.parse_args())))


if __name__ == "__main__":
    main()
