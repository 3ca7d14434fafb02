"""Checkpoints you can trust: a manifest of every file (size and SHA-256) written last, and the check that reads it.

A checkpoint folder is written into `.staging/`, its manifest (`vlmtune_manifest.json`) is written after every other
file has been flushed to disk, and only then is the folder renamed into place (`train/trainer.py`). So a
`checkpoint-N` folder without a manifest was not written by a save that finished (or by an older vlmtune, or by
another tool), and a file whose size or hash differs from the manifest was changed afterwards (a truncated copy, a
flipped bit, an edit). `verify_checkpoint` reports which file and what is wrong; `--resume` skips such a checkpoint
for the newest intact one, and `vlmtune checkpoints verify DIR` runs the same check on demand.

Hashing reads every byte once more after the save (about 1.7 GB/s on one core for SHA-256); that is the price of
knowing that a resume reads exactly what was written.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "vlmtune_manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 8 << 20


def _sha256(path: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
        if fsync:
            os.fsync(fh.fileno())
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, step: int | None = None) -> Path:
    """Hash every file under `folder` (flushing each to disk), then write the manifest atomically and flush it."""
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p, fsync=True)}
        for p in _files(folder)
    }
    manifest = {"version": MANIFEST_VERSION, "step": step, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": files}
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def newest_finished(run_dir: Path) -> Path | None:
    """The newest checkpoint whose save finished (it has a manifest), without reading its files: what a message
    can point `--resume` at right after a save failed."""
    from vlmtune.train.saving import find_checkpoints

    finished = [p for p in find_checkpoints(run_dir) if (p / MANIFEST).is_file()]
    return finished[-1] if finished else None


@dataclass
class CheckpointReport:
    folder: Path
    problems: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        if self.ok:
            return f"{self.folder}: intact ({self.files} files, {self.bytes / 2**20:.1f} MiB, hashes match)"
        return f"{self.folder}: DAMAGED\n" + "\n".join(f"  - {p}" for p in self.problems)


def verify_checkpoint(folder: Path | str, hashes: bool = True) -> CheckpointReport:
    """Every file of the manifest present with its size and hash, and no file the manifest does not list."""
    folder = Path(folder)
    report = CheckpointReport(folder)
    if not folder.is_dir():
        report.problems.append("is not a folder")
        return report
    path = folder / MANIFEST
    if not path.is_file():
        report.problems.append(
            f"has no {MANIFEST}: the save that wrote it did not finish, or it was written by another tool or an "
            "older vlmtune (resume from it anyway with --trust-checkpoint)"
        )
        return report
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        listed: dict[str, dict] = manifest["files"]
        if not isinstance(listed, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        report.problems.append(f"{MANIFEST} is not a readable manifest (damaged)")
        return report
    for name, entry in sorted(listed.items()):
        file = folder / name
        if not file.is_file():
            report.problems.append(f"{name}: missing")
            continue
        size = file.stat().st_size
        if size != entry.get("size"):
            what = "truncated" if size < entry.get("size", 0) else "longer than written"
            report.problems.append(f"{name}: {what} ({size:,} bytes, {entry.get('size', 0):,} when written)")
            continue
        if hashes and _sha256(file) != entry.get("sha256"):
            report.problems.append(f"{name}: contents changed since it was written (SHA-256 differs)")
            continue
        report.files += 1
        report.bytes += size
    extra = sorted(p.relative_to(folder).as_posix() for p in _files(folder))
    unlisted = [name for name in extra if name not in listed]
    if unlisted:
        report.problems.append(f"files not written by the save: {', '.join(unlisted[:5])}"
                               + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else ""))
    return report
