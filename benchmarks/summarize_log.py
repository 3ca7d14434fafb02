"""Summarise a run's train_log.jsonl (+ an nvidia-smi memory.used trace in MiB): steady tokens/s and peaks.

    python benchmarks/summarize_log.py RUN/train_log.jsonl [smi.csv] --label NAME
Steady state skips the first logged interval (warm-up, allocator growth).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("log", type=Path)
    ap.add_argument("smi", type=Path, nargs="?")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    rows = [json.loads(ln) for ln in args.log.read_text().splitlines() if ln.strip()]
    steps = [r for r in rows if "tokens_per_second" in r]
    tps = [r["tokens_per_second"] for r in steps[1:]] or [r["tokens_per_second"] for r in steps]
    out = {
        "label": args.label,
        "steps": steps[-1]["step"] if steps else 0,
        "tokens_per_second_median": round(statistics.median(tps), 1) if tps else None,
        "peak_allocated_gib": max((r.get("mem_peak_gib", 0) for r in steps), default=None),
        "peak_reserved_gib": max((r.get("mem_reserved_peak_gib", r.get("mem_reserved_gib", 0)) for r in steps), default=None),
        "loss_first": steps[0].get("loss") if steps else None,
        "loss_last": steps[-1].get("loss") if steps else None,
    }
    if args.smi and args.smi.is_file():
        used = [int(x) for x in args.smi.read_text().split() if x.strip().isdigit()]
        out["nvidia_smi_peak_gib"] = round(max(used) / 1024, 2) if used else None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
