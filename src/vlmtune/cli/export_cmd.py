"""`vlmtune export --adapter DIR --out DIR [--base MODEL] [--overwrite]`: merge a LoRA adapter into its 16-bit base."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "merge a LoRA/QLoRA adapter into its base model (16-bit) and save a standalone model + processor"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", type=Path, required=True,
                   help="adapter folder from `vlmtune train` (output_dir/final of a LoRA or QLoRA run)")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for the merged model: new, empty, or an earlier export (its files are replaced)")
    p.add_argument("--base", help="base model (default: the one recorded in the adapter)")
    p.add_argument("--overwrite", action="store_true",
                   help="also write into a folder that is not an earlier export, replacing files named like the "
                        "export's; other files are kept, and the adapter's or base model's folder is never used")


def run(args: argparse.Namespace) -> int:
    from vlmtune.export.merge import merge_adapter

    out = merge_adapter(args.adapter, args.out, base=args.base, overwrite=args.overwrite)
    print(f"merged model written to {out}")
    return 0
