"""Presets are YAML data in `vlmtune/presets/`; this module lists, reads and builds configs from them."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from vlmtune.config.loader import config_from_dict, deep_merge
from vlmtune.config.schema import VlmtuneConfig
from vlmtune.errors import ConfigError


def _preset_files() -> dict[str, Any]:
    folder = resources.files("vlmtune") / "presets"
    return {p.name.removesuffix(".yaml"): p for p in folder.iterdir() if p.name.endswith(".yaml")}


def list_presets() -> list[str]:
    return sorted(_preset_files())


def preset_text(name: str) -> str:
    files = _preset_files()
    if name not in files:
        raise ConfigError([f"unknown preset '{name}'; available: {', '.join(sorted(files))}"])
    return files[name].read_text(encoding="utf-8")


def preset_header(name: str) -> str:
    """The comment block at the top of a preset: target hardware and how to launch it."""
    lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in preset_text(name).splitlines() if ln.startswith("#")]
    return "\n".join(lines)


def preset_dict(name: str) -> dict[str, Any]:
    return yaml.safe_load(preset_text(name)) or {}


def load_preset(name: str, **sections: Any) -> VlmtuneConfig:
    """Build a validated config from a preset, with nested dict overrides (`data={"train_path": ...}`)."""
    return config_from_dict(deep_merge(preset_dict(name), sections), source=f"preset {name}")


class ConfigPresets:
    """Ready configurations by target hardware. Each returns a full, editable `VlmtuneConfig`.

    >>> cfg = ConfigPresets.ultra_low_memory(data_path="train.jsonl", val_path="val.jsonl")
    >>> cfg.method.lora.rank = 16
    """

    @staticmethod
    def _make(name: str, data_path: str | Path | None, val_path: str | Path | None, **kw: Any) -> VlmtuneConfig:
        data: dict[str, Any] = {}
        if data_path is not None:
            data["train_path"] = str(data_path)
        if val_path is not None:
            data["val_path"] = str(val_path)
        model = {"name_or_path": kw.pop("model")} if "model" in kw else {}
        sections = {"data": data, "model": model}
        if "output_dir" in kw:
            sections["output_dir"] = str(kw.pop("output_dir"))
        if kw:
            raise ConfigError([f"ConfigPresets.{name}: unknown argument(s) {sorted(kw)}; use data_path, val_path, model, output_dir"])
        return load_preset(name, **sections)

    @classmethod
    def ultra_low_memory(cls, data_path=None, val_path=None, **kw) -> VlmtuneConfig:
        """8 GB GPU: lean QLoRA (NF4 + double quant, 4-bit vision tower and lm_head, embeddings in CPU memory, paged
        8-bit AdamW), r8/alpha 16, batch 1 x 32, max_length 512, 336 px."""
        return cls._make("ultra_low_memory", data_path, val_path, **kw)

    @classmethod
    def consumer_16gb(cls, data_path=None, val_path=None, **kw) -> VlmtuneConfig:
        """16 GB GPU: LoRA r16 on all linear layers, batch 2 x 8, 448 px."""
        return cls._make("consumer_16gb", data_path, val_path, **kw)

    @classmethod
    def consumer_24gb(cls, data_path=None, val_path=None, **kw) -> VlmtuneConfig:
        """24 GB GPU: LoRA r16 on all linear layers, batch 4 x 4, 448 px."""
        return cls._make("consumer_24gb", data_path, val_path, **kw)

    @classmethod
    def balanced(cls, data_path=None, val_path=None, **kw) -> VlmtuneConfig:
        """LoRA r32/alpha 64 on q,k,v,o."""
        return cls._make("balanced", data_path, val_path, **kw)

    @classmethod
    def high_capacity(cls, data_path=None, val_path=None, **kw) -> VlmtuneConfig:
        """80 GB GPU: LoRA r64/alpha 128 on all linear layers, projector trained."""
        return cls._make("high_capacity", data_path, val_path, **kw)

    @classmethod
    def full_finetune(cls, data_path=None, val_path=None, **kw) -> VlmtuneConfig:
        """Full fine-tuning, vision tower frozen."""
        return cls._make("full_finetune", data_path, val_path, **kw)
