"""Parsing records into `Record` (see docs/DATA.md), collecting every problem.

- chat style: `{"messages": [{"role", "content": str | [{"type": "text"|"image"|"image_url", ...}]}]}`,
  optionally with top-level `"images": [...]` that fill path-less `{"type": "image"}` items (TRL style) or, when
  there are none, `<image>` placeholders in the text (LLaMA-Factory / ms-swift style). Items may carry base64
  (`base64`, `data:` URLs) and LLaMA-Factory v1's `value`; a message may carry `loss` (ms-swift) or `loss_weight`
  (LLaMA-Factory v1) to leave an assistant turn untrained.
- LLaVA/ShareGPT style: `{"image": str | [str], "conversations": [{"from": "human"|"gpt"|"system", "value"}]}`,
  where `<image>` placeholders mark where the images go; with images but no placeholder, the images go at the start
  of the first human turn, as LLaVA does. Qwen-VL's `Picture 1: <img>path</img>` tags are images too.
- A top-level `system` column is the system prompt. TRL `prompt`/`completion`, ms-swift `query`/`response`/`history`
  and alpaca `instruction`/`input`/`output` records are read by `record_styles`, into the same turns.

Every key is accounted for (`fields`): read, metadata, or reported (an error, or a warning with
`data.on_ignored_field=warn`); video is refused. Text and paths are checked against `RecordRules` (`limits`).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from vlmtune.data import fields
from vlmtune.data.embedded import EmbeddedImage
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
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DATA_URL = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)
_QWEN_IMG = re.compile(r"(?:Picture \d+: ?)?<img>(.*?)</img>\n?")


class _Slot:
    """An image whose path comes from the record's top-level image list."""


_SLOT = _Slot()
Image = Path | EmbeddedImage


class _IndexedSlot(_Slot):
    """A path-less image item that names its image by position (`index`, as Hugging Face data sets made for TRL do)."""

    def __init__(self, index: int, where: str):
        self.index, self.where = index, where


@dataclass
class Turn:
    """A turn while parsing: where it is in the record, its role, its parts (slots not yet filled), trained."""

    where: str
    role: str | None
    parts: list[Part | _Slot] = field(default_factory=list)
    train: bool = True


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


def resolve_image_path(raw: str, base_dir: Path, image_root: Path | None = None) -> Path:
    """Absolute path of an image reference; `file://` URIs are accepted. A relative path is looked for under
    `image_root` first, then under `base_dir` (the data file's folder); found in neither, the error names both.
    Raises ValueError for other URLs and for paths no file can have (too long, NUL, lone surrogate, `~user` of an
    unknown user)."""
    if raw.startswith("file://"):
        raw = unquote(urlparse(raw).path)
    elif _URL.match(raw) or raw.startswith("data:"):
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
    resolved = os.path.normpath(path if path.is_absolute() else (image_root or base_dir) / path)
    problem = path_length_problem(resolved)
    if problem:
        raise ValueError(problem)
    if image_root is None or path.is_absolute() or os.path.lexists(resolved):
        return Path(resolved)
    beside = os.path.normpath(base_dir / path)
    if os.path.lexists(beside):
        return Path(beside)
    raise ValueError(
        f"image file not found: {ascii(raw[:200])} is neither under data.image_root ({resolved}) nor beside the "
        f"data file ({beside}); fix data.image_root or the path"
    )


