"""Whether a run's caching allocator uses expandable segments: decided once, from the config and the environment.

`hardware.expandable_segments` auto turns them on for CUDA training unless the user's environment already configures
the allocator (PYTORCH_ALLOC_CONF or PYTORCH_CUDA_ALLOC_CONF), which is then left as it is. Training applies the
decision (train/gpu_memory.py `apply_allocator_setting`) and the estimator models it (allocator.py FRAG_EXPANDABLE):
both read it from here, so they agree. Pure: the environment is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

ENV_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
"""Where PyTorch reads the allocator's settings, the first one set winning (PyTorch 2.9+ reads PYTORCH_ALLOC_CONF
first; earlier versions only PYTORCH_CUDA_ALLOC_CONF)."""


@dataclass(frozen=True)
class AllocatorSetting:
    expandable: bool
    """Whether the run's allocator uses expandable segments."""
    source: Literal["auto", "config", "environment", "not cuda"]
    """auto: vlmtune's default; config: hardware.expandable_segments=true/false; environment: the user's
    PYTORCH_(CUDA_)ALLOC_CONF, left as it is; not cuda: no CUDA allocator to set."""
    reason: str
    """One line for the log and train_log.jsonl's start event."""

    @property
    def apply(self) -> bool:
        """Whether vlmtune sets the allocator (the user's environment and CPU runs are left alone)."""
        return self.source in ("auto", "config")


def environment_setting(env: Mapping[str, str]) -> tuple[str, str] | None:
    """(variable, value) of the allocator settings the environment gives PyTorch, or None."""
    for name in ENV_VARS:
        if env.get(name, "").strip():
            return name, env[name].strip()
    return None


def expandable_in(conf: str) -> bool:
    """Whether a PYTORCH_ALLOC_CONF value (`key:value,key:value`) turns expandable segments on."""
    for item in conf.split(","):
        key, _, value = item.partition(":")
        if key.strip() == "expandable_segments":
            return value.strip().lower() == "true"
    return False


def resolve_allocator(setting: bool | Literal["auto"], cuda: bool, env: Mapping[str, str]) -> AllocatorSetting:
    """What `hardware.expandable_segments` means for a run on CUDA (`cuda`) with environment `env`."""
    if not cuda:
        return AllocatorSetting(False, "not cuda", "expandable segments: not a CUDA run")
    given = environment_setting(env)
    if setting == "auto":
        if given is None:
            return AllocatorSetting(True, "auto", "expandable segments on (hardware.expandable_segments=auto)")
        name, value = given
        on = expandable_in(value)
        return AllocatorSetting(
            on, "environment",
            f"expandable segments {'on' if on else 'off'}: {name}={value} is set, and "
            "hardware.expandable_segments=auto leaves it as it is",
        )
    over = ""
    if given is not None and expandable_in(given[1]) != setting:
        over = f", over {given[0]}={given[1]}"
    return AllocatorSetting(
        bool(setting), "config",
        f"expandable segments {'on' if setting else 'off'} (hardware.expandable_segments={str(setting).lower()}{over})",
    )
