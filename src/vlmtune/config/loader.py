"""Load a config from YAML/JSON, apply dotted command-line overrides, and validate it in one pass.

Every problem is collected and reported together in one ConfigError, each naming its field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.errors import ConfigError


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file that must hold a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path} (give an existing .yaml/.yml/.json file)"])
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError([f"cannot parse {path}: {exc}"], source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping of sections, got {type(data).__name__}"], source=str(path))
    return data


def _parse_value(raw: str) -> Any:
    """`rank=32` -> 32, `targets=[q_proj,v_proj]` -> list, `x=null` -> None; anything else stays a string."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Apply `a.b.c=value` overrides to a nested dict. Returns the new dict and the malformed ones."""
    out = json.loads(json.dumps(data, default=str))
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override '{item}' is not of the form section.field=value")
            continue
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"override '{item}': '{part}' is a value, not a section")
                break
            node = child
        else:
            node[parts[-1]] = _parse_value(raw)
    return out, problems


_UNION_TAGS = {"int", "str", "float", "bool", "list", "dict", "none"}


def _field_path(loc: tuple[Any, ...]) -> str:
    """Drop pydantic's union-member tags (`int`, `literal['auto']`, `list[str]`) so the path names the field."""
    parts = [str(p) for p in loc if not (str(p) in _UNION_TAGS or "[" in str(p) or str(p).startswith("function-"))]
    return ".".join(parts) or "(top level)"


def _format_errors(errors: list[dict[str, Any]]) -> list[str]:
    """One line per field; the alternatives of a union are joined (`should be an integer or 'auto'`)."""
    by_field: dict[str, list[dict[str, Any]]] = {}
    for err in errors:
        by_field.setdefault(_field_path(err["loc"]), []).append(err)
    lines = []
    for path, errs in by_field.items():
        if len(errs) == 1:
            lines.append(_format_error(errs[0], path))
            continue
        msgs = [e["msg"].removeprefix("Value error, ").removeprefix("Input should be ") for e in errs]
        lines.append(f"{path}: Input should be {' or '.join(dict.fromkeys(msgs))} (got {errs[0].get('input')!r})")
    return lines


def _format_error(err: dict[str, Any], loc: str) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown field (check the spelling; `vlmtune presets show` lists every field)"
    given = err.get("input")
    shown = "" if isinstance(given, dict) or err["type"] == "missing" else f" (got {given!r})"
    return f"{loc}: {msg}{shown}"


def config_from_dict(data: dict[str, Any], source: str | None = None, extra_problems: list[str] | None = None) -> VlmtuneConfig:
    problems = list(extra_problems or [])
    try:
        config = VlmtuneConfig.model_validate(data)
    except ValidationError as exc:
        problems += _format_errors(exc.errors())
        raise ConfigError(problems, source=source) from None
    if problems:
        raise ConfigError(problems, source=source)
    return config


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> VlmtuneConfig:
    """Base dict (e.g. a preset), then the file on top, then dotted overrides; validated once at the end."""
    data: dict[str, Any] = json.loads(json.dumps(base or {}, default=str))
    if path is not None:
        data = deep_merge(data, read_mapping(path))
    data, problems = apply_overrides(data, overrides or [])
    return config_from_dict(data, source=str(path) if path else None, extra_problems=problems)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def config_to_dict(config: VlmtuneConfig) -> dict[str, Any]:
    return config.model_dump(mode="json")


def save_config(config: VlmtuneConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (every field, defaults included), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path
