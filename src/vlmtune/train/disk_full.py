"""A full disk during a save is a message that names the folder and the space needed, never a raw traceback.

The half-written checkpoint (in `.staging/`) is removed, so the earlier checkpoints stay intact and resumable.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vlmtune.errors import VlmtuneError


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """ENOSPC however the library that was writing reports it (see `outputs.is_disk_full`)."""
    from vlmtune.outputs import is_disk_full as reported_full

    return reported_full(exc, folder)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def disk_full_error(what: str, folder: Path, need_bytes: int, resume_from: str | None = None) -> VlmtuneError:
    """`what` ran out of space in `folder`; `need_bytes` is the best estimate of what it needs (0: unknown)."""
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        free = 0
    need = f" it needs about {_gib(need_bytes)}," if need_bytes else ""
    then = (f" then continue with --resume ({resume_from} is intact)." if resume_from
            else " then start again.")
    return VlmtuneError(
        f"the disk is full: writing {what} into {folder} failed;{need} {_gib(free)} is free there. Nothing half-written "
        f"was kept. Free space on that disk (or set output_dir on a larger one, or lower training.save_total_limit),"
        f"{then}"
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"
