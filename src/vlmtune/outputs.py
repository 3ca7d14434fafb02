"""What vlmtune may write into, replace or delete: only what it wrote itself.

The rule, for every command that writes (train, export, predict, data split):
- A folder vlmtune writes into gets a marker file, `.vlmtune-output` (JSON): the kinds of output the folder holds
  ("run", "export", ...) and each file vlmtune wrote there, with its size and modification time. A listed file with
  that size and time still is vlmtune's; an unlisted file, or a listed one changed since, is the user's.
- Without `--overwrite`, a run or an export goes only into a missing or empty folder, or one whose marker says it
  holds that kind of output (or that holds nothing but vlmtune's files); a file (predictions, a split) is written
  only where no file of that name exists or vlmtune's own does. Only vlmtune's own files are ever replaced.
- `--overwrite` lets it write into any other folder too, replacing files named like the ones it writes. No other file
  is ever removed, except vlmtune's own files that a new export no longer writes (stale weight shards).
- Never, not even with `--overwrite`: an output that is, or contains, one of the command's inputs (the base model,
  the adapter, the data file), or a folder given where a file is (and the reverse).
- A full disk (ENOSPC / EDQUOT) ends in a VlmtuneError naming the folder and the space needed; the caller removes the
  partial files, and what was there before stays as it was.

Nothing here deletes a folder: outputs are written under a `.vlmtune-staging*` name inside the target folder (so
`--out .` works and a rename never crosses disks) and moved into place file by file. A run folder's marker lists
no files: the "run" kind marks it, and the engine manages what is inside (checkpoints, final/).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vlmtune.errors import VlmtuneError

MARKER = ".vlmtune-output"
STAGING_PREFIX = ".vlmtune-staging"
"""Names starting with this, inside an output folder, are vlmtune's work in progress (removed when a write ends)."""

_OWN_NAMES = (MARKER, STAGING_PREFIX)
_LISTED = 4


def show(path: Path | str) -> str:
    """A path as the user gave it, or absolute where that says nothing ('.', '..')."""
    path = Path(path)
    return str(path) if path.name not in ("", ".", "..") else str(path.resolve())


def format_size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("not reached")


def read_marker(folder: Path | str) -> dict[str, Any]:
    """The folder's marker ({} when it has none, or one that cannot be read: the folder then counts as the user's)."""
    path = Path(folder) / MARKER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _listed(folder: Path) -> dict[str, dict[str, Any]]:
    files = read_marker(folder).get("files")
    return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


def _unchanged(path: Path, entry: dict[str, Any]) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return path.is_file() and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns


def owned_files(folder: Path | str) -> dict[str, str]:
    """The files in `folder` that vlmtune wrote and nobody changed since: relative path -> the command that wrote it."""
    folder = Path(folder)
    return {name: str(e.get("by")) for name, e in _listed(folder).items() if _unchanged(folder / name, e)}


def record(folder: Path | str, names: Iterable[str] = (), by: str = "", kind: str | None = None) -> None:
    """Add `names` (paths relative to `folder`, as they are now) and `kind` to the folder's marker.

    Entries of files that were deleted or changed since are dropped: a changed file is the user's from then on."""
    folder = Path(folder)
    data = read_marker(folder)
    files = {n: e for n, e in _listed(folder).items() if _unchanged(folder / n, e)}
    for name in names:
        st = (folder / name).stat()
        files[name] = {"by": by, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    kinds = data.get("kinds") if isinstance(data.get("kinds"), list) else []
    kinds = sorted({*map(str, kinds), *([kind] if kind else [])})
    tmp = folder / f"{MARKER}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"kinds": kinds, "files": files}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MARKER)


def entries(folder: Path) -> list[str]:
    """What is in `folder`, leaving out vlmtune's marker and its work in progress."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(_OWN_NAMES))


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def is_vlmtune_folder(folder: Path, kind: str, signs: Iterable[str] = ()) -> bool:
    """The folder's marker names `kind`, or one of `signs` (glob patterns of what vlmtune writes there, for folders
    written before markers existed) matches, or everything in it is vlmtune's own files."""
    kinds = read_marker(folder).get("kinds")
    if isinstance(kinds, list) and kind in kinds:
        return True
    if any(next(folder.glob(s), None) is not None for s in signs):
        return True
    owned = owned_files(folder)
    return all(name in owned for name in entries(folder))


def refuse_inputs(
    target: Path | str, inputs: Mapping[str, Path | str | None], option: str = "--out", label: str | None = None
) -> None:
    """Refuse, whatever the flags, an output that is one of the inputs or a folder that contains one.

    inputs: role -> path ("the adapter" -> Path(...)); paths that do not exist here (hub ids) are skipped.
    label: how the message names the target (default: the option and the path)."""
    target = Path(target)
    resolved = target.resolve()
    for role, given in inputs.items():
        if given is None or not Path(given).exists():
            continue
        source = Path(given).resolve()
        if source == resolved or resolved in source.parents:
            relation = f"is {role}" if source == resolved else f"contains {role} ({show(given)})"
            raise VlmtuneError(
                f"{label or f'{option} {show(target)}'} {relation}: vlmtune does not write where it could replace "
                f"what the command reads, not even with --overwrite. Choose another {option}."
            )


