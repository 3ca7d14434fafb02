"""Training records: the JSONL format (docs/DATA.md), its parsed form, and streaming readers.

One record per line, in either the chat `messages` style or the LLaVA/ShareGPT `conversations` style; both parse
to the same `Record`. Image paths are resolved against the JSONL file's folder and stored as absolute paths.
Parsing never raises on bad data: it returns `Problem`s (line, field, message) so every problem is reported at once.
Reading is bounded whatever the file holds (`limits`): an over-long line is skipped unread, deep nesting is refused
before parsing, and `read_records` keeps one file offset per record, reading each record again when asked for it.
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

from vlmtune.config.schema import DataConfig
from vlmtune.data.limits import (
    RecordRules,
    depth_message,
    json_depth,
    oversized_line_message,
    read_bounded_lines,
)
from vlmtune.errors import DataError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    path: Path
    """Absolute path of the image file (resolved against the JSONL file's folder)."""


Part = TextPart | ImagePart


@dataclass
class Message:
    role: Role
    parts: list[Part] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The message's text parts joined (images left out)."""
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))

    @property
    def images(self) -> list[Path]:
        return [p.path for p in self.parts if isinstance(p, ImagePart)]


@dataclass
class Record:
    line: int
    """1-based line number in the source JSONL file."""
    messages: list[Message]

    @property
    def images(self) -> list[Path]:
        """Image paths in conversation order (the order the processor must receive the images in)."""
        return [path for m in self.messages for path in m.images]

    def to_chat(self, with_paths: bool = False) -> list[dict[str, Any]]:
        """The HF chat-template conversation: `{"role", "content": [{"type": "image"}, {"type": "text", ...}]}`.

        With `with_paths`, image items carry `"path"` too (for `apply_chat_template(..., tokenize=True)`).
        """
        chat = []
        for m in self.messages:
            content: list[dict[str, Any]] = []
            for p in m.parts:
                if isinstance(p, ImagePart):
                    content.append(
                        {"type": "image", "path": str(p.path)} if with_paths else {"type": "image"}
                    )
                else:
                    content.append({"type": "text", "text": p.text})
            chat.append({"role": m.role, "content": content})
        return chat


@dataclass(frozen=True)
class Problem:
    line: int
    """1-based line number; 0 for problems with the whole file."""
    field: str
    """Where in the record, e.g. `messages[1].content[0].image`; empty for the whole line."""
    message: str
    severity: Severity = "error"
    code: str = ""
    """A machine-readable kind for problems counted together (`fields.IGNORED_CODE`); empty for most."""

    def format(self, path: Path | str | None = None) -> str:
        if self.line:
            where = f"{path}:{self.line}" if path is not None else f"line {self.line}"
        else:
            where = str(path) if path is not None else "file"
        fld = f" {self.field}:" if self.field else ""
        return printable(f"{where}: {self.severity}:{fld} {self.message}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_UNPRINTABLE = re.compile("[\ud800-\udfff\x00]")


def printable(text: str) -> str:
    """`text` with lone surrogates and NULs escaped, so printing it cannot fail (file names, keys from records)."""
    if _UNPRINTABLE.search(text) is None:
        return text
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)


def format_problems(path: Path | str, problems: list[Problem], limit: int = 50) -> str:
    """Errors first, then warnings, at most `limit` lines, and a count of the rest."""
    ordered = [p for p in problems if p.severity == "error"] + [p for p in problems if p.severity != "error"]
    lines = [p.format(path) for p in ordered[:limit]]
    if len(ordered) > limit:
        lines.append(f"... and {len(ordered) - limit} more problem(s)")
    return "\n".join(lines)


_TEXT_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}
_ARCHIVES = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "ZIP", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _file_kind_problem(head: bytes) -> str | None:
    for magic, name in _TEXT_BOMS.items():
        if head.startswith(magic):
            return f"the file is {name} text (byte-order mark {magic.hex(' ')}); re-save it as UTF-8"
    if len(head) == 4 and (head[1] == head[3] == 0 < head[0] or head[0] == head[2] == 0 < head[1]):
        return "the file looks like UTF-16 text (every other byte is 0); re-save it as UTF-8"
    for magic, name in _ARCHIVES.items():
        if head.startswith(magic):
            return f"the file is {name}-compressed; decompress it first (vlmtune reads plain JSONL)"
    return None


