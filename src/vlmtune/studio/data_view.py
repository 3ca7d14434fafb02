"""Data page: `vlmtune data check` on a file, and its records as the model sees them (the training encoder's
tokens, labelled ones marked)."""

from __future__ import annotations

import base64
import io
from typing import Any

from vlmtune.studio.cli_args import command_text, parse

THUMBNAIL = 384
"""Longest side of an image shown on the page, in pixels."""


def check_argv(file: str, model: str = "", preset: str = "") -> list[str]:
    argv = ["data", "check", file]
    argv += ["--model", model] if model else []
    argv += ["--preset", preset] if preset else []
    return argv


def check(file: str, model: str = "", preset: str = "") -> dict[str, Any]:
    """The data check's report (as `data check --json` prints it), its text and note, and the command."""
    from vlmtune.cli.data_cmd import check as data_check

    argv = check_argv(file, model, preset)
    report, note = data_check(parse(argv))
    return {**report.to_dict(), "text": report.format(), "note": note, "command": command_text(argv)}


class Processors:
    """One loaded processor per model (no weights), for browsing samples."""

    def __init__(self) -> None:
        self._loaded: dict[tuple[str, str], tuple[Any, Any]] = {}

    def get(self, config: Any) -> tuple[Any, Any]:
        from vlmtune.families import family_for_model
        from vlmtune.hub import model_folder

        key = (config.model.name_or_path, repr(config.data))
        if key not in self._loaded:
            family = family_for_model(config.model.name_or_path, config.model.revision)
            folder = model_folder(config.model.name_or_path, config.model.revision)
            self._loaded[key] = (family, family.load_processor(folder, config.data))
        return self._loaded[key]


def samples(processors: Processors, file: str, model: str = "", preset: str = "", start: int = 0,
            count: int = 3) -> dict[str, Any]:
    """Records `start` .. `start+count` of the file's readable ones, each rendered by the chat template and encoded
    as training encodes it: tokens with their labels (trained or masked), images as thumbnails."""
    from vlmtune.cli.data_cmd import check_config
    from vlmtune.data.records import scan

    args = parse(check_argv(file, model, preset))
    config = check_config(args)
    family, processor = processors.get(config)
    out, index = [], 0
    for line, record, _ in scan(args.file, config.data, family.name):
        if record is None or line == 0:
            continue
        if index >= start + count:
            break
        if index >= start:
            out.append(_sample(record, processor, family, config.data))
        index += 1
    return {"start": start, "samples": out, "model": config.model.name_or_path, "family": family.name,
            "max_length": config.data.max_length}


def _sample(record: Any, processor: Any, family: Any, data_cfg: Any) -> dict[str, Any]:
    from vlmtune.data.images import open_image
    from vlmtune.data.processing import IGNORE_INDEX, Dropped, encode_or_drop, segments
    from vlmtune.errors import VlmtuneError

    shown: dict[str, Any] = {"line": record.line, "images": [], "segments": [], "tokens": [], "dropped": None}
    for path in record.images:
        image = open_image(path, data_cfg.max_image_megapixels)
        size = image.size
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        shown["images"].append({"size": list(size), "png": base64.b64encode(buf.getvalue()).decode("ascii")})
    try:
        shown["segments"] = [{"text": s.text, "labelled": s.labelled} for s in segments(record, processor, family)]
        encoded = encode_or_drop(record, processor, family, data_cfg)
    except VlmtuneError as exc:
        shown["dropped"] = str(exc)
        return shown
    if isinstance(encoded, Dropped):
        shown["dropped"] = encoded.reason
        return shown
    ids, labels = encoded.input_ids.tolist(), encoded.labels.tolist()
    image_id = processor.image_token_id
    tokens: list[dict[str, Any]] = []
    for token, label in zip(ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if token == image_id and tokens and tokens[-1].get("image"):
            tokens[-1]["count"] += 1
            continue
        if token == image_id:
            tokens.append({"image": True, "count": 1, "trained": trained})
        else:
            tokens.append({"text": processor.tokenizer.decode([token]), "trained": trained})
    shown["tokens"] = tokens
    shown["length"] = len(ids)
    shown["trained_tokens"] = sum(label != IGNORE_INDEX for label in labels)
    return shown
