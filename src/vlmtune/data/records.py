"""Training records: the data files vlmtune reads (docs/DATA.md), their parsed form, and streaming readers.

One reader for every input, its format detected per file (`sources.detect`): JSONL (one record per line), a JSON
array, parquet / arrow files written by Hugging Face `datasets` (`hf_files`), and an entry of LLaMA-Factory's
`dataset_info.json` (`dataset_info`). Each record, in any of the styles `record_formats` reads (chat `messages`,
ShareGPT/LLaVA `conversations`, TRL `prompt`/`completion`, ms-swift `query`/`response`, alpaca), parses to the same
`Record`. Image paths are resolved against `data.image_root`, else the data file's folder, and stored as absolute
paths; embedded image bytes become `EmbeddedImage`s. Parsing never raises on bad data: it returns `Problem`s (line,
field, message) so every problem is reported at once. Reading is bounded whatever the file holds (`limits`): an
over-long record is skipped unread, deep nesting is refused before parsing, and `read_records` keeps one file
offset (a row, for parquet / arrow) per record, reading each record again when asked for it.
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from vlmtune.config.schema import DataConfig
from vlmtune.data.limits import (
    RecordRules,
    depth_message,
    json_depth,
    oversized_line_message,
    read_bounded_lines,
)
from vlmtune.errors import DataError

if TYPE_CHECKING:
    from vlmtune.data.dataset_info import ColumnMap
    from vlmtune.data.embedded import EmbeddedImage
    from vlmtune.data.sources import Source

FILE_CODE = "file"
"""`Problem.code` of a problem with the file at a line (a broken JSON array) rather than with a record there."""
Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    path: Path | EmbeddedImage
    """Absolute path of the image file (resolved against data.image_root or the data file's folder), or the image's
    bytes where the data embeds them (`data.images` opens either)."""


Part = TextPart | ImagePart


@dataclass
class Message:
    role: Role
    parts: list[Part] = field(default_factory=list)
    train: bool = True
    """For an assistant turn, whether it is trained on (labelled); `loss: false` (ms-swift), `loss_weight: 0`
    (LLaMA-Factory) and TRL's prompt turns set it off. Other turns are never trained on."""

    @property
    def text(self) -> str:
        """The message's text parts joined (images left out)."""
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))

    @property
    def images(self) -> list[Path | EmbeddedImage]:
        return [p.path for p in self.parts if isinstance(p, ImagePart)]


@dataclass
class Record:
    line: int
    """1-based line number in the source file where the record starts (the row, for parquet / arrow files)."""
    messages: list[Message]

    @property
    def images(self) -> list[Path | EmbeddedImage]:
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
                        {"type": "image", "path": str(p.path)}
                        if with_paths and isinstance(p.path, Path) else {"type": "image"}
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
    text: str, line: int, base_dir: Path, rules: RecordRules | None = None, columns: ColumnMap | None = None,
    column: int | None = None,
) -> tuple[Record | None, list[Problem]]:
    """Parse one record's JSON text (a JSONL line, or an element of a JSON array starting at `line`, `column`).
    Returns the record (None when there are errors) and every problem found. `columns`: a dataset_info.json
    entry's mapping."""
    rules = rules or RecordRules.from_config()
    depth = json_depth(text, rules.max_json_depth)
    if depth > rules.max_json_depth:
        return None, [Problem(line, "", depth_message(depth, rules.max_json_depth))]
    try:
        obj, duplicates = _loads(text)
    except json.JSONDecodeError as exc:
        if column is not None:  # a record of a JSON array: where in the file
            col = exc.colno + (column - 1 if exc.lineno == 1 else 0)
            at = f"line {line + exc.lineno - 1} column {col}"
            return None, [Problem(line, "", f"invalid JSON in the record starting here: {exc.msg} at {at}")]
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

    if columns is not None:
        obj = columns.apply(obj)
    elif rules.columns:
        from vlmtune.data.dataset_info import rename

        obj = rename(obj, rules.columns)
    return parse_record(obj, line, base_dir, rules)


def scan(
    path: Path | str, data_cfg: DataConfig | None = None, family: str | None = None
) -> Iterator[tuple[int, Record | None, list[Problem]]]:
    """Stream (line, record or None, problems) for every record; file-level problems come as line 0.

    `data_cfg` sets the limits, the image root and the ignored-field rule (default: DataConfig()); `family` names
    the model family in messages about what it cannot take (video)."""
    from vlmtune.data.sources import scan_source

    for number, _, _, record, problems in scan_source(Path(path), RecordRules.from_config(data_cfg, family)):
        yield number, record, problems


