"""Resuming runs no code from checkpoint files: every `torch.load` during a resume is `weights_only=True`.

The Trainer's own resume loads (optimizer, scheduler, RNG state, scaler) already pass `weights_only=True`, but
DeepSpeed 0.19 loads its model and optimizer states with `weights_only=False` (about twenty call sites), so a crafted
`mp_rank_00_model_states.pt` could run any command on `--resume`. While `weights_only_loads()` is active, `torch.load`
always unpickles in PyTorch's weights-only mode, with an allow-list of the few DeepSpeed types its checkpoints really
hold (found by reading the pickles of ZeRO-0/1/2/3 checkpoints of LoRA and full runs); anything else is refused
with a message that names the file. `--trust-checkpoint` (for checkpoints written by another tool or another
DeepSpeed version that stores more types) turns this off.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from vlmtune.errors import VlmtuneError

DEEPSPEED_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.zero.offload_config.OffloadDeviceEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _allowed() -> list[Any]:
    """The allow-listed types that can be imported here (none of DeepSpeed's when it is not installed)."""
    out = []
    for dotted in DEEPSPEED_TYPES:
        module, _, name = dotted.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return out


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block, `torch.load(..., weights_only=False)` is refused where the file holds anything but tensors,
    containers of them, numbers, strings and the allow-listed DeepSpeed types."""
    original = torch.load
    allowed = _allowed()

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            found = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
            raise VlmtuneError(
                f"refused to load {f}: it holds Python objects other than tensors and the types vlmtune's "
                f"checkpoints hold ({found[:200] or 'not a weights-only pickle'}), and unpickling them could run "
                "code. If you "
                "trust where this checkpoint came from (another tool, another DeepSpeed version), resume with "
                "--trust-checkpoint."
            ) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
