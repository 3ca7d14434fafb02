"""What the `distributed` section resolves to: whether DeepSpeed runs, and with which ZeRO stage and offload.

Pure functions of the config (and of a user's DeepSpeed JSON when `distributed.deepspeed_config` names one), shared
by the training engine, which renders the DeepSpeed config, and the memory estimator, which must model the same
stage and offload. DeepSpeed itself is not imported here.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vlmtune.config.schema import DistributedConfig, VlmtuneConfig
from vlmtune.errors import ConfigError

Offload = Literal["none", "optimizer", "optimizer_and_params"]


def launched_world_size() -> int | None:
    """WORLD_SIZE set by torchrun / the deepspeed launcher, or None in a process nobody launched."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def world_size(dist: DistributedConfig) -> int:
    """Processes of the run: the launcher's WORLD_SIZE inside a launched process, else num_gpus x num_nodes."""
    return launched_world_size() or dist.num_gpus * dist.num_nodes


def uses_deepspeed(dist: DistributedConfig, world: int | None = None) -> bool:
    """engine=auto means DeepSpeed when more than one process runs, when a DeepSpeed JSON is given, or when
    offloading is asked for (only DeepSpeed offloads); otherwise the plain single-process (or DDP) path."""
    if dist.engine != "auto":
        return dist.engine == "deepspeed"
    world = world_size(dist) if world is None else world
    return world > 1 or dist.deepspeed_config is not None or dist.offload != "none"


def read_deepspeed_json(path: Path) -> dict[str, Any]:
    """A user's DeepSpeed config file as a dict; parse errors name the file, line and column. Parsed once per file
    version: the engine, the estimator and the renderer all ask for it at start (each gets its own copy)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"distributed.deepspeed_config: file not found: {path}"])
    return copy.deepcopy(_parsed(str(path.resolve()), path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _parsed(path: str, mtime_ns: int) -> dict[str, Any]:
    from vlmtune.config.reading import Refused, _read_bytes, decode, parse_json

    try:  # the config files' limits: size, encoding, nesting, number of values
        data = parse_json(decode(_read_bytes(Path(path))))
    except Refused as exc:
        raise ConfigError([f"distributed.deepspeed_config: {path}: {exc.text()}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(
            [f"distributed.deepspeed_config: {path} must hold a JSON object, got {type(data).__name__}"]
        )
    return data


def zero_of(ds: dict[str, Any]) -> tuple[int, Offload]:
    """(ZeRO stage, offload) a DeepSpeed config dict asks for."""
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)

    def on_cpu(key: str) -> bool:
        section = zero.get(key) or {}
        return isinstance(section, dict) and section.get("device", "none") in ("cpu", "nvme")

    offload: Offload = "none"
    if on_cpu("offload_param"):
        offload = "optimizer_and_params"
    elif on_cpu("offload_optimizer"):
        offload = "optimizer"
    return (stage if isinstance(stage, int) else -1), offload


@dataclass(frozen=True)
class ZeroPlan:
    """The ZeRO settings a run trains with, resolved once: from `distributed`, or from the user's DeepSpeed JSON
    where it names them. Without DeepSpeed: stage 0, no offload."""

    stage: int
    offload: Offload
    offload_ratio: float
    """Share of the optimizer's sub-groups in CPU RAM (1.0 without optimizer offload)."""
    sub_group_size: int
    max_live_parameters: int
    """stage3_max_live_parameters: caps how far the ZeRO-3 parameter prefetcher runs ahead."""


def zero_plan(config: VlmtuneConfig, world: int | None = None) -> ZeroPlan:
    """Stage, offload and the ZeRO-3 numbers the run trains with (a given JSON's zero_optimization stage, offload
    devices, offload_optimizer.ratio, sub_group_size and stage3_max_live_parameters win over `distributed`)."""
    dist = config.distributed
    if not uses_deepspeed(dist, world):
        return ZeroPlan(0, "none", 1.0, dist.sub_group_size, dist.max_live_parameters)
    if dist.deepspeed_config is None:
        ratio = dist.offload_ratio if dist.offload != "none" else 1.0
        return ZeroPlan(dist.zero_stage, dist.offload, ratio, dist.sub_group_size, dist.max_live_parameters)
    ds = read_deepspeed_json(dist.deepspeed_config)
    stage, offload = zero_of(ds)
    zero = ds.get("zero_optimization") or {}
    section = zero.get("offload_optimizer")
    ratio = section.get("ratio") if isinstance(section, dict) else None

    def number(value: Any, default: int) -> int:
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    return ZeroPlan(
        stage,
        offload,
        float(ratio) if isinstance(ratio, (int, float)) else 1.0,
        number(zero.get("sub_group_size"), dist.sub_group_size),
        number(zero.get("stage3_max_live_parameters"), dist.max_live_parameters),
    )
