"""The built-in model catalogue (models.yaml) and the lookup of a model name, folder or cached hub config.

`vlmtune estimate --model Qwen/Qwen2.5-VL-7B-Instruct` must work offline, so the configs of the models users start
from are data here. A local folder with a config.json, or a config already in the Hugging Face cache, works too
when its `model_type` is one the catalogue describes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from vlmtune.errors import VlmtuneError

_DATA = Path(__file__).with_name("models.yaml")


@dataclass(frozen=True)
class Architecture:
    """Facts about one HF `model_type`: which modules are which part, where the dimensions live, image rules."""

    model_type: str
    vision: tuple[str, ...]
    projector: tuple[str, ...]
    dims: dict[str, str]
    lora_targets: dict[str, list[str]]
    vision_lora_targets: tuple[str, ...]
    image: dict[str, Any]
    chat: dict[str, int]


@dataclass(frozen=True)
class ModelSpec:
    """One model the estimator can size: its architecture facts and a way to rebuild its config."""

    name: str
    arch: Architecture
    config: dict[str, Any] = field(default_factory=dict)
    """kwargs for `AutoConfig.for_model(model_type, **config)` (catalogue models)."""
    path: str | None = None
    """Local folder or cached hub id whose config.json is read instead (non-catalogue models)."""
    params: int | None = None
    """Expected exact parameter count (catalogue data; tests compare the meta-device build with it)."""
    analytic: dict[str, Any] | None = None
    """Analytic counts for architectures transformers does not ship (remote code)."""
    image: dict[str, Any] = field(default_factory=dict)
    """Image rule with the model's overrides applied."""

    @property
    def model_type(self) -> str:
        return self.arch.model_type


@lru_cache(maxsize=1)
def _raw() -> dict[str, Any]:
    return yaml.safe_load(_DATA.read_text(encoding="utf-8"))


def architectures() -> dict[str, Architecture]:
    out = {}
    for model_type, a in _raw()["architectures"].items():
        out[model_type] = Architecture(
            model_type=model_type, vision=tuple(a["vision"]), projector=tuple(a["projector"]), dims=dict(a["dims"]),
            lora_targets={k: list(v) for k, v in a["lora_targets"].items()},
            vision_lora_targets=tuple(a["vision_lora_targets"]), image=dict(a["image"]), chat=dict(a["chat"]))
    return out


def catalogue_names() -> list[str]:
    """Hub ids of the built-in models (what `--model` accepts without a local folder)."""
    return list(_raw()["models"])


def _spec(name: str, entry: dict[str, Any]) -> ModelSpec:
    arch = architectures()[entry["model_type"]]
    return ModelSpec(name=name, arch=arch, config=copy.deepcopy(entry.get("config", {})), params=entry.get("params"),
                     analytic=entry.get("analytic"), image={**arch.image, **entry.get("image", {})})


def _normalise(name: str) -> str:
    return name.strip().rstrip("/").lower()


def _catalogue_match(name: str) -> ModelSpec | None:
    wanted = _normalise(name)
    for hub_id, entry in _raw()["models"].items():
        names = [hub_id, *entry.get("aliases", [])]
        if any(_normalise(n) == wanted or _normalise(n).split("/")[-1] == wanted for n in names):
            return _spec(hub_id, entry)
    return None


def _local_config(name: str) -> dict[str, Any] | None:
    """config.json of a local folder, or of a hub id already in the HF cache (never downloads)."""
    import json

    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if folder.exists() or "/" not in name:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str) and Path(cached).is_file():
        return json.loads(Path(cached).read_text(encoding="utf-8"))
    return None


def lookup_model(name: str) -> ModelSpec:
    """The spec for a catalogue name (case-insensitive, with or without the organisation), a local folder, or a
    hub id whose config.json is in the Hugging Face cache. Raises VlmtuneError listing what is accepted."""
    local = _local_config(name)
    if local is not None:
        model_type = local.get("model_type")
        archs = architectures()
        if model_type not in archs:
            raise VlmtuneError(
                f"model '{name}' has model_type '{model_type}', which the memory estimator does not describe. "
                f"Supported model types: {', '.join(sorted(archs))}.")
        match = _catalogue_match(name)
        arch = archs[model_type]
        return ModelSpec(name=name, arch=arch, path=str(Path(name).expanduser()) if Path(name).expanduser().exists()
                         else name, params=None, image={**arch.image, **(match.image if match else {})})
    match = _catalogue_match(name)
    if match is not None:
        return match
    raise VlmtuneError(
        f"unknown model '{name}': it is not in the built-in catalogue, not a local folder with a config.json, and "
        "not in the Hugging Face cache. Built-in models: " + ", ".join(catalogue_names())
        + ". Or pass a folder written by save_pretrained (only config.json is read).")


def hf_config(spec: ModelSpec) -> Any:
    """The transformers config object for a spec (never touches the network)."""
    from transformers import AutoConfig

    if spec.analytic is not None:
        raise VlmtuneError(f"{spec.name} is remote code: it has no transformers config; its counts are analytic")
    if spec.path is not None:
        return AutoConfig.from_pretrained(spec.path, local_files_only=True)
    return AutoConfig.for_model(spec.model_type, **copy.deepcopy(spec.config))


def config_value(config: Any, dotted: str) -> Any:
    """`text_config.hidden_size` -> the value, or None when any step is missing."""
    node = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        if node is None:
            return None
    return node