def _raise(path: Path, problems: list[Problem]) -> None:
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise DataError(
            f"{len(errors)} problem(s) in {path} (run `vlmtune data check {path}`):\n"
            + format_problems(path, errors)
        )


class RecordFile(Sequence[Record]):
    """The records of a validated data file, read from it again when asked for: memory holds one byte offset (and
    length, for a JSON array; a row number, for parquet / arrow) per record, not the records. The file must not
    change while in use (as with its images)."""

    def __init__(self, path: Path, rules: RecordRules, offsets: array, lines: array,
                 lengths: array | None = None, source: Source | None = None):
        from vlmtune.data.sources import Source

        self.path, self._rules, self._offsets, self._lines = path, rules, offsets, lines
        self._lengths = lengths if lengths is not None else array("q", bytes(8 * len(offsets)))
        self._source = source or Source(path, "jsonl")
        self._base_dir = self._source.base_dir
        self._rows: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_rows": None}  # an open parquet / arrow reader stays in its process

    def __len__(self) -> int:
        return len(self._offsets)

    @overload
    def __getitem__(self, index: int) -> Record: ...
    @overload
    def __getitem__(self, index: slice) -> list[Record]: ...
    def __getitem__(self, index: int | slice) -> Record | list[Record]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if self._source.kind == "hf":
            return self._read(None, range(len(self))[index])
        with open(self._source.file, "rb") as fh:
            return self._read(fh, range(len(self))[index])

    def __iter__(self) -> Iterator[Record]:
        if self._source.kind == "hf":
            for i in range(len(self)):
                yield self._read(None, i)
            return
        with open(self._source.file, "rb") as fh:
            for i in range(len(self)):
                yield self._read(fh, i)

    def _read(self, fh: Any, i: int) -> Record:
        line, offset = self._lines[i], self._offsets[i]
        record: Record | None = None
        if self._source.kind == "hf":
            from vlmtune.data import hf_files

            if self._rows is None:
                self._rows = hf_files.Rows(self._source.file)
            record = hf_files.parse_row(self._rows, offset, self._source, self._rules)[0]
        elif self._source.kind == "json-array":
            from vlmtune.data.sources import parse_element

            fh.seek(offset)
            record = parse_element(fh.read(self._lengths[i]), line, 1, self._lengths[i], self._source,
                                    self._rules)[0]
        else:
            fh.seek(offset)
            raw = next(read_bounded_lines(fh, self._rules.max_record_bytes), (0, b""))[1]
            text = _decode(line, raw) if isinstance(raw, bytes) else None
            if isinstance(text, str):
                record = parse_line(text, line, self._base_dir, self._rules, self._source.columns)[0]
        if record is None:
            raise DataError(
                f"{self.path}:{line}: the record no longer reads as it did when the file was checked; "
                "the file changed while in use. Run again once it is written."
            )
        return record


def read_records(path: Path | str, data_cfg: DataConfig | None = None) -> RecordFile:
    """The records of a valid file, as a sequence read from the file on demand; raises DataError listing every
    problem otherwise. `data_cfg`: limits, image root and ignored-field rule (default: DataConfig()).

    Checks structure only; image files are opened later (`vlmtune data check` opens them all up front).
    """
    from vlmtune.data.sources import Source, open_source, scan_source

    path = Path(path)
    rules = RecordRules.from_config(data_cfg)
    offsets, lengths, lines, problems = array("q"), array("q"), array("q"), []
    for number, offset, length, record, found in scan_source(path, rules):
        problems += [p for p in found if p.severity == "error"][:1000]
        if record is not None:
            offsets.append(offset)
            lengths.append(length)
            lines.append(number)
    _raise(path, problems)
    source = open_source(path)
    assert isinstance(source, Source)  # scan_source reported a Problem otherwise
    return RecordFile(path, rules, offsets, lines, lengths, source)


def iter_records(path: Path | str, data_cfg: DataConfig | None = None) -> Iterator[Record]:
    """Stream the records of a valid file. A first pass validates the whole file (raising DataError listing every
    problem), so no record is handed out from a file that turns out to be bad halfway through."""
    yield from read_records(path, data_cfg)
