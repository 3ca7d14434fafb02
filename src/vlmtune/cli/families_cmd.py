"""`vlmtune families`: every family vlmtune trains, with what each supports (the README's support matrix)."""

from __future__ import annotations

import argparse

HELP = "list the model families with what each supports (LoRA, QLoRA, full, packing, compile, ZeRO-3, estimator)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (as in the README)")


def run(args: argparse.Namespace) -> int:
    from vlmtune.families import all_families
    from vlmtune.support_matrix import markdown

    if args.markdown:
        print(markdown(), end="")
        return 0
    for family in all_families():
        print(f"{family.name:<14} {family.description}")
        print(f"{'':<14} e.g. {family.default_model}")
    print()
    print(markdown(), end="")
    return 0
