"""The family registry: one descriptor per supported VLM family. Adding a family = one module + one line here.

Importing this package imports transformers (the descriptors declare processor classes); import it inside
functions where start-up time matters.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.families import (
    gemma3,
    instructblip,
    internvl,
    llava,
    mllama,
    qwen2_5_vl,
    qwen2_vl,
    qwen3_5,
    qwen3_vl,
    qwen3_vl_moe,
    qwen_vl,
    smolvlm,
)
from vlmtune.families.base import FamilyDescriptor

_FAMILIES: dict[str, FamilyDescriptor] = {
    d.name: d for d in (qwen2_vl.DESCRIPTOR, qwen2_5_vl.DESCRIPTOR, qwen3_vl.DESCRIPTOR, llava.DESCRIPTOR,
               instructblip.DESCRIPTOR, gemma3.DESCRIPTOR, smolvlm.DESCRIPTOR, qwen3_5.DESCRIPTOR,
               internvl.DESCRIPTOR, qwen_vl.DESCRIPTOR,
               mllama.DESCRIPTOR, qwen3_vl_moe.DESCRIPTOR)
}

__all__ = ["FamilyDescriptor", "all_families", "family_for_model", "get_family"]


def all_families() -> list[FamilyDescriptor]:
    return list(_FAMILIES.values())


def get_family(name: str) -> FamilyDescriptor:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise VlmtuneError(f"unknown model family '{name}' (model.family); known families: "
                           f"{', '.join(_FAMILIES)}") from None


def _config_json(name_or_path: str, revision: str | None = None) -> Path:
    from vlmtune.hub import hub_file, is_hub_id

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise VlmtuneError(
                f"model folder '{path}' has no config.json, so its family cannot be detected. Point "
                "model.name_or_path at a folder written by save_pretrained (config.json, weights, tokenizer and "
                "processor files), or build a test model with `vlmtune tiny-model --family F --out DIR`.")
        return config
    if not is_hub_id(name_or_path):
        raise VlmtuneError(
            f"model '{name_or_path}' (model.name_or_path) is not a folder on this machine, nor a Hugging Face Hub "
            "id of the form owner/name. Check the path for typos, or give a hub id.")
    return hub_file(name_or_path, "config.json", revision)


def family_for_model(name_or_path: str | Path, revision: str | None = None) -> FamilyDescriptor:
    """The family of a local model folder or a hub id (its config.json alone is downloaded, vlmtune/hub.py), from
    config.json's `model_type`."""
    config = _config_json(str(name_or_path), revision)
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise VlmtuneError(f"cannot read {config}: {exc}; the model folder looks damaged") from exc
    for family in _FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = ", ".join(f"{d.name} ({'/'.join(d.model_types)})" for d in _FAMILIES.values())
    raise VlmtuneError(
        f"{config} has model_type '{model_type}', which vlmtune does not support. Supported families (model_type): "
        f"{known}. Use a checkpoint of one of them; adding a family means writing a descriptor in "
        "src/vlmtune/families/.")
