"""Parsing the two accepted record styles into `Record` (see docs/DATA.md), collecting every problem.

- chat style: `{"messages": [{"role", "content": str | [{"type": "text"|"image"|"image_url", ...}]}]}`,
  optionally with top-level `"images": [...]` that fill path-less `{"type": "image"}` items (TRL style) or, when
  there are none, `<image>` placeholders in the text (LLaMA-Factory style).
- LLaVA/ShareGPT style: `{"image": str | [str], "conversations": [{"from": "human"|"gpt"|"system", "value"}]}`,
  where `<image>` placeholders mark where the images go; with images but no placeholder, the images go at the start
  of the first human turn, as LLaVA does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from vlmtune.data.records import ROLES, ImagePart, Message, Part, Problem, Record, TextPart

IMAGE_PLACEHOLDER = "<image>"
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^data:")


class _Slot:
    """An image whose path comes from the record's top-level image list."""


_SLOT = _Slot()


class _Collector:
    def __init__(self, line: int):
        self.line = line
        self.problems: list[Problem] = []

    def error(self, where: str, message: str) -> None:
        self.problems.append(Problem(self.line, where, message))

    def warn(self, where: str, message: str) -> None:
        self.problems.append(Problem(self.line, where, message, "warning"))

    @property
    def failed(self) -> bool:
        return any(p.severity == "error" for p in self.problems)


def resolve_image_path(raw: str, base_dir: Path) -> Path:
    """Absolute path of an image reference; `file://` URIs are accepted, other URLs raise ValueError."""
    if raw.startswith("file://"):
        raw = unquote(urlparse(raw).path)
    elif _URL.match(raw):
        raise ValueError(
            f"{raw[:60]!r} is a URL; only local files are supported: download the image and give its path"
        )
    path = Path(raw).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base_dir / path))


def _path(value: Any, where: str, base_dir: Path, out: _Collector) -> Path | None:
    if not isinstance(value, str) or not value.strip():
        out.error(where, f"must be a non-empty file path string, got {value!r:.60}")
        return None
    try:
        return resolve_image_path(value, base_dir)
    except ValueError as exc:
        out.error(where, str(exc))
        return None


def _content_item(item: Any, where: str, base_dir: Path, out: _Collector) -> Part | _Slot | None:
    if not isinstance(item, dict):
        out.error(where, 'a content item must be an object like {"type": "text", "text": "..."}')
        return None
    kind = item.get("type")
    if kind == "text":
        if not isinstance(item.get("text"), str):
            out.error(f"{where}.text", "a text item needs a string 'text'")
            return None
        return TextPart(item["text"])
    if kind == "image":
        key = next((k for k in ("image", "path", "url") if item.get(k) is not None), None)
        if key is None:
            return _SLOT
        path = _path(item[key], f"{where}.{key}", base_dir, out)
        return ImagePart(path) if path else None
    if kind == "image_url":
        ref = item.get("image_url")
        ref = ref.get("url") if isinstance(ref, dict) else ref
        path = _path(ref, f"{where}.image_url", base_dir, out)
        return ImagePart(path) if path else None
    out.error(f"{where}.type", f"unsupported content type {kind!r}; use 'text', 'image' or 'image_url'")
    return None


def _content(content: Any, where: str, base_dir: Path, out: _Collector) -> list[Part | _Slot]:
    if isinstance(content, str):
        return [TextPart(content)]
    if not isinstance(content, list):
        out.error(where, 'content must be a string or a list of {"type": ...} items')
        return []
    items = [_content_item(item, f"{where}[{i}]", base_dir, out) for i, item in enumerate(content)]
    return [item for item in items if item is not None]


def _top_images(obj: dict[str, Any], base_dir: Path, out: _Collector) -> tuple[str, list[Path | None]] | None:
    """The record-level image list (None items: invalid paths, already reported)."""
    keys = [k for k in ("image", "images") if obj.get(k) is not None]
    if len(keys) > 1:
        out.error("images", "give either 'image' or 'images', not both")
    if not keys:
        return None
    key, value = keys[0], obj[keys[0]]
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list):
        out.error(key, "must be a path or a list of paths")
        return key, []
    paths = [
        _path(v, f"{key}[{i}]" if isinstance(value, list) else key, base_dir, out)
        for i, v in enumerate(values)
    ]
    return key, paths


def _split_placeholders(parts: list[Part | _Slot]) -> list[Part | _Slot]:
    """Text with `<image>` becomes text / slot / text; whitespace next to a placeholder is dropped."""
    out: list[Part | _Slot] = []
    for part in parts:
        if not isinstance(part, TextPart) or IMAGE_PLACEHOLDER not in part.text:
            out.append(part)
            continue
        for i, piece in enumerate(part.text.split(IMAGE_PLACEHOLDER)):
            if i:
                out.append(_SLOT)
            if piece.strip():
                out.append(TextPart(piece.strip()))
    return out


