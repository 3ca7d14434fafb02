"""Configure page: the typed config's fields with their docs, a form's settings as the `vlmtune train` command and
YAML it stands for, the memory estimate (`vlmtune estimate`) and `vlmtune recommend` filling the form.

A form is `{"preset": NAME or "", "settings": {dotted field: value text}, "gpu": NAME}`: its settings are the
command line's dotted overrides, so `vlmtune train --preset NAME field=value ...` is exactly the form."""

from __future__ import annotations

import base64
import enum
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

from vlmtune.errors import ConfigError, VlmtuneError
from vlmtune.studio.cli_args import command_text, parse


def items(form: dict[str, Any]) -> list[str]:
    """The form as command-line arguments: `--preset NAME` then one `field=value` per setting."""
    preset = str(form.get("preset") or "")
    settings = form.get("settings") or {}
    if not isinstance(settings, dict):
        raise VlmtuneError("settings: expected an object of field -> value")
    return [*(["--preset", preset] if preset else []), *(f"{k}={v}" for k, v in settings.items())]


def _choices(annotation: Any) -> list[Any] | None:
    """The values a field takes when it takes only named ones (Literal, Enum, bool, None in a union), else None."""
    values: list[Any] = []
    for kind in typing.get_args(annotation) if _is_union(annotation) else (annotation,):
        if typing.get_origin(kind) is typing.Literal:
            values += list(typing.get_args(kind))
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            values += [m.value for m in kind]
        elif kind is bool:
            values += [True, False]
        elif kind is type(None):
            values.append(None)
        else:
            return None
    return list(dict.fromkeys(values))


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def type_name(annotation: Any) -> str:
    """A field's type as the page shows it: `int | 'auto'`, `'drop' | 'error'`, `list[str]`, `Path | None`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if _is_union(annotation):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(repr(m.value) for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def fields() -> list[dict[str, Any]]:
    """Every config field: dotted path, section, type, choices, default and its docstring (config/schema.py)."""
    from pydantic import BaseModel

    from vlmtune.config.schema import VlmtuneConfig

    out: list[dict[str, Any]] = []

    def walk(cls: Any, prefix: str) -> None:
        for name, info in cls.model_fields.items():
            kinds = [info.annotation, *typing.get_args(info.annotation)]
            sub = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
            if sub is not None:
                walk(sub, f"{prefix}{name}.")
                continue
            out.append({"path": prefix + name, "section": prefix.rstrip(".") or "run",
                        "type": type_name(info.annotation), "choices": _choices(info.annotation),
                        "doc": " ".join((info.description or "").split())})

    walk(VlmtuneConfig, "")
    return out


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A config dict as dotted fields; values that are not sections stay whole (lists, `data.columns`)."""
    from vlmtune.config.loader import field_info

    out: dict[str, Any] = {}
    for key, value in data.items():
        path = prefix + key
        if isinstance(value, dict) and (field_info(path) is None or _is_section(path)):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _is_section(path: str) -> bool:
    return not any(f["path"] == path for f in _FIELDS())


_CACHE: dict[str, list[dict[str, Any]]] = {}


def _FIELDS() -> list[dict[str, Any]]:  # noqa: N802 - a cached constant
    if "fields" not in _CACHE:
        _CACHE["fields"] = fields()
    return _CACHE["fields"]


def value_text(value: Any) -> str:
    """A value as a dotted override writes it (YAML flow: `null`, `true`, `[none]`, `{a: b}`)."""
    import yaml

    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def resolve(form: dict[str, Any]) -> dict[str, Any]:
    """The form's config (every field's value), its YAML as `train --print-config` prints it, and the commands; a
    config with problems returns them listed (as the CLI would report them) instead of values."""
    import yaml

    from vlmtune.cli.train_cmd import annotated, resolve_config
    from vlmtune.config.loader import config_to_dict
    from vlmtune.config.method_defaults import derived_fields

    argv = ["train", *items(form)]
    out: dict[str, Any] = {"command": command_text(argv), "problems": []}
    try:
        config = resolve_config(parse(argv))
    except ConfigError as exc:
        out["problems"] = exc.problems
        return out
    except VlmtuneError as exc:
        out["problems"] = [str(exc)]
        return out
    data = config_to_dict(config)
    derived = derived_fields(config)
    out["values"] = {k: value_text(v) for k, v in flatten(data).items()}
    out["derived"] = derived
    out["yaml"] = annotated(yaml.safe_dump(data, sort_keys=False), derived)
    return out


