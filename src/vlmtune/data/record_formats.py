"""Parsing the two accepted record styles into `Record` (see docs/DATA.md), collecting every problem.

- chat style: `{"messages": [{"role", "content": str | [{"type": "text"|"image"|"image_url", ...}]}]}`,
  optionally with top-level `"images": [...]` that fill path-less `{"type": "image"}` items (TRL style) or, when
  there are none, `<image>` placeholders in the text (LLaMA-Factory style).
- LLaVA/ShareGPT style: `{"image": str | [str], "conversations": [{"from": "human"|"gpt"|"system", "value"}]}`,
  where `<image>` placeholders mark where the images go; with images but no placeholder, the images go at the start
  of the first human turn, as LLaVA does.

Every key is accounted for (`fields`): read, metadata, or reported (an error, or a warning with
`data.on_ignored_field=warn`); video is refused. Text and paths are checked against `RecordRules` (`limits`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from vlmtune.data import fields
from vlmtune.data.limits import (
    RecordRules,
    has_lone_surrogate,
    path_length_problem,
    path_text_problem,
    surrogate_message,
)
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


def _preview(value: Any) -> str:
    """A short, printable picture of a JSON value (never the repr of a whole large value)."""
    if isinstance(value, str):
        return ascii(value[:60]) + ("..." if len(value) > 60 else "")
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'} of {len(value)} item(s)"
    return ascii(value)[:60]


class _Collector:
    def __init__(self, line: int, rules: RecordRules):
        self.line = line
        self.rules = rules
        self.problems: list[Problem] = []

    def error(self, where: str, message: str) -> None:
        self.problems.append(Problem(self.line, where, message))

    def warn(self, where: str, message: str) -> None:
        self.problems.append(Problem(self.line, where, message, "warning"))

    def ignored(self, where: str, keys: list[str]) -> None:
        """Keys nothing reads: an error each, or with data.on_ignored_field=warn a counted warning."""
        warn = self.rules.on_ignored_field == "warn"
        for key in keys:
            name = key[:60]
            at = f"{where}.{name}" if where else name
            message = fields.ignored_message(name, switch_hint=not warn)
            self.problems.append(Problem(self.line, at, message, "warning" if warn else "error",
                                         fields.IGNORED_CODE if warn else ""))

    def video(self, where: str, what: str) -> None:
        self.error(where, f"{what}: {self.rules.video_message}")

    def text(self, value: str, where: str) -> TextPart | None:
        if has_lone_surrogate(value):
            self.error(where, surrogate_message(value))
            return None
        if fields.VIDEO_PLACEHOLDER in value:
            self.video(where, f"a {fields.VIDEO_PLACEHOLDER} placeholder in the text")
            return None
        return TextPart(value)

    @property
    def failed(self) -> bool:
        return any(p.severity == "error" for p in self.problems)


def resolve_image_path(raw: str, base_dir: Path) -> Path:
    """Absolute path of an image reference; `file://` URIs are accepted. Raises ValueError for other URLs and for
    paths no file can have (too long, NUL, lone surrogate, `~user` of an unknown user)."""
    if raw.startswith("file://"):
        raw = unquote(urlparse(raw).path)
    elif _URL.match(raw):
        raise ValueError(
            f"{ascii(raw[:60])} is a URL; only local files are supported: download the image and give its path"
        )
    problem = path_text_problem(raw)
    if problem:
        raise ValueError(problem)
    try:
        path = Path(raw).expanduser()
    except RuntimeError as exc:  # `~name/...` for a user this machine does not know
        raise ValueError(f"{ascii(raw[:60])}: cannot expand '~' ({exc}); give the full path") from exc
    resolved = os.path.normpath(path if path.is_absolute() else base_dir / path)
    problem = path_length_problem(resolved)
    if problem:
        raise ValueError(problem)
    return Path(resolved)


def _path(value: Any, where: str, base_dir: Path, out: _Collector) -> Path | None:
    if not isinstance(value, str) or not value.strip():
        out.error(where, f"must be a non-empty file path string, got {_preview(value)}")
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
    if kind in ("video", "video_url") or not fields.VIDEO_KEYS.isdisjoint(item):
        out.video(where, "a video item")
        return None
    if not isinstance(kind, str) or kind not in fields.ITEM_KEYS:
        out.error(f"{where}.type", f"unsupported content type {_preview(kind)}; use 'text', 'image' or 'image_url'")
        return None
    out.ignored(where, fields.unread_keys(item, fields.ITEM_KEYS[kind]))
    if kind == "text":
        if not isinstance(item.get("text"), str):
            out.error(f"{where}.text", "a text item needs a string 'text'")
            return None
        return out.text(item["text"], f"{where}.text")
    if kind == "image":
        keys = [k for k in ("image", "path", "url") if item.get(k) is not None]
        if not keys:
            return _SLOT
        if len(keys) > 1:
            out.error(where, f"give the image once: {' and '.join(keys)} are both set")
            return None
        path = _path(item[keys[0]], f"{where}.{keys[0]}", base_dir, out)
        return ImagePart(path) if path else None
    ref = item.get("image_url")
    if isinstance(ref, dict):
        out.ignored(f"{where}.image_url", fields.unread_keys(ref, fields.IMAGE_URL_KEYS))
        ref = ref.get("url")
    path = _path(ref, f"{where}.image_url", base_dir, out)
    return ImagePart(path) if path else None


def _content(content: Any, where: str, base_dir: Path, out: _Collector) -> list[Part | _Slot]:
    if isinstance(content, str):
        part = out.text(content, where)
        return [part] if part else []
    if not isinstance(content, list):
        out.error(where, 'content must be a string or a list of {"type": ...} items')
        return []
    too_many = out.rules.too_many(len(content), "content items")
    if too_many:
        out.error(where, too_many)
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
    too_many = out.rules.too_many(len(values), "images")
    if too_many:
        out.error(key, too_many)
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
    too_many = out.rules.too_many(len(raw), "turns")
    if too_many:
        out.error("messages", too_many)
        return []
    turns = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            out.error(where, "a message must be an object with 'role' and 'content'")
            continue
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            out.error(f"{where}.role", f"must be one of {', '.join(ROLES)}; got {_preview(role)}")
        out.ignored(where, fields.unread_keys(m, fields.CHAT_MESSAGE_KEYS))
        if not fields.VIDEO_KEYS.isdisjoint(m):
            out.video(where, "a video field")
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
    too_many = out.rules.too_many(len(raw), "turns")
    if too_many:
        out.error("conversations", too_many)
        return []
    turns = []
    for i, m in enumerate(raw):
        where = f"conversations[{i}]"
        if not isinstance(m, dict):
            out.error(where, "a turn must be an object with 'from' and 'value'")
            continue
        role = SHAREGPT_ROLES.get(m["from"]) if isinstance(m.get("from"), str) else None
        if role is None:
            out.error(f"{where}.from", f"must be one of human, gpt, system; got {_preview(m.get('from'))}")
        out.ignored(where, fields.unread_keys(m, fields.SHAREGPT_TURN_KEYS))
        if not fields.VIDEO_KEYS.isdisjoint(m):
            out.video(where, "a video field")
        value = m.get("value")
        part = out.text(value, f"{where}.value") if isinstance(value, str) else None
        if not isinstance(value, str):
            out.error(f"{where}.value", f"must be a string, got {_preview(value)}")
        turns.append((where, role, [part] if part else []))
    _fill_slots(turns, _top_images(obj, base_dir, out), placeholders=True, out=out)
    return turns


def _check_turns(turns: list[tuple[str, str, list[Any]]], out: _Collector) -> None:
    for i, (where, role, parts) in enumerate(turns):
        if role == "system" and i > 0:
            out.error(where, "a system message may only come first")
        if role in ("system", "assistant") and any(isinstance(p, ImagePart) for p in parts):
            out.error(where, f"images may only appear in user turns, not in a {role} turn")
        text = "".join(p.text for p in parts if isinstance(p, TextPart)).strip()
        if role == "assistant" and not text:
            out.error(where, "assistant turn has no text")
        elif not text and not any(isinstance(p, ImagePart) for p in parts):
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


def _check_size(turns: list[tuple[str, str, list[Any]]], out: _Collector) -> None:
    """Text and image count against what max_length could ever hold, before any tokenizer sees the record."""
    rules = out.rules
    chars = [(sum(len(p.text) for p in parts if isinstance(p, TextPart)), where) for where, _, parts in turns]
    total = sum(n for n, _ in chars)
    if total > rules.max_text_chars:
        largest, where = max(chars)
        out.error(
            "",
            f"{total:,} characters of text ({largest:,} in {where}), over {rules.text_limit_field}: more "
            "than max_length tokens with any tokenizer, so it was not tokenized. Shorten the record, or raise "
            "data.max_text_chars (and data.max_length)",
        )
    too_many = rules.too_many(sum(isinstance(p, ImagePart) for _, _, parts in turns for p in parts), "images")
    if too_many:
        out.error("", too_many)


def _check_top_keys(obj: dict[str, Any], out: _Collector) -> None:
    if not fields.VIDEO_KEYS.isdisjoint(obj):
        out.video(next(k for k in obj if k in fields.VIDEO_KEYS), "a video field")
    out.ignored("", fields.unread_keys(obj, fields.RECORD_KEYS))


def parse_record(
    obj: Any, line: int, base_dir: Path, rules: RecordRules | None = None
) -> tuple[Record | None, list[Problem]]:
    """A parsed JSON value -> (Record or None when there are errors, every problem found). Never raises."""
    out = _Collector(line, rules or RecordRules.from_config())
    if not isinstance(obj, dict):
        kind = {list: "array", str: "string", type(None): "null"}.get(type(obj), type(obj).__name__)
        hint = " (one record per line: a JSON array file is not JSONL)" if isinstance(obj, list) else ""
        out.error("", f"a record must be a JSON object, got a JSON {kind}{hint}")
        return None, out.problems
    if "messages" in obj and "conversations" in obj:
        out.error("", "record has both 'messages' and 'conversations'; use one style per record")
        return None, out.problems
    if "messages" in obj:
        turns = _messages(obj, base_dir, out)
    elif "conversations" in obj:
        turns = _conversations(obj, base_dir, out)
    else:
        keys = ", ".join(ascii(k[:40]) for k in list(obj)[:20]) or "none"
        out.error(
            "",
            f"record needs 'messages' (chat style) or 'conversations' (LLaVA/ShareGPT style); keys: {keys}",
        )
        return None, out.problems
    _check_top_keys(obj, out)
    if not out.failed:
        _check_size(turns, out)
    if not out.failed:
        _check_turns(turns, out)
    if out.failed:
        return None, out.problems
    return Record(line, [Message(role, parts) for _, role, parts in turns]), out.problems
