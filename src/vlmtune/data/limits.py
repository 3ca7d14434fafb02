"""Limits that keep reading a data file bounded in memory and time whatever it holds (docs/DATA.md, "Limits").

- A line is read with `readline(max_record_bytes + 1)`: a longer line is skipped in 1 MiB pieces up to its newline
  and reported with its size, never held whole (a 2 GB line costs ~5 MB of memory, not 2 GB).
- JSON nesting is measured on the text before `json.loads` recurses into it.
- Text is limited per record before any tokenizer sees it (`RecordRules.max_text_chars`), image paths to what the
  operating system can open, images per record to `max_length` (each image takes at least one token).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import BinaryIO

from vlmtune.config.schema import DataConfig

TEXT_CHARS_PER_TOKEN_BOUND = 64
"""`max_text_chars` defaults to this x max_length. Text needs at least chars / (characters per token) tokens, and
tokenizers average 3-5 characters per token on English and code, about 1 on CJK and 0.3 on scripts a byte-level
vocabulary splits into bytes; only degenerate text (thousands of one repeated character) averages more than 16.
So a record over 64 x max_length characters is over max_length tokens with any tokenizer, and the tokenizer's own
memory (per token) stays within ~3 x 64 x max_length tokens."""

PATH_MAX_BYTES = 4096
"""Longest path Linux opens (PATH_MAX); a longer one fails with ENAMETOOLONG."""
NAME_MAX_BYTES = 255
"""Longest file or folder name (NAME_MAX) on Linux and macOS file systems."""

SKIP_CHUNK = 1 << 20

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


@dataclass(frozen=True)
class RecordRules:
    """What parsing enforces, from a DataConfig (and the model family, when known, for messages)."""

    max_record_bytes: int
    max_json_depth: int
    max_text_chars: int
    max_length: int
    on_ignored_field: str
    family: str | None = None
    text_limit_field: str = "data.max_text_chars"
    image_root: Path | None = None
    """data.image_root, absolute: where relative image paths are looked for first."""
    columns: tuple[tuple[str, str], ...] = ()
    """data.columns as (vlmtune's key, the record's key) pairs."""

    @classmethod
    def from_config(cls, cfg: DataConfig | None = None, family: str | None = None) -> RecordRules:
        cfg = cfg or DataConfig()
        if cfg.max_text_chars is not None:
            chars, where = cfg.max_text_chars, f"data.max_text_chars={cfg.max_text_chars:,}"
        else:
            chars = TEXT_CHARS_PER_TOKEN_BOUND * cfg.max_length
            where = f"{chars:,} = {TEXT_CHARS_PER_TOKEN_BOUND} x data.max_length={cfg.max_length}"
        return cls(
            max_record_bytes=cfg.max_record_bytes,
            max_json_depth=cfg.max_json_depth,
            max_text_chars=chars,
            max_length=cfg.max_length,
            on_ignored_field=cfg.on_ignored_field,
            family=family,
            text_limit_field=where,
            image_root=cfg.image_root.expanduser().absolute() if cfg.image_root is not None else None,
            columns=tuple((cfg.columns or {}).items()),
        )

    def too_many(self, count: int, what: str) -> str | None:
        """Turns, content items and images each take at least one token: more than max_length cannot fit."""
        if count <= self.max_length:
            return None
        return (
            f"{count:,} {what}, more than data.max_length={self.max_length:,} tokens can hold (each takes at least "
            "one token); split the record or raise data.max_length"
        )

    @property
    def video_message(self) -> str:
        where = f"for {self.family}" if self.family else "by vlmtune yet"
        return f"video is not supported {where}; remove the video, or give frames as images"


def read_bounded_lines(fh: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | int]]:
    """(line number, the line's bytes) for each line, or (line number, its size) for a line longer than
    `max_bytes` (newline excluded), which is skipped without being held."""
    number = 0
    while True:
        raw = fh.readline(max_bytes + 1)
        if not raw:
            return
        number += 1
        if len(raw) <= max_bytes or raw.endswith(b"\n") and len(raw) == max_bytes + 1:
            yield number, raw
            continue
        size = len(raw)
        del raw
        while True:
            chunk = fh.readline(SKIP_CHUNK)
            size += len(chunk)
            if not chunk or chunk.endswith(b"\n"):
                break
        yield number, size - (1 if chunk.endswith(b"\n") else 0)


def oversized_line_message(size: int, max_bytes: int) -> str:
    return (
        f"the line is {size:,} bytes, over data.max_record_bytes={max_bytes:,}; it was skipped unread. "
        "Split the record (a record is one conversation), or raise data.max_record_bytes"
    )


def json_depth(text: str, limit: int) -> int:
    """Nesting depth of arrays and objects in JSON text, or a number just past `limit` when cheaper to know only
    that. Brackets inside strings do not count."""
    if text.count("[") + text.count("{") <= limit:
        return 0
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(_STEP[c] for c in brackets), default=0)


def depth_message(depth: int, limit: int) -> str:
    return (
        f"JSON nested {depth} levels deep, over data.max_json_depth={limit} (a chat record needs 5); "
        "it was not parsed. Flatten the record, or raise data.max_json_depth"
    )


def path_text_problem(raw: str) -> str | None:
    """Why an image path as written can name no file (a NUL, a lone surrogate), or None."""
    if "\x00" in raw:
        return "the path contains a NUL character, which no file name can hold"
    if has_lone_surrogate(raw):
        return "the path contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is not text"
    return None


def path_length_problem(resolved: str) -> str | None:
    """Why the operating system would refuse to open an absolute path for its length (ENAMETOOLONG), or None."""
    if len(resolved) * 4 <= NAME_MAX_BYTES:  # UTF-8 takes at most 4 bytes per character
        return None
    size = len(resolved.encode("utf-8"))
    if size > PATH_MAX_BYTES:
        return (
            f"the path is {size:,} bytes long, over the {PATH_MAX_BYTES:,} the operating system opens; "
            "move the image to a shorter path"
        )
    longest = max(len(name.encode("utf-8")) for name in resolved.split("/"))
    if longest > NAME_MAX_BYTES:
        return (
            f"a file or folder name in the path is {longest:,} bytes long, over the {NAME_MAX_BYTES} a file "
            "system allows; rename it"
        )
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def has_lone_surrogate(text: str) -> bool:
    """JSON's `\\ud83d\\ude00` pairs decode to one character; what is left in the surrogate range is unpaired and
    cannot be encoded as UTF-8 (a tokenizer, a file name or the terminal would fail on it later)."""
    return _SURROGATE.search(text) is not None


def surrogate_message(text: str) -> str:
    found = _SURROGATE.search(text)
    at = found.start() if found else 0
    return (
        f"the text contains a lone UTF-16 surrogate ({text[at]!r} at character {at}), which is not valid Unicode "
        "and cannot be tokenized; fix the \\u escape in the JSON (surrogates come in pairs)"
    )