def _decode(number: int, raw: bytes) -> str | Problem:
    """A line as text. A UTF-8 byte-order mark is dropped at the start of any line (files joined with `cat`)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        message = f"line is not valid UTF-8 (byte {exc.start}: {exc.reason}); re-save the file as UTF-8"
        return Problem(number, "", message)


def _lines(path: Path, max_record_bytes: int) -> Iterator[tuple[int, int, str | Problem]]:
    """(line number, byte offset, text or Problem) for every non-blank line; file-level problems as line 0."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        yield 0, 0, Problem(0, "", f"cannot open the data file: {exc.strerror or exc}")
        return
    with fh:
        kind = _file_kind_problem(fh.peek(4)[:4])
        if kind:
            yield 0, 0, Problem(0, "", kind)
            return
        offset = 0
        for number, raw in read_bounded_lines(fh, max_record_bytes):
            if isinstance(raw, int):
                yield number, offset, Problem(number, "", oversized_line_message(raw, max_record_bytes))
                offset = fh.tell()
                continue
            start, offset = offset, offset + len(raw)
            text = _decode(number, raw)
            if isinstance(text, Problem) or text.strip():
                yield number, start, text.rstrip("\r\n") if isinstance(text, str) else text


def iter_lines(path: Path, max_record_bytes: int | None = None) -> Iterator[tuple[int, str | Problem]]:
    """Stream the non-blank lines of a JSONL file as text, or a Problem for a line that is not UTF-8 or is longer
    than `max_record_bytes` (default: DataConfig's), or for the whole file (line 0: not plain UTF-8 text).

    Lines are decoded one at a time, so one bad line does not hide the others and a huge file is never loaded.
    """
    limit = max_record_bytes or DataConfig().max_record_bytes
    for number, _, item in _lines(Path(path), limit):
        yield number, item


def _loads(text: str) -> tuple[Any, list[str]]:
    """json.loads that also returns the keys given twice in one object (JSON keeps the last one silently)."""
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) != len(items):
            seen: set[str] = set()
            duplicates.extend(k for k, _ in items if k in seen or seen.add(k))
        return obj

    return json.loads(text, object_pairs_hook=pairs), duplicates


def _json_hint(text: str) -> str:
    start = text.lstrip()[:1]
    if start == "[" or text.strip() == "{":
        return " (JSONL holds one complete JSON object per line; a JSON array or pretty-printed JSON is not JSONL)"
    return ""


def parse_line(
    text: str, line: int, base_dir: Path, rules: RecordRules | None = None
) -> tuple[Record | None, list[Problem]]:
    """Parse one JSONL line. Returns the record (None when there are errors) and every problem found."""
    rules = rules or RecordRules.from_config()
    depth = json_depth(text, rules.max_json_depth)
    if depth > rules.max_json_depth:
        return None, [Problem(line, "", depth_message(depth, rules.max_json_depth))]
    try:
        obj, duplicates = _loads(text)
    except json.JSONDecodeError as exc:
        return None, [Problem(line, "", f"invalid JSON: {exc.msg} at column {exc.colno}{_json_hint(text)}")]
    except (ValueError, RecursionError) as exc:  # e.g. a 5,000-digit number (Python's int conversion limit)
        why = (
            "a number with thousands of digits, over Python's limit for reading integers"
            if "integer string conversion" in str(exc) else f"{type(exc).__name__}: {str(exc)[:100]}"
        )
        return None, [Problem(line, "", f"invalid JSON value ({why}); fix the line")]
    if duplicates:
        return None, [
            Problem(line, key[:60], "key given twice in one JSON object: JSON keeps only the last value, so the "
                    "first would be ignored; keep one") for key in dict.fromkeys(duplicates)
        ]
    from vlmtune.data.record_formats import parse_record  # imported here: record_formats builds our types

    return parse_record(obj, line, base_dir, rules)


def _not_a_file(path: Path) -> str | None:
    try:
        if path.is_file():
            return None
        what = (
            "is a folder, not a file" if path.is_dir()
            else "is a broken symbolic link" if path.is_symlink()
            else "is not a regular file" if path.exists()
            else "does not exist"
        )
    except OSError as exc:
        what = f"cannot be read ({exc.strerror or exc})"
    return f"data file {what}; check data.train_path / data.val_path"


