"""Load a config from YAML/JSON, apply dotted command-line overrides, and validate it in one pass.

Every problem is collected and reported together in one ConfigError, each naming its field.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from vlmtune.config.reading import MAX_DEPTH, Refused, parse_value, read_config_file, shown_path
from vlmtune.config.schema import VlmtuneConfig
from vlmtune.errors import ConfigError

log = logging.getLogger(__name__)

MAX_PROBLEMS = 25
"""Problems listed in one ConfigError; the rest are counted (a 10,000-entry list of wrong values is one mistake)."""


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file that must hold a mapping (bounded in size, depth and aliases: config/reading.py)."""
    data = read_config_file(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping of sections, got {type(data).__name__}"],
                          source=shown_path(path))
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Apply `a.b.c=value` overrides to a nested dict. Returns the new dict and the malformed ones."""
    out = json.loads(json.dumps(data, default=str))
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        shown = item if len(item) <= 80 else item[:77] + "..."
        if not sep or not key.strip():
            problems.append(f"override '{shown}' is not of the form section.field=value")
            continue
        parts = key.strip().split(".")
        if len(parts) > MAX_DEPTH:
            problems.append(f"override '{shown}' is nested {len(parts)} levels deep; a config has 4 at most")
            continue
        try:
            value = parse_value(raw)
        except Refused as exc:
            problems.append(f"override '{shown}': {exc.message}")
            continue
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"override '{shown}': '{part}' is a value, not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    return out, problems


_UNION_TAGS = {"int", "str", "float", "bool", "list", "dict", "none"}


def _field_path(loc: tuple[Any, ...]) -> str:
    """Drop pydantic's union-member tags (`int`, `literal['auto']`, `list[str]`) so the path names the field."""
    parts = [str(p) for p in loc if not (str(p) in _UNION_TAGS or "[" in str(p) or str(p).startswith(("function-", "constrained-")))]
    path = ".".join(parts) or "(top level)"
    return path if len(path) <= 100 else path[:97] + "..."


def _shown(value: Any) -> str:
    """A given value as the message quotes it, cut short (a value can be a 1 MB string or a 10,000-item list)."""
    if isinstance(value, (dict, list)) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value):,} items"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _format_errors(errors: list[dict[str, Any]]) -> list[str]:
    """One line per field; the alternatives of a union are joined (`should be an integer or 'auto'`). The
    cross-field rules of a model report one problem per line of their message."""
    by_field: dict[str, list[dict[str, Any]]] = {}
    for err in errors:
        by_field.setdefault(_field_path(err["loc"]), []).append(err)
    lines = []
    for path, errs in by_field.items():
        if len(errs) == 1 and errs[0]["type"] == "value_error" and (path == "(top level)" or "\n" in errs[0]["msg"]):
            prefix = "" if path == "(top level)" else f"{path}: "
            lines += [prefix + line for line in errs[0]["msg"].removeprefix("Value error, ").splitlines()]
        elif len(errs) == 1:
            lines.append(_format_error(errs[0], path))
        else:
            msgs = [e["msg"].removeprefix("Value error, ").removeprefix("Input should be ") for e in errs]
            lines.append(f"{path}: Input should be {' or '.join(dict.fromkeys(msgs))} (got {_shown(errs[0].get('input'))})")
    return lines


def _format_error(err: dict[str, Any], loc: str) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        hint = did_you_mean(loc)
        if hint:
            return f"{loc}: unknown field; {hint} (`vlmtune presets show` lists every field)"
        return f"{loc}: unknown field (check the spelling; `vlmtune presets show` lists every field)"
    given = err.get("input")
    shown = "" if isinstance(given, dict) or err["type"] == "missing" else f" (got {_shown(given)})"
    return f"{loc}: {msg}{shown}"


def _model_fields(cls: Any) -> dict[str, Any]:
    """A pydantic model's fields: name -> the model class of a nested section (or None for a value)."""
    import typing

    from pydantic import BaseModel

    out = {}
    for name, field in cls.model_fields.items():
        kinds = [field.annotation, *typing.get_args(field.annotation)]
        out[name] = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
    return out


def _all_paths(cls: Any, prefix: str = "") -> list[str]:
    paths = []
    for name, sub in _model_fields(cls).items():
        paths.append(prefix + name)
        if sub is not None:
            paths += _all_paths(sub, f"{prefix}{name}.")
    return paths


def field_info(path: str) -> Any:
    """The pydantic FieldInfo of a dotted config field (its `description` is the field's docstring), or None."""
    parts = path.split(".")
    cls: Any = VlmtuneConfig
    for part in parts[:-1]:
        cls = _model_fields(cls).get(part) if cls is not None else None
    return cls.model_fields.get(parts[-1]) if cls is not None else None


