"""`vlmtune data check FILE`, `vlmtune data split FILE --val-ratio R --seed S --out DIR [--overwrite]` and
`vlmtune data convert IN --out FILE.jsonl [--overwrite]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELP = "validate a data set (JSONL, JSON array, parquet/arrow; every record, with line numbers) or split it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("check", help="validate every record before training")
    c.add_argument("file", type=Path, help="a JSONL or JSON array file, parquet / arrow data (file or folder), "
                   "hf://datasets/ORG/NAME, or dataset_info.json#NAME (docs/DATA.md)")
    c.add_argument("--config", help="config file whose model and data settings to check against")
    c.add_argument("--preset", help="preset whose data settings to check against")
    c.add_argument("--model", help="model folder or hub id whose processor counts the tokens (image tokens included)")
    c.add_argument("--max-length", type=int, help="override data.max_length")
    c.add_argument("--image-size", type=int, help="override data.image_size")
    c.add_argument("--on-ignored-field", choices=["error", "warn"],
                   help="override data.on_ignored_field: a record field vlmtune does not read is an error (default) "
                        "or a warning counted per field")
    c.add_argument("--image-root", type=Path,
                   help="override data.image_root: the folder relative image paths resolve against first")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    v = sub.add_parser("convert", help="write any input vlmtune reads as its own JSONL (what will be trained)")
    v.add_argument("file", type=Path, help="a JSONL or JSON array file, parquet / arrow data, dataset_info.json#NAME")
    v.add_argument("--out", type=Path, required=True, help="the JSONL file to write (embedded images go to "
                   "OUT_images/ beside it)")
    v.add_argument("--to", choices=["jsonl"], default="jsonl", help="output format (jsonl)")
    v.add_argument("--image-root", type=Path, help="data.image_root: the folder relative image paths resolve against")
    v.add_argument("--on-ignored-field", choices=["error", "warn"],
                   help="data.on_ignored_field: with warn, fields vlmtune does not read are left out")
    v.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that vlmtune did not write (never the input)")
    s = sub.add_parser("split", help="write train.jsonl and val.jsonl")
    s.add_argument("file", type=Path, help="the JSONL file to split (records are copied as written)")
    s.add_argument("--val-ratio", type=float, default=0.1,
                   help="share of records for val.jsonl, between 0 and 1 (default 0.1; at least one record each)")
    s.add_argument("--seed", type=int, default=42, help="random seed: the same seed gives the same split")
    s.add_argument("--out", type=Path, default=Path("output/splits"),
                   help="folder for train.jsonl and val.jsonl (default output/splits); image paths are rewritten "
                        "to stay valid from there")
    s.add_argument("--overwrite", action="store_true",
                   help="replace existing train.jsonl / val.jsonl that vlmtune did not write (never the input file)")


def check_config(args: argparse.Namespace):
    """The config `data check` checks against: preset, config file, then the flags."""
    from vlmtune.config.loader import load_config
    from vlmtune.config.presets import preset_dict

    overrides = []
    if args.model:
        overrides.append(f"model.name_or_path={args.model}")
    if args.max_length:
        overrides.append(f"data.max_length={args.max_length}")
    if args.image_size:
        overrides.append(f"data.image_size={args.image_size}")
    if args.on_ignored_field:
        overrides.append(f"data.on_ignored_field={args.on_ignored_field}")
    if args.image_root:
        overrides.append(f"data.image_root={args.image_root}")
    base = preset_dict(args.preset) if args.preset else {}
    return load_config(args.config, overrides, base=base)


def check(args: argparse.Namespace) -> tuple[Any, str | None]:
    """`data check`'s report (CheckReport) and its note (why token lengths were not counted), for the CLI and the
    studio alike."""
    from vlmtune.data.check import check_file
    from vlmtune.data.tokens import token_counter_for

    config = check_config(args)
    counter, note = token_counter_for(config, explicit=bool(args.model or args.config))
    report = check_file(args.file, config.data, token_length=counter, family=counter.family if counter else None)
    return report, note


def run(args: argparse.Namespace) -> int:
    if args.action == "convert":
        from vlmtune.config.schema import DataConfig
        from vlmtune.data.convert import convert_file

        data_cfg = DataConfig(image_root=args.image_root, on_ignored_field=args.on_ignored_field or "error")
        result = convert_file(args.file, args.out, data_cfg, overwrite=args.overwrite)
        images = f", {result.images_written} embedded image(s) written to {args.out.stem}_images/" \
            if result.images_written else ""
        print(f"wrote {result.path} ({result.records} records{images})")
        return 0
    if args.action == "split":
        from vlmtune.data.split import split_file

        train, val = split_file(args.file, args.val_ratio, args.seed, args.out, overwrite=args.overwrite)
        n_train = sum(1 for _ in train.open(encoding="utf-8"))
        n_val = sum(1 for _ in val.open(encoding="utf-8"))
        print(f"wrote {train} ({n_train} records) and {val} ({n_val} records)")
        return 0

    report, note = check(args)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.format())
        if note:
            print(note)
    return 0 if report.ok else 1