def _fill_slots(
    turns: list[tuple[str, str, list[Any]]],
    top: tuple[str, list[Path | None]] | None,
    placeholders: bool,
    out: _Collector,
) -> None:
    """Give every slot its image from the top-level list, in order; check the counts match."""
    key, images = top if top else ("images", [])
    if placeholders:
        for i, (_, _, parts) in enumerate(turns):
            turns[i][2][:] = _split_placeholders(parts)
    slots = sum(isinstance(p, _Slot) for _, _, parts in turns for p in parts)
    if slots == 0 and images:
        first_user = next((parts for _, role, parts in turns if role == "user"), None)
        if first_user is not None:
            first_user[:0] = [_SLOT] * len(images)
            slots = len(images)
    if slots != len(images):
        what = f"'{IMAGE_PLACEHOLDER}' placeholder(s)" if placeholders else "path-less image item(s)"
        out.error(
            key, f"{len(images)} image(s) listed but {slots} {what} in the conversation; they must match"
        )
        return
    it = iter(images)
    for _, _, parts in turns:
        filled = [
            (ImagePart(path) if (path := next(it)) else None) if isinstance(p, _Slot) else p for p in parts
        ]
        parts[:] = [p for p in filled if p is not None]


def _messages(obj: dict[str, Any], base_dir: Path, out: _Collector) -> list[tuple[str, str, list[Any]]]:
    raw = obj["messages"]
    if not isinstance(raw, list) or not raw:
        out.error("messages", 'must be a non-empty list of {"role", "content"} objects')
        return []
    turns = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            out.error(where, "a message must be an object with 'role' and 'content'")
            continue
        role = m.get("role")
        if role not in ROLES:
            out.error(f"{where}.role", f"must be one of {', '.join(ROLES)}; got {role!r}")
        if "content" not in m:
            out.error(where, "message has no 'content'")
        turns.append((where, role, _content(m.get("content"), f"{where}.content", base_dir, out)))
    top = _top_images(obj, base_dir, out)
    has_slots = any(isinstance(p, _Slot) for _, _, parts in turns for p in parts)
    if top is not None:
        _fill_slots(turns, top, placeholders=not has_slots, out=out)
    else:
        for where, _, parts in turns:
            if any(isinstance(p, _Slot) for p in parts):
                out.error(
                    f"{where}.content",
                    "image item without a path: give 'image': 'path/to/file', "
                    "or list the paths in the record's top-level 'images'",
                )
            if any(isinstance(p, TextPart) and IMAGE_PLACEHOLDER in p.text for p in parts):
                out.warn(
                    f"{where}.content",
                    f"'{IMAGE_PLACEHOLDER}' in text is kept as literal text in a record "
                    "without top-level 'images'; use an image item instead",
                )
    return turns


def _conversations(obj: dict[str, Any], base_dir: Path, out: _Collector) -> list[tuple[str, str, list[Any]]]:
    raw = obj["conversations"]
    if not isinstance(raw, list) or not raw:
        out.error("conversations", 'must be a non-empty list of {"from", "value"} objects')
        return []
    turns = []
    for i, m in enumerate(raw):
        where = f"conversations[{i}]"
        if not isinstance(m, dict):
            out.error(where, "a turn must be an object with 'from' and 'value'")
            continue
        role = SHAREGPT_ROLES.get(m["from"]) if isinstance(m.get("from"), str) else None
        if role is None:
            out.error(f"{where}.from", f"must be one of human, gpt, system; got {m.get('from')!r}")
        if not isinstance(m.get("value"), str):
            out.error(f"{where}.value", "must be a string")
        turns.append((where, role, [TextPart(m["value"])] if isinstance(m.get("value"), str) else []))
    _fill_slots(turns, _top_images(obj, base_dir, out), placeholders=True, out=out)
    return turns


def _check_turns(turns: list[tuple[str, str, list[Any]]], out: _Collector) -> None:
    for i, (where, role, parts) in enumerate(turns):
        if role == "system" and i > 0:
            out.error(where, "a system message may only come first")
        if role in ("system", "assistant") and any(isinstance(p, ImagePart) for p in parts):
            out.error(where, f"images may only appear in user turns, not in a {role} turn")
        if role == "assistant" and not "".join(p.text for p in parts if isinstance(p, TextPart)).strip():
            out.error(where, "assistant turn has no text")
        elif not parts:
            out.error(where, "turn has no text and no image")
    dialogue = [(where, role) for where, role, _ in turns if role != "system"]
    roles = [role for _, role in dialogue]
    if roles and roles[0] == "assistant":
        out.error(
            dialogue[0][0], "the conversation starts with an assistant turn; it must start with a user turn"
        )
    if "assistant" not in roles:
        out.error("", "no assistant turn: there is nothing to learn from this record")
    elif roles[-1] != "assistant":
        out.error(
            turns[-1][0],
            "the conversation ends on a user turn, which nothing learns from; "
            "end with an assistant turn or remove the last turn",
        )


def parse_record(obj: Any, line: int, base_dir: Path) -> tuple[Record | None, list[Problem]]:
    """A parsed JSON value -> (Record or None when there are errors, every problem found). Never raises."""
    out = _Collector(line)
    if not isinstance(obj, dict):
        out.error("", f"a record must be a JSON object, got {type(obj).__name__}")
        return None, out.problems
    if "messages" in obj and "conversations" in obj:
        out.error("", "record has both 'messages' and 'conversations'; use one style per record")
        return None, out.problems
    if "messages" in obj:
        turns = _messages(obj, base_dir, out)
    elif "conversations" in obj:
        turns = _conversations(obj, base_dir, out)
    else:
        keys = ", ".join(sorted(obj)) or "none"
        out.error(
            "",
            f"record needs 'messages' (chat style) or 'conversations' (LLaVA/ShareGPT style); keys: {keys}",
        )
        return None, out.problems
    if not out.failed:
        _check_turns(turns, out)
    if out.failed:
        return None, out.problems
    return Record(line, [Message(role, parts) for _, role, parts in turns]), out.problems