def decode_base64(raw: str, origin: str) -> EmbeddedImage:
    """The image in a `data:` URL or plain base64 text. Raises ValueError naming what is wrong."""
    found = _DATA_URL.match(raw)
    if raw[:5].lower() == "data:":
        if found is None or ";base64" not in found.group(2).lower():
            raise ValueError("a data: URL must be base64 ('data:image/png;base64,...'); re-encode the image")
        mime = found.group(1).lower()
        if mime and not mime.startswith("image"):
            raise ValueError(f"the data: URL holds {mime!r}, not an image")
        raw = raw[found.end():]
    try:
        data = base64.b64decode("".join(raw.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not valid base64 ({exc}); give the image as base64 text or a file path") from exc
    if not data:
        raise ValueError("the base64 image is empty")
    return EmbeddedImage(data, origin)


def _path(value: Any, where: str, base_dir: Path, out: _Collector, encoded: bool = False) -> Image | None:
    """An image reference: a path, a `data:` URL, base64 text (`encoded`), or a Hugging Face Image cell
    (`{"bytes": ..., "path": ...}`, bytes first)."""
    origin = f"line {out.line} {where}"
    if isinstance(value, dict) and ("bytes" in value or "path" in value) and value.keys() <= {"bytes", "path"}:
        if isinstance(value.get("bytes"), bytes) and value["bytes"]:
            return EmbeddedImage(value["bytes"], origin)
        value, where = value.get("path"), f"{where}.path"
    if isinstance(value, bytes) and value:
        return EmbeddedImage(value, origin)
    if not isinstance(value, str) or not value.strip():
        out.error(where, f"must be a non-empty file path string, got {_preview(value)}")
        return None
    try:
        if encoded or value[:5].lower() == "data:":
            return decode_base64(value, origin)
        return resolve_image_path(value, base_dir, out.rules.image_root)
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
    given = [k for k in item if k in fields.ITEM_KEYS[kind] and k not in ("type", "index") and item[k] is not None]
    if len(given) > 1:
        out.error(where, f"give the {kind} once: {' and '.join(given)} are all set")
        return None
    if kind == "text":
        key = given[0] if given else "text"
        if not isinstance(item.get(key), str):
            out.error(f"{where}.{key}", "a text item needs a string 'text' (or LLaMA-Factory v1's 'value')")
            return None
        return out.text(item[key], f"{where}.{key}")
    if not given:
        if kind == "image":
            index = item.get("index")
            if index is None:
                return _SLOT
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                out.error(f"{where}.index", f"must be the image's position in 'images' (0, 1, ...), got {_preview(index)}")
                return None
            return _IndexedSlot(index, f"{where}.index")
        out.error(where, "an image_url item needs 'image_url' (or LLaMA-Factory v1's 'value')")
        return None
    key = given[0]
    if item.get("index") is not None:
        out.error(where, f"give the image once: {key} and index are both set")
        return None
    ref = item[key]
    if key == "image_url" and isinstance(ref, dict):
        out.ignored(f"{where}.image_url", fields.unread_keys(ref, fields.IMAGE_URL_KEYS))
        ref, key = ref.get("url"), "image_url.url"
    path = _path(ref, f"{where}.{key}", base_dir, out, encoded=key == "base64")
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


def top_images(obj: dict[str, Any], base_dir: Path, out: _Collector) -> tuple[str, list[Image | None]] | None:
    """The record-level image list (None items: invalid paths, already reported)."""
    keys = [k for k in ("image", "images") if obj.get(k) is not None]
    if len(keys) > 1:
        out.error("images", "give either 'image' or 'images', not both")
    if not keys:
        return None
    key, value = keys[0], obj[keys[0]]
    values = value if isinstance(value, list) else [value]
    if not isinstance(value, (list, str, dict, bytes)):
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


def fill_slots(turns: list[Turn], top: tuple[str, list[Image | None]] | None, placeholders: bool,
               out: _Collector) -> None:
    """Give every slot its image from the top-level list, in order; check the counts match."""
    key, images = top if top else ("images", [])
    if placeholders:
        for turn in turns:
            turn.parts[:] = _split_placeholders(turn.parts)
    slots = sum(isinstance(p, _Slot) for turn in turns for p in turn.parts)
    if slots == 0 and images:
        first_user = next((turn.parts for turn in turns if turn.role == "user"), None)
        if first_user is not None:
            first_user[:0] = [_SLOT] * len(images)
            slots = len(images)
    if slots != len(images):
        what = f"'{IMAGE_PLACEHOLDER}' placeholder(s)" if placeholders else "path-less image item(s)"
        out.error(key, f"{len(images)} image(s) listed but {slots} {what} in the conversation; they must match")
        return
    position = 0
    for turn in turns:
        for p in turn.parts:
            if isinstance(p, _IndexedSlot) and p.index != position:
                out.error(p.where, f"image item index {p.index}, but it is image {position} in conversation order; "
                          "vlmtune gives images in conversation order: reorder the 'images' list")
            position += isinstance(p, _Slot)
    it = iter(images)
    for turn in turns:
        filled = [(ImagePart(path) if (path := next(it)) else None) if isinstance(p, _Slot) else p
                  for p in turn.parts]
        turn.parts[:] = [p for p in filled if p is not None]


def _train_flag(m: dict[str, Any], where: str, role: Any, out: _Collector) -> bool:
    """`loss` (ms-swift: true / false / null) or `loss_weight` (LLaMA-Factory v1: 1.0 / 0.0) on a turn."""
    given = [k for k in ("loss", "loss_weight") if m.get(k) is not None]
    if not given:
        return True
    if len(given) > 1:
        out.error(where, "give either 'loss' or 'loss_weight', not both")
        return True
    key, value = given[0], m[given[0]]
    if isinstance(value, bool) or (key == "loss_weight" and value in (0, 1)):
        train = bool(value)
    else:
        out.error(f"{where}.{key}", f"must be {'true or false' if key == 'loss' else '0 or 1'} (a turn is trained "
                  f"on or not; per-token weights are not supported), got {_preview(value)}")
        return True
    if train and role != "assistant":
        out.error(f"{where}.{key}", "only assistant turns are trained on; remove the key from this turn")
    return train


def message_turns(raw: Any, key: str, base_dir: Path, out: _Collector) -> list[Turn]:
    """A list of chat messages (`messages`, TRL's `prompt` / `completion`) as turns."""
    if not isinstance(raw, list) or not raw:
        out.error(key, 'must be a non-empty list of {"role", "content"} objects')
        return []
    too_many = out.rules.too_many(len(raw), "turns")
    if too_many:
        out.error(key, too_many)
        return []
    turns = []
    for i, m in enumerate(raw):
        where = f"{key}[{i}]"
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
        train = _train_flag(m, where, role, out)
        turns.append(Turn(where, role, _content(m.get("content"), f"{where}.content", base_dir, out), train))
    return turns


def place_images(obj: dict[str, Any], turns: list[Turn], base_dir: Path, out: _Collector) -> None:
    """Top-level images into path-less image items, else into `<image>` placeholders, else the first user turn."""
    top = top_images(obj, base_dir, out)
    has_slots = any(isinstance(p, _Slot) for turn in turns for p in turn.parts)
    if top is not None:
        fill_slots(turns, top, placeholders=not has_slots, out=out)
        return
    for turn in turns:
        if any(isinstance(p, _Slot) for p in turn.parts):
            out.error(
                f"{turn.where}.content",
                "image item without a path: give 'image': 'path/to/file' (or 'base64'), "
                "or list the paths in the record's top-level 'images'",
            )
        if any(isinstance(p, TextPart) and IMAGE_PLACEHOLDER in p.text for p in turn.parts):
            out.warn(
                f"{turn.where}.content",
                f"'{IMAGE_PLACEHOLDER}' in text is kept as literal text in a record "
                "without top-level 'images'; use an image item instead",
            )


def _qwen_tags(turn: Turn, base_dir: Path, out: _Collector) -> None:
    """Qwen-VL's `Picture 1: <img>path</img>` inside a turn's text: an image there."""
    parts: list[Part | _Slot] = []
    for part in turn.parts:
        if not isinstance(part, TextPart) or "<img>" not in part.text:
            parts.append(part)
            continue
        pos = 0
        for found in _QWEN_IMG.finditer(part.text):
            if part.text[pos:found.start()].strip():
                parts.append(TextPart(part.text[pos:found.start()].strip()))
            path = _path(found.group(1), f"{turn.where}.value <img>", base_dir, out)
            if path:
                parts.append(ImagePart(path))
            pos = found.end()
        if part.text[pos:].strip():
            parts.append(TextPart(part.text[pos:].strip()))
    turn.parts[:] = parts


def _conversations(obj: dict[str, Any], base_dir: Path, out: _Collector) -> list[Turn]:
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
        turn = Turn(where, role, [part] if part else [], _train_flag(m, where, role, out))
        _qwen_tags(turn, base_dir, out)
        turns.append(turn)
    fill_slots(turns, top_images(obj, base_dir, out), placeholders=True, out=out)
    return turns


def add_system(obj: dict[str, Any], turns: list[Turn], out: _Collector, key: str = "system") -> None:
    """A top-level system column (ShareGPT, ms-swift, alpaca) as the first turn."""
    value = obj.get(key)
    if value is None or value == "":
        return
    if not isinstance(value, str):
        out.error(key, f"the system prompt must be a string, got {_preview(value)}")
        return
    if turns and turns[0].role == "system":
        out.error(key, f"the record has a system prompt in '{key}' and a system turn; give it once")
        return
    part = out.text(value, key)
    if part:
        turns.insert(0, Turn(key, "system", [part]))


def _check_turns(turns: list[Turn], out: _Collector) -> None:
    for i, turn in enumerate(turns):
        where, role, parts = turn.where, turn.role, turn.parts
        if role == "system" and i > 0:
            out.error(where, "a system message may only come first")
        if role in ("system", "assistant") and any(isinstance(p, ImagePart) for p in parts):
            out.error(where, f"images may only appear in user turns, not in a {role} turn")
        text = "".join(p.text for p in parts if isinstance(p, TextPart)).strip()
        if role == "assistant" and not text:
            out.error(where, "assistant turn has no text")
        elif not text and not any(isinstance(p, ImagePart) for p in parts):
            out.error(where, "turn has no text and no image")
    dialogue = [turn for turn in turns if turn.role != "system"]
    roles = [turn.role for turn in dialogue]
    if roles and roles[0] == "assistant":
        out.error(dialogue[0].where, "the conversation starts with an assistant turn; it must start with a user turn")
    if "assistant" not in roles:
        out.error("", "no assistant turn: there is nothing to learn from this record")
    elif roles[-1] != "assistant":
        out.error(
            turns[-1].where,
            "the conversation ends on a user turn, which nothing learns from; "
            "end with an assistant turn or remove the last turn",
        )
    elif not any(turn.train for turn in dialogue if turn.role == "assistant"):
        out.error("", "every assistant turn has loss: false (or loss_weight: 0), so nothing is learnt from this "
                  "record; train at least one, or drop the record")


def _check_size(turns: list[Turn], out: _Collector) -> None:
    """Text and image count against what max_length could ever hold, before any tokenizer sees the record."""
    rules = out.rules
    chars = [(sum(len(p.text) for p in turn.parts if isinstance(p, TextPart)), turn.where) for turn in turns]
    total = sum(n for n, _ in chars)
    if total > rules.max_text_chars:
        largest, where = max(chars)
        out.error(
            "",
            f"{total:,} characters of text ({largest:,} in {where}), over {rules.text_limit_field}: more "
            "than max_length tokens with any tokenizer, so it was not tokenized. Shorten the record, or raise "
            "data.max_text_chars (and data.max_length)",
        )
    too_many = rules.too_many(sum(isinstance(p, ImagePart) for turn in turns for p in turn.parts), "images")
    if too_many:
        out.error("", too_many)


def _check_top_keys(obj: dict[str, Any], known: frozenset[str], out: _Collector) -> None:
    if not fields.VIDEO_KEYS.isdisjoint(obj):
        out.video(next(k for k in obj if k in fields.VIDEO_KEYS), "a video field")
    out.ignored("", fields.unread_keys(obj, known | fields.METADATA_KEYS))


def _chat(obj: dict[str, Any], base_dir: Path, out: _Collector) -> list[Turn]:
    turns = message_turns(obj["messages"], "messages", base_dir, out)
    place_images(obj, turns, base_dir, out)
    add_system(obj, turns, out)
    return turns


def _sharegpt(obj: dict[str, Any], base_dir: Path, out: _Collector) -> list[Turn]:
    turns = _conversations(obj, base_dir, out)
    add_system(obj, turns, out)
    return turns


def parse_record(
    obj: Any, line: int, base_dir: Path, rules: RecordRules | None = None
) -> tuple[Record | None, list[Problem]]:
    """A parsed JSON value -> (Record or None when there are errors, every problem found). Never raises."""
    from vlmtune.data.record_styles import STYLES

    out = _Collector(line, rules or RecordRules.from_config())
    if not isinstance(obj, dict):
        kind = {list: "array", str: "string", type(None): "null"}.get(type(obj), type(obj).__name__)
        hint = " (one record per line: a JSON array file is not JSONL)" if isinstance(obj, list) else ""
        out.error("", f"a record must be a JSON object, got a JSON {kind}{hint}")
        return None, out.problems
    styles = [style for style in STYLES if style.key in obj]
    if len(styles) > 1:
        out.error("", f"record has both {ascii(styles[0].key)} and {ascii(styles[1].key)}: they are two styles "
                  f"({styles[0].name} and {styles[1].name}); use one per record")
        return None, out.problems
    if not styles:
        keys = ", ".join(ascii(k[:40]) for k in list(obj)[:20]) or "none"
        out.error("", "record needs 'messages' (chat style) or 'conversations' (LLaVA/ShareGPT style), or "
                  f"prompt/completion (TRL), query/response (ms-swift), instruction/output (alpaca); keys: {keys}")
        return None, out.problems
    style = styles[0]
    turns = style.parse(obj, base_dir, out)
    _check_top_keys(obj, style.keys, out)
    if not out.failed:
        _check_size(turns, out)
    if not out.failed:
        _check_turns(turns, out)
    if out.failed:
        return None, out.problems
    return Record(line, [Message(t.role, t.parts, t.train) for t in turns]), out.problems  # type: ignore[arg-type]
