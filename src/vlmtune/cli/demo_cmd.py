"""`vlmtune demo [--out DIR]`: offline end-to-end demo on a tiny model and a synthetic VQA task."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "offline demo: tiny model + synthetic visual QA data, accuracy before and after fine-tuning"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("output/demo"),
                   help="folder for the demo's tiny model, data and run (default output/demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the data, the model and the run (default 0)")


def run(args: argparse.Namespace) -> int:
    from vlmtune.demo import run_demo

    summary = run_demo(args.out, seed=args.seed)
    return 0 if summary["passed"] else 1