def estimate(form: dict[str, Any]) -> dict[str, Any]:
    """`vlmtune estimate` of the form against its GPU: the breakdown (table and numbers) and its picture."""
    from vlmtune.cli.estimate_cmd import estimate_args
    from vlmtune.memory.gpus import GIB
    from vlmtune.memory.picture import render_breakdown

    gpu = str(form.get("gpu") or "")
    argv = ["estimate", *items(form), *(["--gpu", gpu] if gpu else [])]
    _, breakdown, _ = estimate_args(parse(argv))
    with tempfile.TemporaryDirectory(prefix="vlmtune-studio-") as tmp:
        png = render_breakdown(breakdown, Path(tmp) / "estimate.png").read_bytes()
    verdict = breakdown.verdict
    return {
        "command": command_text(argv),
        "table": breakdown.to_table(),
        "summary": breakdown.peak_summary(),
        "peak_gib": round(breakdown.peak_total / GIB, 3),
        "fits": None if verdict is None else verdict.status,
        "png": base64.b64encode(png).decode("ascii"),
    }


def recommend(form: dict[str, Any]) -> dict[str, Any]:
    """`vlmtune recommend --gpu NAME` from the form: the recommended file's settings, to fill the form with."""
    import yaml

    from vlmtune.cli.recommend_cmd import recommendation
    from vlmtune.memory.advice import config_yaml

    gpu = str(form.get("gpu") or "")
    if not gpu:
        raise VlmtuneError("gpu: pick the GPU to recommend a setting for (a catalogue name or a size such as 24GB)")
    argv = ["recommend", *items(form), "--gpu", gpu, "--output", "-"]
    args = parse(argv)
    rec, config = recommendation(args)
    if rec.best is None:
        raise VlmtuneError(f"recommend: nothing fits {rec.num_gpus} x {rec.gpu.name}: " + "; ".join(rec.reasons)
                           + ". Pick a larger GPU, or lower data.max_length / data.image_size.")
    text = config_yaml(rec, config, "THIS_FILE", train_path=args.data)
    settings = {**(form.get("settings") or {}), **{k: value_text(v)
                                                    for k, v in flatten(yaml.safe_load(text)).items()}}
    return {"command": command_text(argv), "summary": rec.describe(), "reasons": rec.reasons, "yaml": text,
            "settings": settings}


def save(form: dict[str, Any], path: Path, overwrite: bool = False) -> Path:
    """Write the form's YAML (as `resolve` shows it) to `path`, with the CLI's rule for files: only a missing file
    or one vlmtune wrote is replaced unless `overwrite` (vlmtune.outputs)."""
    from vlmtune import outputs

    shown = resolve(form)
    if shown["problems"]:
        raise ConfigError(shown["problems"])
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise VlmtuneError(f"save as: {path.name} should end in .yaml (a config file `vlmtune train FILE` reads)")
    outputs.check_file(path, what="the config file", overwrite=overwrite, option="save as")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(shown["yaml"], encoding="utf-8")
    outputs.record(path.parent, [path.name], by="studio")
    return path


def catalogue() -> dict[str, Any]:
    """Presets, GPUs and methods for the page's pickers."""
    from vlmtune.config.presets import list_presets, preset_header
    from vlmtune.memory import all_gpus

    return {
        "presets": [{"name": n, "header": preset_header(n)} for n in list_presets()],
        "gpus": [g.name for g in all_gpus()],
        "fields": _FIELDS(),
    }
