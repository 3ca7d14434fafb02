"""The GPU catalogue (gpus.yaml): memory sizes and bf16 support, and the lookup of a GPU by a forgiving name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from vlmtune.errors import VlmtuneError

GIB = 1 << 30
MIB = 1 << 20
ECC_RESERVE = 1 / 16
DRIVER_RESERVE = 0.015

_DATA = Path(__file__).with_name("gpus.yaml")


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gb: float
    """Vendor memory size (GiB)."""
    usable_bytes: int
    """Memory a training process can use (measured, or derived from the vendor size; see gpus.yaml)."""
    bf16: bool
    arch: str
    aliases: tuple[str, ...] = ()

    @property
    def precision(self) -> str:
        """The 16-bit precision vlmtune trains in on this GPU."""
        return "bf16" if self.bf16 else "fp16"


def _usable(entry: dict) -> int:
    if "usable_mib" in entry:
        return int(entry["usable_mib"] * MIB)
    factor = (1 - ECC_RESERVE if entry.get("ecc") else 1.0) * (1 - DRIVER_RESERVE)
    return int(entry["memory_gb"] * GIB * factor)


@lru_cache(maxsize=1)
def all_gpus() -> tuple[GpuSpec, ...]:
    raw = yaml.safe_load(_DATA.read_text(encoding="utf-8"))["gpus"]
    return tuple(
        GpuSpec(
            name=e["name"],
            memory_gb=float(e["memory_gb"]),
            usable_bytes=_usable(e),
            bf16=bool(e["bf16"]),
            arch=e["arch"],
            aliases=tuple(str(a) for a in e.get("aliases", ())),
        )
        for e in raw
    )


def _key(text: str) -> str:
    text = re.sub(r"[^a-z0-9]", "", str(text).lower())
    for noise in ("nvidia", "geforce", "tesla"):
        text = text.replace(noise, "")
    return text.removesuffix("gb")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:gb|gib)(?:\s*gpu)?\s*$", re.IGNORECASE)


def custom_gpu(memory_gb: float) -> GpuSpec:
    """A GPU given by its memory size (`--gpu 24GB`): the vendor size in GiB, the driver reserve taken off, bf16
    assumed (Ampere or newer; for older cards name the card, e.g. `--gpu T4`)."""
    return GpuSpec(name=f"{memory_gb:g}GB GPU", memory_gb=memory_gb, usable_bytes=_usable({"memory_gb": memory_gb}),
                   bf16=True, arch="custom (bf16 assumed)")


def get_gpu(name: str) -> GpuSpec:
    """A GPU by name: `RTX 4090`, `4090`, `rtx-4090-24gb`, `A100-80GB`, `h100`, or by memory size: `24GB`.
    Raises listing the choices."""
    size = _SIZE.match(str(name))
    if size and float(size.group(1)) > 0:
        return custom_gpu(float(size.group(1)))
    wanted = _key(name)
    gpus = all_gpus()
    exact = [g for g in gpus if wanted in {_key(g.name), *(_key(a) for a in g.aliases)}]
    if len(exact) == 1:
        return exact[0]
    prefixed = [g for g in gpus if _key(g.name).startswith(wanted)] if wanted else []
    if len(prefixed) == 1:
        return prefixed[0]
    choices = ", ".join(g.name for g in (prefixed if len(prefixed) > 1 else gpus))
    what = (
        "is ambiguous; did you mean one of"
        if len(prefixed) > 1
        else "is not in the GPU catalogue; known GPUs are"
    )
    raise VlmtuneError(f"GPU '{name}' {what}: {choices}. Or give its memory size, e.g. --gpu 24GB.")
