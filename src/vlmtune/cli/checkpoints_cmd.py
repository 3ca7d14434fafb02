"""`vlmtune checkpoints verify DIR`: check a run's checkpoints (or one checkpoint-N folder) against their manifests."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "verify checkpoints against their manifests (files, sizes, SHA-256): which are intact, which file is damaged"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    v = sub.add_parser("verify", help="check every checkpoint-N of a run folder, or one checkpoint folder",
                       description="Exit status 0 when every checkpoint checked is intact, 1 otherwise.")
    v.add_argument("dir", type=Path, help="a run folder (output_dir) or one of its checkpoint-N folders")
    v.add_argument("--quick", action="store_true", help="compare names and sizes only, without reading the files")


def run(args: argparse.Namespace) -> int:
    from vlmtune.errors import VlmtuneError
    from vlmtune.train.checkpoints import MANIFEST, verify_checkpoint
    from vlmtune.train.saving import find_checkpoints

    folder: Path = args.dir
    if not folder.is_dir():
        raise VlmtuneError(f"{folder}: no such folder; give a run folder (output_dir) or a checkpoint-N folder")
    is_checkpoint = (folder / MANIFEST).is_file() or (folder / "trainer_state.json").is_file()
    targets = [folder] if is_checkpoint else find_checkpoints(folder)
    if not targets:
        raise VlmtuneError(f"{folder} holds no checkpoint-N folders and is not a checkpoint itself")
    reports = [verify_checkpoint(t, hashes=not args.quick) for t in targets]
    for report in reports:
        print(report.format())
    intact = [r.folder.name for r in reports if r.ok]
    if len(targets) > 1:
        newest = f"; --resume would continue from {intact[-1]}" if intact else "; none can be resumed from"
        print(f"{len(intact)} of {len(reports)} checkpoint(s) intact{newest}")
    return 0 if len(intact) == len(reports) else 1
