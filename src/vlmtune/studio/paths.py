"""The folders the user opened: every path the studio reads or writes lies inside one of them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vlmtune.errors import VlmtuneError

HIDDEN_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".cache"}
"""Folders the run listing does not walk into (they hold no runs and can be large)."""


@dataclass(frozen=True)
class Roots:
    folders: tuple[Path, ...]

    @classmethod
    def of(cls, folders: list[Path] | None) -> Roots:
        given = folders or [Path.cwd()]
        missing = [str(f) for f in given if not Path(f).is_dir()]
        if missing:
            raise VlmtuneError(f"studio: {', '.join(missing)} is not a folder; give existing folders to open "
                               "(`vlmtune studio DIR ...`, default: the current folder)")
        return cls(tuple(Path(f).resolve() for f in given))

    @property
    def home(self) -> Path:
        """The first folder: relative paths are taken from it, and training starts in it."""
        return self.folders[0]

    def resolve(self, text: str | os.PathLike[str], what: str = "path") -> Path:
        """`text` (absolute, or relative to the first folder) as an absolute path inside an opened folder, links
        followed; anything else is refused naming the field."""
        raw = str(text).strip()
        if not raw:
            raise VlmtuneError(f"{what}: no path given; pick a file or type a path inside {self.describe()}")
        path = Path(os.path.expanduser(raw))
        path = (path if path.is_absolute() else self.home / path).resolve()
        if not self.contains(path):
            raise VlmtuneError(f"{what}: {raw} is outside the folders this studio opened ({self.describe()}); "
                               "move it inside one, or restart `vlmtune studio` with its folder as an argument")
        return path

    def contains(self, path: Path) -> bool:
        return any(path == root or root in path.parents for root in self.folders)

    def describe(self) -> str:
        return ", ".join(str(f) for f in self.folders)

    def shown(self, path: Path) -> str:
        """`path` relative to the first folder where it lies inside it (as the CLI, started there, would take it)."""
        try:
            return str(path.relative_to(self.home)) or "."
        except ValueError:
            return str(path)

    def listing(self, folder: str) -> dict[str, object]:
        """A folder's entries for the file picker: sub-folders, then files; hidden names left out."""
        path = self.resolve(folder or ".", "folder")
        if not path.is_dir():
            raise VlmtuneError(f"folder: {folder} is not a folder; pick one from the list")
        dirs: list[str] = []
        files: list[str] = []
        for entry in sorted(path.iterdir(), key=lambda p: p.name.lower()):
            if entry.name.startswith("."):
                continue
            (dirs if entry.is_dir() else files).append(entry.name)
        parent = self.shown(path.parent) if path != self.home and self.contains(path.parent) else None
        return {"folder": self.shown(path), "parent": parent, "dirs": dirs, "files": files,
                "roots": [str(f) for f in self.folders]}

    def walk(self, max_depth: int = 4) -> Iterator[Path]:
        """Every folder under the roots, to `max_depth` levels, skipping hidden and tool folders."""
        for root in self.folders:
            stack = [(root, 0)]
            while stack:
                folder, depth = stack.pop()
                yield folder
                if depth >= max_depth:
                    continue
                try:
                    children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
                except OSError:
                    continue
                stack += [(c, depth + 1) for c in reversed(children)
                          if c.name not in HIDDEN_DIRS and not c.name.startswith(".")]


def model_ref(roots: Roots, text: str, what: str = "model") -> str:
    """A model field: a folder (inside the opened folders, as an absolute path) or a hub id (`owner/name`), kept
    as given; empty stays empty."""
    raw = str(text or "").strip()
    if not raw:
        return ""
    looks_local = raw.startswith(("/", ".", "~")) or (roots.home / raw).exists() or raw.count("/") != 1
    return str(roots.resolve(raw, what)) if looks_local else raw
