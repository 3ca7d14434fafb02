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


LAYER_RULES = ("attention", "gated_delta_net")
"""How a decoder layer's activations are counted (memory/activations.py `layer_bytes_per_token`)."""


@dataclass(frozen=True)
class LayerKind:
    """What one kind of decoder layer keeps for backward beyond the plain attention layer (catalogue `layer_kinds`)."""

    rule: str = "attention"
    """attention: self-attention + MLP; gated_delta_net: Qwen3.5's linear attention (a chunked recurrence) + MLP."""
    qk_norm: bool = False
    """RMSNorm on each query and key head (kept in fp32 for backward)."""
    output_gate: bool = False
    """The attention output multiplied by a sigmoid gate the query projection also produces."""
    sandwich_norms: bool = False
    """Four RMSNorms per layer (before and after the attention and the MLP) instead of two."""
    attention_mask: bool = False
    """The family always passes SDPA a mask (Gemma 3's bidirectional image blocks): keys and values are repeated to
    the query heads (transformers uses SDPA's grouped-query path only without a mask) and SDPA keeps a 16-bit bias."""


def _layer_kind(model_type: str, name: str, entry: dict[str, Any]) -> LayerKind:
    known = set(LayerKind.__dataclass_fields__)
    unknown = sorted(set(entry) - known)
    if unknown or entry.get("rule", "attention") not in LAYER_RULES:
        raise VlmtuneError(
            f"{_DATA.name}: architectures.{model_type}.layer_kinds.{name}: unknown "
            + (f"keys {unknown} (known: {sorted(known)})" if unknown else
               f"rule {entry.get('rule')!r} (known: {', '.join(LAYER_RULES)})")
        )
    return LayerKind(**entry)


@lru_cache(maxsize=1)
def _layer_kinds() -> dict[str, dict[str, LayerKind]]:
    """Each architecture's `layer_kinds`, read and checked once: `architectures()` runs on every model lookup (each
    estimate), and LayerKind is frozen, so the lookups share these."""
    return {
        model_type: {k: _layer_kind(model_type, k, v or {}) for k, v in a.get("layer_kinds", {}).items()}
        for model_type, a in _raw()["architectures"].items()
    }


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
    projector_lora_targets: tuple[str, ...] = ()
    """Linear-layer leaf names inside the projector's layers (`method.lora.adapt_projector`); empty: none."""
    packed_row_masks: int = 0
    """Dense rows x length^2 boolean masks a packed row carries through the language model (speed.packing): the
    family builds them where per-span attention would lose attention the model has (Gemma 3: full and sliding
    window, FamilyDescriptor.packed_row_attention = family_mask); 0 where samples are kept apart by positions."""
    layer_kinds: dict[str, LayerKind] = field(default_factory=dict)
    """Decoder-layer kinds by the name the config's `layer_types` gives them (dims.layer_types); a layer whose kind
    is not listed, or a config without layer_types, counts as a plain attention layer."""
    gated_mlp: bool = True
    """The decoder layers' MLP is transformers' gated one (`down_proj(act_fn(gate_proj(x)) * up_proj(x))`), which
    speed.mlp_activation_recompute rewrites (speed/gated_mlp.py); false for remote code and expert layers."""


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
            model_type=model_type,
            vision=tuple(a["vision"]),
            projector=tuple(a["projector"]),
            dims=dict(a["dims"]),
            lora_targets={k: list(v) for k, v in a["lora_targets"].items()},
            vision_lora_targets=tuple(a["vision_lora_targets"]),
            image=dict(a["image"]),
            chat=dict(a["chat"]),
            projector_lora_targets=tuple(a.get("projector_lora_targets", ())),
            packed_row_masks=int(a.get("packed_row_masks", 0)),
            layer_kinds=dict(_layer_kinds()[model_type]),
            gated_mlp=bool(a.get("gated_mlp", True)),
        )
    return out


def catalogue_names() -> list[str]:
    """Hub ids of the built-in models (what `--model` accepts without a local folder)."""
    return list(_raw()["models"])


def _spec(name: str, entry: dict[str, Any]) -> ModelSpec:
    arch = architectures()[entry["model_type"]]
    return ModelSpec(
        name=name,
        arch=arch,
        config=copy.deepcopy(entry.get("config", {})),
        params=entry.get("params"),
        analytic=entry.get("analytic"),
        image={**arch.image, **entry.get("image", {})},
    )


