"""A full disk during a save is a message that names the folder and the space needed, never a raw traceback.

The half-written checkpoint (in `.staging/`) is removed, so the earlier checkpoints stay intact and resumable.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.outputs import format_size, free_space


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def disk_full_error(what: str, folder: Path, need_bytes: int, resume_from: str | None = None) -> VlmtuneError:
    """`what` ran out of space in `folder`; `need_bytes` is the best estimate of what it needs (0: unknown)."""
    free = free_space(folder) or 0
    need = f" it needs about {format_size(need_bytes)}," if need_bytes else ""
    then = (f" then continue with --resume ({resume_from} is intact)." if resume_from
            else " then start again.")
    return VlmtuneError(
        f"the disk is full: writing {what} into {folder} failed;{need} {format_size(free)} is free there. Nothing half-written "
        f"was kept. Free space on that disk (or set output_dir on a larger one, or lower training.save_total_limit),"
        f"{then}"
    )

