"""Loading a full fine-tuning checkpoint's weights back into the live model, every tensor or an error.

transformers 5.x saves a model in its checkpoint layout, not in the live module names: `save_pretrained` reverts the
key renaming that `from_pretrained` applied (`model.visual.*` is saved as `visual.*`, `model.language_model.*` as
`model.*` for Qwen2-VL; `language_model.model.*` for LLaVA). The Trainer's resume loads that file with
`load_state_dict(strict=False)`, so not one tensor loads and the run continues from the base weights with the
optimizer of the trained ones. Here the same renaming `save_pretrained` applies is applied to the live state dict, so
each saved key finds its live tensor; a key that finds none, or a live tensor that no key fills, is an error that
names them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlmtune.errors import VlmtuneError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def saved_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """checkpoint key -> the live state-dict keys it fills (several where weights are tied)."""
    from transformers.core_model_loading import revert_weight_conversion

    live = model.state_dict(keep_vars=True)
    by_id: dict[int, list[str]] = {}
    for key, tensor in live.items():
        by_id.setdefault(id(tensor), []).append(key)
    saved = revert_weight_conversion(model, dict(live))
    out: dict[str, list[str]] = {}
    for key, tensor in saved.items():
        if id(tensor) not in by_id:
            raise VlmtuneError(
                f"cannot map the checkpoint key {key!r} back to the model: this architecture's weights are converted "
                "(not only renamed) when saved, which vlmtune's full fine-tuning resume does not support yet"
            )
        out[key] = by_id[id(tensor)]
    return out


def weight_files(checkpoint: Path) -> list[Path]:
    index = checkpoint / SAFE_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [checkpoint / s for s in shards]
    return [checkpoint / SAFE_WEIGHTS]


def load_full_checkpoint(model: torch.nn.Module, checkpoint: Path) -> int:
    """Copy every tensor of the checkpoint's safetensors file(s) into `model`; returns how many were loaded.

    Raises VlmtuneError naming the keys when the checkpoint holds a key the model does not have, lacks one the
    model has (tied weights count as filled by their partner), or a tensor's shape differs."""
    from safetensors import safe_open

    names = saved_names(model)
    live = model.state_dict(keep_vars=True)
    filled: set[str] = set()
    unexpected, mismatched = [], []
    files = weight_files(checkpoint)
    missing_files = [f.name for f in files if not f.is_file()]
    if missing_files:
        raise VlmtuneError(f"{checkpoint}: the weight file(s) {', '.join(missing_files)} are missing; resume from "
                           "another checkpoint (`vlmtune checkpoints verify` lists the intact ones)")
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as fh:
                for key in fh.keys():
                    targets = names.get(key)
                    if targets is None:
                        unexpected.append(key)
                        continue
                    tensor: Any = live[targets[0]]
                    value = fh.get_tensor(key)
                    if tuple(value.shape) != tuple(tensor.shape):
                        mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(tensor.shape)}")
                        continue
                    tensor.data.copy_(value.to(dtype=tensor.dtype, device=tensor.device))
                    filled.update(targets)
    missing = [k for keys in names.values() if not filled.intersection(keys) for k in keys[:1]]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} key(s) the model does not have ({_some(unexpected)})")
    if missing:
        problems.append(f"{len(missing)} of the model's weights are not in it ({_some(missing)})")
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) of another shape ({_some(mismatched)})")
    if problems:
        raise VlmtuneError(
            f"{checkpoint} does not hold this model's weights: " + "; ".join(problems) + ". It was written by "
            "another model or configuration; resume with the config of the run that wrote it (its config.yaml)."
        )
    return len(filled)


def check_adapter_keys(model: torch.nn.Module, checkpoint: Path) -> None:
    """The checkpoint's adapter holds exactly the tensors this PEFT model saves (same keys, same shapes), so PEFT's
    own load (which only warns about missing keys) and DeepSpeed's (non-strict for adapters) load every one of
    them. Called by the engine before any resume of an adapter, with or without DeepSpeed."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    file = checkpoint / "adapter_model.safetensors"
    if not file.is_file():
        raise VlmtuneError(f"{checkpoint} has no adapter_model.safetensors; resume from another checkpoint "
                           "(`vlmtune checkpoints verify` lists the intact ones)")
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    with safe_open(str(file), framework="pt", device="cpu") as fh:
        saved = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    problems = []
    if missing := sorted(set(expected) - set(saved)):
        problems.append(f"{len(missing)} of the adapter's tensors are not in it ({_some(missing)})")
    if unexpected := sorted(set(saved) - set(expected)):
        problems.append(f"{len(unexpected)} tensor(s) this adapter does not have ({_some(unexpected)})")
    if shapes := [f"{k} {saved[k]} vs {expected[k]}" for k in sorted(set(saved) & set(expected))
                  if saved[k] != expected[k] and expected[k] != (0,)]:  # (0,): a ZeRO-3 partition placeholder
        problems.append(f"{len(shapes)} tensor(s) of another shape ({_some(shapes)})")
    if problems:
        raise VlmtuneError(
            f"{file} does not fit this run's adapter: " + "; ".join(problems) + ". It was written with other LoRA "
            "settings (rank, target modules, train_projector) or for another model; resume with the config of the "
            "run that wrote it (its config.yaml)."
        )


def _some(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... {len(keys) - n} more" if len(keys) > n else "")
