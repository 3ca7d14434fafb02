"""`vlmtune predict (--adapter DIR [--model BASE] | --model DIR) (--image IMG --prompt TEXT | --data FILE [--out PATH] [--overwrite])`.

--out: a path ending in .jsonl is the predictions file; any other path is a folder that gets predictions.jsonl.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "answer one question about images, or every record of a JSONL file (with exact-match accuracy)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model folder or hub id, or a merged/full model (default with --adapter: the "
                                   "base recorded in the adapter)")
    p.add_argument("--adapter", help="LoRA/QLoRA adapter folder from `vlmtune train` (output_dir/final)")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--prompt", help="question to ask")
    p.add_argument("--data", type=Path, help="JSONL file: answer every record and score it")
    p.add_argument("--image-root", "--image_root", dest="image_root", type=Path,
                   help="with --data: the folder relative image paths resolve against first (data.image_root)")
    p.add_argument("--out", type=Path,
                   help="with --data: a .jsonl file, or a folder that gets predictions.jsonl (default: the adapter's "
                        "folder, else the model's folder if local, else the current folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing predictions file that vlmtune did not write (never the --data file)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default: 64)")


def run(args: argparse.Namespace) -> int:
    from vlmtune.errors import VlmtuneError
    from vlmtune.export.predict import answer, load_for_inference, predict_file
    from vlmtune.outputs import check_file

    if not args.model and not args.adapter:
        raise VlmtuneError("predict needs --adapter DIR (its base model is read from the adapter) or --model DIR "
                           "(a full or merged model).")
    if bool(args.data) == bool(args.prompt):
        raise VlmtuneError("predict needs either --prompt (with optional --image) or --data FILE, not both or neither.")
    if args.out and not args.data:
        raise VlmtuneError("--out is where the predictions for --data go; without --data there is nothing to write.")
    out = predictions_path(args) if args.data else None
    if out is not None:  # refused before the model loads
        check_file(out, what="the predictions", overwrite=args.overwrite, inputs={"the data file": args.data})
    loaded = load_for_inference(args.model, args.adapter) if args.model else load_for_inference(args.adapter)
    if out is None:
        print(answer(loaded, [Path(i) for i in args.image], args.prompt, max_new_tokens=args.max_new_tokens))
        return 0
    result = predict_file(loaded, args.data, out, max_new_tokens=args.max_new_tokens, overwrite=args.overwrite,
                          image_root=args.image_root)
    print(f"exact-match accuracy {result.accuracy:.3f} on {result.total} records; predictions in {out}")
    return 0


def predictions_path(args: argparse.Namespace) -> Path:
    """--out as a .jsonl file, or a folder + predictions.jsonl; by default next to the adapter or local model."""
    if args.out is not None:
        return args.out if args.out.suffix.lower() == ".jsonl" else args.out / "predictions.jsonl"
    for folder in (args.adapter, args.model):
        if folder and Path(folder).is_dir():
            return Path(folder) / "predictions.jsonl"
    return Path("predictions.jsonl")