def _scan(
    path: Path, rules: RecordRules
) -> Iterator[tuple[int, int, Record | None, list[Problem]]]:
    problem = _not_a_file(path)
    if problem:
        yield 0, 0, None, [Problem(0, "", problem)]
        return
    base_dir = path.parent.absolute()
    seen = False
    for number, offset, item in _lines(path, rules.max_record_bytes):
        seen = True
        if isinstance(item, Problem):
            yield number, offset, None, [item]
        else:
            record, problems = parse_line(item, number, base_dir, rules)
            yield number, offset, record, problems
    if not seen:
        yield 0, 0, None, [Problem(0, "", "file is empty: it has no records (one JSON object per line)")]


def scan(
    path: Path | str, data_cfg: DataConfig | None = None, family: str | None = None
) -> Iterator[tuple[int, Record | None, list[Problem]]]:
    """Stream (line, record or None, problems) for every non-blank line; file-level problems come as line 0.

    `data_cfg` sets the limits and the ignored-field rule (default: DataConfig()); `family` names the model family
    in messages about what it cannot take (video)."""
    for number, _, record, problems in _scan(Path(path), RecordRules.from_config(data_cfg, family)):
        yield number, record, problems


def _raise(path: Path, problems: list[Problem]) -> None:
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise DataError(
            f"{len(errors)} problem(s) in {path} (run `vlmtune data check {path}`):\n"
            + format_problems(path, errors)
        )


class RecordFile(Sequence[Record]):
    """The records of a validated JSONL file, read from it again when asked for: memory holds one byte offset per
    record (8 bytes), not the records. The file must not change while in use (as with its images)."""

    def __init__(self, path: Path, rules: RecordRules, offsets: array, lines: array):
        self.path, self._rules, self._offsets, self._lines = path, rules, offsets, lines
        self._base_dir = path.parent.absolute()

    def __len__(self) -> int:
        return len(self._offsets)

    @overload
    def __getitem__(self, index: int) -> Record: ...
    @overload
    def __getitem__(self, index: slice) -> list[Record]: ...
    def __getitem__(self, index: int | slice) -> Record | list[Record]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        with open(self.path, "rb") as fh:
            return self._read(fh, range(len(self))[index])

    def __iter__(self) -> Iterator[Record]:
        with open(self.path, "rb") as fh:
            for i in range(len(self)):
                yield self._read(fh, i)

    def _read(self, fh: Any, i: int) -> Record:
        line, offset = self._lines[i], self._offsets[i]
        fh.seek(offset)
        raw = next(read_bounded_lines(fh, self._rules.max_record_bytes), (0, b""))[1]
        text = _decode(line, raw) if isinstance(raw, bytes) else None
        record = parse_line(text, line, self._base_dir, self._rules)[0] if isinstance(text, str) else None
        if record is None:
            raise DataError(
                f"{self.path}:{line}: the record no longer reads as it did when the file was checked; "
                "the file changed while in use. Run again once it is written."
            )
        return record


def read_records(path: Path | str, data_cfg: DataConfig | None = None) -> RecordFile:
    """The records of a valid file, as a sequence read from the file on demand; raises DataError listing every
    problem otherwise. `data_cfg`: limits and ignored-field rule (default: DataConfig()).

    Checks structure only; image files are opened later (`vlmtune data check` opens them all up front).
    """
    path = Path(path)
    rules = RecordRules.from_config(data_cfg)
    offsets, lines, problems = array("q"), array("q"), []
    for number, offset, record, found in _scan(path, rules):
        problems += [p for p in found if p.severity == "error"][:1000]
        if record is not None:
            offsets.append(offset)
            lines.append(number)
    _raise(path, problems)
    return RecordFile(path, rules, offsets, lines)


def iter_records(path: Path | str, data_cfg: DataConfig | None = None) -> Iterator[Record]:
    """Stream the records of a valid file. A first pass validates the whole file (raising DataError listing every
    problem), so no record is handed out from a file that turns out to be bad halfway through."""
    yield from read_records(path, data_cfg)
