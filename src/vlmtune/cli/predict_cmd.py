"""`vlmtune predict --model DIR [--adapter DIR] (--image IMG --prompt TEXT | --data FILE)`."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "answer one question about images, or every record of a JSONL file (with exact-match accuracy)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model folder or hub id (or a merged/full model)")
    p.add_argument("--adapter", help="LoRA/QLoRA adapter folder from `vlmtune train`")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--prompt", help="question to ask")
    p.add_argument("--data", type=Path, help="JSONL file: answer every record and score it")
    p.add_argument("--out", type=Path, help="where to write predictions.jsonl (with --data)")
    p.add_argument("--max-new-tokens", type=int, default=64)


def run(args: argparse.Namespace) -> int:
    from vlmtune.errors import VlmtuneError
    from vlmtune.export.predict import answer, load_for_inference, predict_file

    if bool(args.data) == bool(args.prompt):
        raise VlmtuneError("predict needs either --prompt (with optional --image) or --data FILE, not both or neither.")
    loaded = load_for_inference(args.model, args.adapter)
    if args.prompt:
        print(answer(loaded, [Path(i) for i in args.image], args.prompt, max_new_tokens=args.max_new_tokens))
        return 0
    out = args.out or Path(args.adapter or args.model) / "predictions.jsonl"
    result = predict_file(loaded, args.data, out, max_new_tokens=args.max_new_tokens)
    print(f"exact-match accuracy {result.accuracy:.3f} on {result.total} records; predictions in {out}")
    return 0