def claim_folder(
    folder: Path | str,
    *,
    kind: str,
    what: str,
    overwrite: bool,
    inputs: Mapping[str, Path | str | None] | None = None,
    option: str = "--out",
    flag: str = "--overwrite",
    signs: Iterable[str] = (),
) -> None:
    """Check, before anything is written, that `what` (a `kind` of output: "run", "export") may go into `folder`
    (nothing is created here).

    Refuses a path that is a file, one that is or contains an input, and (unless `overwrite`) an existing non-empty
    folder that is not vlmtune's output of that kind (see `is_vlmtune_folder`)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise VlmtuneError(f"{option} {show(folder)} is a file; {what} needs a folder. Choose a folder path.")
    refuse_inputs(folder, inputs or {}, option)
    if overwrite or not folder.is_dir() or is_vlmtune_folder(folder, kind, signs):
        return
    present = entries(folder)
    if present:
        raise VlmtuneError(
            f"{option} {show(folder)} already holds files vlmtune did not write ({_listing(present)}), so {what} is "
            f"not written there. Choose a new or empty folder, or add {flag} to write into it anyway: files named "
            f"like the ones vlmtune writes are then replaced, every other file is kept."
        )


def check_replace(
    folder: Path | str, names: Iterable[str], *, what: str, overwrite: bool, flag: str = "--overwrite"
) -> None:
    """Refuse (unless `overwrite`) to replace any of `names` in `folder` that vlmtune did not write or that was
    changed since."""
    folder = Path(folder)
    owned = owned_files(folder)
    clashes = [n for n in names if (folder / n).exists() and n not in owned]
    if clashes and not overwrite:
        one = len(clashes) == 1
        raise VlmtuneError(
            f"{_listing([show(folder / n) for n in clashes])} {'exists' if one else 'exist'}, not written by vlmtune "
            f"(or changed since), and writing {what} would replace {'it' if one else 'them'}. Move "
            f"{'it' if one else 'them'} away or choose another path, or add {flag} to replace {'it' if one else 'them'}."
        )


def check_file(
    path: Path | str,
    *,
    what: str,
    overwrite: bool,
    inputs: Mapping[str, Path | str | None] | None = None,
    option: str = "--out",
    flag: str = "--overwrite",
    label: str | None = None,
) -> None:
    """Check that the file `path` may be written: not an input, not a folder, and (unless `overwrite`) either new or
    written by vlmtune and unchanged since. label: how a refusal names the file (see `refuse_inputs`)."""
    path = Path(path)
    refuse_inputs(path, inputs or {}, option, label)
    if path.is_dir():
        raise VlmtuneError(f"{option} {show(path)} is a folder; {what} is written to a file. Choose a file path.")
    check_replace(path.parent, [path.name], what=what, overwrite=overwrite, flag=flag)


def move_into(staging: Path, folder: Path, *, what: str, by: str, overwrite: bool, flag: str = "--overwrite") -> None:
    """Move every file written under `staging` into `folder` (same relative paths), replacing files only as
    `check_replace` allows; remove vlmtune's files from an earlier `by` write that this one no longer has; record."""
    names = [p.relative_to(staging).as_posix() for p in sorted(staging.rglob("*")) if p.is_file()]
    check_replace(folder, names, what=what, overwrite=overwrite, flag=flag)
    stale = [n for n, writer in owned_files(folder).items() if writer == by and n not in names]
    for name in stale:
        (folder / name).unlink()
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, folder / name)
    record(folder, names, by=by, kind=by)


def new_folders(folder: Path) -> list[Path]:
    """The folders that creating `folder` (with its parents) would create, deepest first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def remove_if_empty(folders: Iterable[Path]) -> None:
    """Undo `mkdir(parents=True)` after a failed write: remove those of `folders` (deepest first) left empty."""
    for path in folders:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def is_disk_full(exc: BaseException, folder: Path | str | None = None) -> bool:
    """ENOSPC or a quota, as an OSError or inside another library's error text (safetensors raises its own
    `SafetensorError` "... No space left on device (os error 28)"). `torch.save` on a full disk raises a RuntimeError
    that does not say so ("unexpected pos 576 vs 534"): with `folder`, an OSError or RuntimeError while less than
    1 MiB is free on the folder's file system counts as a full disk too."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if any(s in text for s in ("No space left on device", "os error 28", "Disk quota exceeded", "StorageFull")):
        return True
    if folder is not None and isinstance(exc, (OSError, RuntimeError)):
        free = free_space(Path(folder))
        return free is not None and free < 2**20
    return False


def free_space(folder: Path) -> int | None:
    """Free bytes on the file system that holds `folder` (or its nearest existing parent); None if none exists."""
    for path in (folder, *folder.absolute().parents):
        if path.exists():
            return shutil.disk_usage(path).free
    return None


@contextmanager
def disk_full_guard(folder: Path | str, needed: int | Callable[[], int], what: str) -> Iterator[None]:
    """Turn a full disk inside the block into a VlmtuneError naming `folder` and the space `what` needs.

    The caller removes its partial files (a `finally` around this block), so the message can say nothing changed."""
    folder = Path(folder)
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc, folder):
            raise
        size = needed() if callable(needed) else needed
        free = free_space(folder)
        free_text = f", and {format_size(free)} is free there" if free is not None else ""
        raise VlmtuneError(
            f"the disk is full: writing {what} to {show(folder)} needs about {format_size(size)}{free_text}. "
            f"The partial files were removed and what {show(folder)} held before is unchanged. Free some space, "
            "or choose a folder on another disk."
        ) from exc