def _normalise(name: str) -> str:
    return name.strip().rstrip("/").lower()


def _catalogue_match(name: str) -> ModelSpec | None:
    wanted = _normalise(name)
    for hub_id, entry in _raw()["models"].items():
        names = [hub_id, *entry.get("aliases", [])]
        if any(_normalise(n) == wanted or _normalise(n).split("/")[-1] == wanted for n in names):
            return _spec(hub_id, entry)
    return None


def _cached_file(name: str, filename: str) -> Path | None:
    """`filename` of a local folder, or of a hub id already in the HF cache (never downloads)."""
    folder = Path(name).expanduser()
    if folder.exists() or "/" not in name:
        return folder / filename if (folder / filename).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cached = try_to_load_from_cache(name, filename)
    except ValueError:  # not a valid hub id either (e.g. a folder that does not exist)
        return None
    return Path(cached) if isinstance(cached, str) and Path(cached).is_file() else None


def _read_json(path: Path | None) -> dict[str, Any] | None:
    import json

    return json.loads(path.read_text(encoding="utf-8")) if path is not None else None


def _processor_image(rule: dict[str, Any], pre: dict[str, Any] | None) -> dict[str, Any]:
    """The image rule with the limits a preprocessor_config.json sets (Qwen min/max pixels, Idefics3 tiles)."""
    if not pre:
        return rule
    size = pre.get("size") or {}
    out = dict(rule)
    if rule["rule"] == "dynamic":
        out["min_pixels"] = pre.get("min_pixels") or size.get("shortest_edge") or rule["min_pixels"]
        out["max_pixels"] = pre.get("max_pixels") or size.get("longest_edge") or rule["max_pixels"]
    elif rule["rule"] == "tiles":
        out["longest_edge"] = size.get("longest_edge", rule["longest_edge"])
        out["tile"] = (pre.get("max_image_size") or {}).get("longest_edge", rule["tile"])
    return out


def lookup_model(name: str) -> ModelSpec:
    """The spec for a local folder or a hub id whose config.json is in the Hugging Face cache, else a catalogue
    name (case-insensitive, with or without the organisation). Raises VlmtuneError listing what is accepted."""
    config_file = _cached_file(name, "config.json")
    local = _read_json(config_file)
    match = _catalogue_match(name)
    archs = architectures()
    if local is not None and local.get("model_type") in archs:
        arch = archs[local["model_type"]]
        base = match.image if match is not None and match.model_type == arch.model_type else arch.image
        pre = _read_json(_cached_file(name, "preprocessor_config.json"))
        return ModelSpec(
            name=name, arch=arch, path=str(config_file.parent), image=_processor_image(base, pre)
        )
    if match is not None:
        return match
    if local is not None:
        raise VlmtuneError(
            f"model '{name}' has model_type '{local.get('model_type')}', which the memory estimator does not "
            f"describe. Supported model types: {', '.join(sorted(archs))}."
        )
    raise VlmtuneError(
        f"unknown model '{name}': it is not in the built-in catalogue, not a local folder with a config.json, and "
        "not in the Hugging Face cache. Built-in models: "
        + ", ".join(catalogue_names())
        + ". Or pass a folder written by save_pretrained (only config.json is read)."
    )


def hf_config(spec: ModelSpec) -> Any:
    """The transformers config object for a spec (never touches the network)."""
    from transformers import AutoConfig

    if spec.analytic is not None:
        raise VlmtuneError(
            f"{spec.name} is remote code: it has no transformers config; its counts are analytic"
        )
    # the families register the architectures vlmtune ports (Qwen-VL's model_type "qwen") with transformers; a
    # config.json naming remote code is never run
    import vlmtune.families  # noqa: F401

    if spec.path is not None:
        return AutoConfig.from_pretrained(spec.path, local_files_only=True, trust_remote_code=False)
    return AutoConfig.for_model(spec.model_type, **copy.deepcopy(spec.config))


def config_value(config: Any, dotted: str) -> Any:
    """`text_config.hidden_size` -> the value, or None when any step is missing."""
    node = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        if node is None:
            return None
    return node
