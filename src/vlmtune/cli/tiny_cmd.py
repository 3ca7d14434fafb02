"""`vlmtune tiny-model --family F --out DIR`: a tiny offline model of a family, loadable like a real one."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "build a tiny model of a family offline (config, trained tokenizer, image processor, chat template)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", required=True, help="family name, e.g. qwen2_vl, qwen2_5_vl, llava")
    p.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    p.add_argument("--seed", type=int, default=0, help="random seed of the model's weights (default 0)")
    p.add_argument("--arch", help="build a full-size architecture instead (e.g. 2b, 7b; random weights), for benchmarks")
    p.add_argument("--with-weights", action="store_true",
                   help="with --arch: also write the random weights (otherwise train with model.random_init=true)")
    p.add_argument("--device", default="cpu",
                   help="where to build the random weights: cpu (default) or cuda (bf16, seconds for a full-size "
                        "architecture)")


def run(args: argparse.Namespace) -> int:
    from vlmtune.families import get_family

    family = get_family(args.family)
    out = family.build_tiny(args.out, arch=args.arch, seed=args.seed, with_weights=args.with_weights or None,
                            device=args.device)
    what = f"a {args.arch} {family.name} architecture (random weights)" if args.arch else f"a tiny {family.name} model"
    print(f"wrote {what} to {out}")
    return 0
