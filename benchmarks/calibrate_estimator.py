"""Calibrate the VRAM estimator on a GPU: `vlmtune train` over a grid of configurations, estimate vs measured peak.

    OUT=/tmp/out bash benchmarks/calibrate_estimator.sh --part grid      # the grid (section "grid" below)
    OUT=/tmp/out bash benchmarks/calibrate_estimator.sh --part cards     # recommended configs, capped to a card
    OUT=/tmp/out bash benchmarks/calibrate_estimator.sh --part heldout   # new shapes: a test of the fitted terms
    python benchmarks/calibrate_estimator.py --table RESULTS.jsonl       # re-estimate recorded points (no GPU)

Every point is its own `vlmtune train` process (clean memory statistics) on an architecture with random weights
(`vlmtune tiny-model --arch`), a few steps on data from make_bench_data.py. Per point it records:
- the estimate the engine printed before loading the model (its `memory_preflight` event in train_log.jsonl: sized
  from the encoded data's real lengths, with the inputs, so the point can be re-estimated offline);
- the measured peaks: max_memory_allocated, max_memory_reserved (the engine logs both every step), and the process's
  memory as nvidia-smi shows it (NVML, per process, sampled every 100 ms). The table's nvidia-smi level is the
  reserved peak + the median measured CUDA context (QLoRA's NVML peak is its random 16-bit build, not training).
Each run's saved model is deleted as soon as it ends (a full 2B model is 4.4 GB; the first run filled the disk).
Points run side by side while the sum of their estimates fits the GPU: the numbers are per process, and the
engine's fit check is bypassed with hardware.force_fit because other points hold memory.
`--part cards` runs, for each seed hardware class, the config `vlmtune recommend` writes for it, capped with
hardware.memory_fraction to that card's memory (fit check on), and records whether it trained and whether the next
larger micro-batch (or the next cheaper method) would have fit according to the estimate.
Results go to $OUT: calibration.jsonl, cards.jsonl (one row per point, appended as points finish), table.md,
logs.tar.gz (each run's log, train_log.jsonl and the architectures' configs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/calibrate_estimator.py` from anywhere

from benchmarks.calibration.cards import run_cards  # noqa: E402
from benchmarks.calibration.points import CARDS, GIB, grid, heldout  # noqa: E402
from benchmarks.calibration.runs import Sampler, prepare, run_grid  # noqa: E402
from benchmarks.calibration.table import table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/vlmtune-calibration")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/calib"))
    ap.add_argument("--part", choices=["grid", "heldout", "cards", "all"], default="all")
    ap.add_argument("--only", help="comma-separated point ids or model names to run (default: all)")
    ap.add_argument("--skip", help="comma-separated point ids already measured")
    ap.add_argument("--cards", default=",".join(CARDS), help="card classes for --part cards")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--deadline", type=float, default=480, help="seconds after which no new point starts")
    ap.add_argument("--table", type=Path, nargs="+", help="print the table of calibration JSONL files, re-estimated "
                    "with the current estimator, and exit")
    ap.add_argument("--tiny", action="store_true", help="toy models: a smoke test of this script without a GPU")
    args = ap.parse_args()
    if args.table:
        rows = [json.loads(x) for path in args.table for x in path.read_text().splitlines() if x.strip()]
        print(table(rows, again=True))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        import deepspeed  # noqa: F401

        with_zero = True
    except ImportError:
        with_zero = False
        print("deepspeed is not installed: the ZeRO points are left out", flush=True)
    points = grid(with_zero) if args.part in ("grid", "all") else heldout() if args.part == "heldout" else []
    if args.only:
        keep = set(args.only.split(","))
        points = [p for p in points if p.id in keep or p.model in keep]
    skip = set(args.skip.split(",")) if args.skip else set()
    points = [p for p in points if p.id not in skip]
    cards = [c for c in args.cards.split(",") if c] if args.part in ("cards", "all") else []
    prepare(args.work, {p.model for p in points} | {CARDS[c][1] for c in cards},
            {(p.model, p.data) for p in points} | {(CARDS[c][1], CARDS[c][2]) for c in cards}, args.tiny)
    sampler = Sampler()
    sampler.start()
    t0 = time.time()
    if cards:  # alone on the GPU: the engine's fit check compares with the free memory
        run_cards(cards, args.work, args.out, sampler)
    if points:
        run_grid(points, args.work, args.out, sampler, args.parallel, args.deadline - (time.time() - t0))
    sampler.stop.set()
    if (args.out / "calibration.jsonl").is_file():
        rows = [json.loads(x) for x in (args.out / "calibration.jsonl").read_text().splitlines()]
        text = table(rows, again=False)
        (args.out / "table.md").write_text(text + "\n")
        print(text)
    with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
        for path in sorted(args.work.glob("*/config.json")) + sorted(args.work.glob("*/*processor_config.json")):
            tar.add(path, arcname=str(path.relative_to(args.work)))
        for path in sorted(args.work.glob("*.log")) + sorted(args.work.glob("rec_*.yaml")):
            tar.add(path, arcname=path.name)
        for sub in ("runs", "cards"):
            for path in sorted((args.work / sub).glob("*/*")):
                if path.name in ("stdout.log", "train_log.jsonl", "config.yaml", "snapshot.jsonl"):
                    tar.add(path, arcname=str(path.relative_to(args.work)))
    snapshots = sorted((args.work / "runs").glob("*/snapshot.jsonl"))
    if snapshots:  # CALIB_SNAPSHOT=1: the timelines and snapshots as tables
        from vlmtune.train.memory_snapshot import format_markdown

        text = "".join(
            f"## {path.parent.name}\n\n"
            + format_markdown([json.loads(x) for x in path.read_text().splitlines() if x.strip()])
            + "\n"
            for path in snapshots
        )
        (args.out / "snapshots.md").write_text(text)
    print(f"device peak {sampler.device_peak / GIB:.1f} GiB; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
