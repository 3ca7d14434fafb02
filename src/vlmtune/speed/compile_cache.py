"""A persistent on-disk cache for what `speed.compile` builds, so a later run on the machine compiles from it.

Inductor keeps its compiled graphs and kernels in `/tmp/torchinductor_<user>` and Triton its kernels under it (or
in `~/.triton/cache`); `/tmp` is lost on reboots and in containers. Compiling the decoder layers cost about 38 s in a
first run on a machine and 12 s once inductor's cache held them (benchmarks/RESULTS.md session 7, W1, H100). So a
run that compiles points both caches at `<XDG_CACHE_HOME or ~/.cache>/vlmtune/compile/<key>`, the key naming
the Python, torch, Triton and CUDA versions and the GPU's compute capability: what was built for one of them is
not reused by another (inductor keys its entries by graph and versions too; a folder per key also keeps old
versions' entries apart, to delete as a whole). A user's own TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR is kept.

Inductor and Triton read these folders only from environment variables (and inductor passes them on to its compile
worker processes), so this is the one place outside the CLI that writes `os.environ`: once, before the first
compilation (`apply_speed`, before `compile_layers`), undone by `remove()`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

INDUCTOR = "TORCHINDUCTOR_CACHE_DIR"
TRITON = "TRITON_CACHE_DIR"


def cache_key(device: str) -> str:
    """`torch<v>-triton<v>-cuda<v>-<sm90|cpu>-py<major.minor>`, from the running versions and `device`'s GPU."""
    import torch

    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(device)
        where = f"sm{major}{minor}"
    else:
        where = "cpu"
    parts = (
        f"torch{torch.__version__}",
        f"triton{_triton_version() or '-none'}",
        f"cuda{torch.version.cuda or '-none'}",
        where,
        f"py{sys.version_info.major}.{sys.version_info.minor}",
    )
    return re.sub(r"[^A-Za-z0-9._-]", "_", "-".join(parts))


def _triton_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("triton", "pytorch-triton", "pytorch-triton-rocm"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def default_root(env: MutableMapping[str, str]) -> Path:
    """`$XDG_CACHE_HOME/vlmtune/compile` (an absolute XDG_CACHE_HOME only, as the XDG spec says), else
    `~/.cache/vlmtune/compile`."""
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / "vlmtune" / "compile"


@dataclass
class CompileCache:
    """The cache folders a compiling run uses; `remove()` puts the environment back as it was."""

    folder: Path | None
    """Our folder (None: the user's own settings are kept for both caches)."""
    reason: str
    env: MutableMapping[str, str] = field(repr=False, default_factory=lambda: os.environ)
    _set: dict[str, str] = field(default_factory=dict)

    def remove(self) -> None:
        for name, value in self._set.items():
            if self.env.get(name) == value:  # inductor may have written its own value meanwhile: leave that
                del self.env[name]
        self._set = {}


def persistent_compile_cache(
    device: str, env: MutableMapping[str, str] | None = None, root: Path | None = None
) -> CompileCache | str:
    """Point inductor's and Triton's caches at `root/<key>` (default `default_root`), keeping whichever of
    TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR the user set; a string saying why not where the folder cannot be
    made (inductor's default in /tmp stays)."""
    env = os.environ if env is None else env
    user = {name: env[name] for name in (INDUCTOR, TRITON) if env.get(name)}
    if INDUCTOR in user:  # inductor puts Triton's kernels under its own folder unless TRITON_CACHE_DIR says otherwise
        kept = " and ".join(f"{name}={value}" for name, value in user.items())
        return CompileCache(None, f"compile cache: the user's {kept} (kept)", env)
    try:
        folder = (root or default_root(env)) / cache_key(device)
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: Path.home() without a home
        return (f"the compile cache folder could not be made ({exc}); inductor's default cache in the temporary "
                "folder is used (set TORCHINDUCTOR_CACHE_DIR to a folder that lasts)")
    wanted = {INDUCTOR: str(folder / "inductor")}
    if TRITON not in user:
        wanted[TRITON] = str(folder / "triton")
    env.update(wanted)
    kept = f"; the user's {TRITON}={user[TRITON]} (kept)" if TRITON in user else ""
    reason = (f"compile cache: {folder} (persistent: a later run of the same model and shapes compiles from it, about "
              f"12 s instead of 38 for a 2B model; set {INDUCTOR} to use another folder){kept}")
    return CompileCache(folder, reason, env, dict(wanted))
