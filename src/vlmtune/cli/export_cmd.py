"""`vlmtune export --adapter DIR --out DIR [--base MODEL]`: merge a LoRA adapter into its 16-bit base."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "merge a LoRA/QLoRA adapter into its base model (16-bit) and save a standalone model + processor"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--base", help="base model (default: the one recorded in the adapter)")


def run(args: argparse.Namespace) -> int:
    from vlmtune.export.merge import merge_adapter

    out = merge_adapter(args.adapter, args.out, base=args.base)
    print(f"merged model written to {out}")
    return 0