def did_you_mean(path: str) -> str:
    """`did you mean method.lora.rank?` for a dotted key the config does not have (a YAML key or an override)."""
    import difflib

    parts = path.split(".")
    cls: Any = VlmtuneConfig
    for part in parts[:-1]:
        cls = _model_fields(cls).get(part) if cls is not None else None
    if cls is not None:
        near = difflib.get_close_matches(parts[-1], list(_model_fields(cls)), n=1, cutoff=0.6)
        if near:
            return f"did you mean {'.'.join([*parts[:-1], near[0]])}?"
    paths = _all_paths(VlmtuneConfig)
    same_name = [p for p in paths if p.rsplit(".", 1)[-1] == parts[-1]]
    near = same_name or difflib.get_close_matches(path, paths, n=1, cutoff=0.75)
    return f"did you mean {near[0]}?" if near else ""


def _capped(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_PROBLEMS:
        return problems
    return [*problems[:MAX_PROBLEMS], f"... and {len(problems) - MAX_PROBLEMS:,} more problems not shown"]


def config_from_dict(data: dict[str, Any], source: str | None = None, extra_problems: list[str] | None = None) -> VlmtuneConfig:
    problems = list(extra_problems or [])
    try:
        config = VlmtuneConfig.model_validate(data)
    except ValidationError as exc:
        problems += _format_errors(exc.errors())
        raise ConfigError(_capped(problems), source=source) from None
    if problems:
        raise ConfigError(_capped(problems), source=source)
    return config


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
    problems: list[str] | None = None,
) -> VlmtuneConfig:
    """Base dict (e.g. a preset), then the file on top, then dotted overrides; validated once at the end.

    problems: found by the caller (contradictory command-line flags), reported with the config's own. Settings
    that are legal but likely wrong (a learning rate above 0.01) are logged as warnings."""
    problems = list(problems or [])
    data: dict[str, Any] = json.loads(json.dumps(base or {}, default=str))
    source = shown_path(path) if path is not None else None
    if path is not None:
        try:
            data = deep_merge(data, relative_to_file(read_mapping(path), Path(path)))
        except ConfigError as exc:  # the file cannot be read: report it with the flags' and overrides' problems
            _, override_problems = apply_overrides({}, overrides or [])
            raise ConfigError(_capped([*exc.problems, *problems, *override_problems]), source=source) from None
    data, override_problems = apply_overrides(data, overrides or [])
    config = config_from_dict(data, source=source, extra_problems=problems + override_problems)
    for warning in config_warnings(config):
        log.warning("warning: %s", warning)
    return config


DATA_PATH_FIELDS = ("train_path", "val_path", "image_root")
"""The data section's paths that a config file gives relative to itself (docs: README "Configuration")."""


def local_relative(value: Any) -> tuple[str, str] | None:
    """(path, "#suffix" or "") of a data path given relative to some folder (dataset_info.json#NAME and FOLDER#SPLIT
    keep their suffix), or None where there is nothing to rebase: no value, a hub data set (hf://...), an absolute
    path. The one rule behind reading a config file (relative_to_file), saving a run's (save_config) and writing
    recommend's (cli/recommend_cmd)."""
    if not isinstance(value, str) or not value or "://" in value or Path(value).expanduser().is_absolute():
        return None
    local, sep, suffix = value.partition("#")
    return local, sep + suffix


def relative_to_file(mapping: dict[str, Any], config_file: Path) -> dict[str, Any]:
    """A config file's relative data paths resolved against the file's folder, as image paths are resolved against
    their data file: a config moves with its data. A path found only from the working directory (how vlmtune read
    them before) is kept with a warning; command-line flags and dotted overrides stay relative to the working
    directory. Hub data sets (hf://...) and absolute paths are left as they are."""
    data = mapping.get("data")
    if not isinstance(data, dict):
        return mapping
    folder = config_file.expanduser().resolve().parent
    data = dict(data)
    for key in DATA_PATH_FIELDS:
        value = data.get(key)
        if (parts := local_relative(value)) is None:
            continue
        local, suffix = parts
        beside, here = folder / local, Path(local)
        if not beside.exists() and here.exists():
            log.warning("warning: data.%s=%s in %s is read from the working directory (%s); relative paths in a "
                        "config file are relative to the file's folder (%s): move the data or write the path "
                        "from there", key, value, shown_path(config_file), here.resolve(), folder)
            continue
        data[key] = str(beside) + suffix
    return {**mapping, "data": data}


def config_warnings(config: VlmtuneConfig) -> list[str]:
    """Legal settings that are probably a mistake (the run may still be what the user wants)."""
    warnings = []
    lr = config.training.learning_rate
    if lr > 0.01:
        warnings.append(
            f"training.learning_rate={lr:g} is far above fine-tuning rates (1e-6 to 1e-3; LoRA up to about 2e-3) "
            "and is likely to diverge; the run stops at the first non-finite loss (training.on_nonfinite)"
        )
    return warnings


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
    """Write the resolved config as YAML (every field, defaults included, data paths absolute), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    data = config_to_dict(config)
    for key in DATA_PATH_FIELDS:  # absolute: the saved file reads the same data from wherever it is loaded
        if (parts := local_relative(data["data"].get(key))) is not None:
            data["data"][key] = str(Path(parts[0]).expanduser().resolve()) + parts[1]
    tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path
