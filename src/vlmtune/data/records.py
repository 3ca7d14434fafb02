"""Training records: the JSONL format (docs/DATA.md), its parsed form, and streaming readers.

One record per line, in either the chat `messages` style or the LLaVA/ShareGPT `conversations` style; both parse
to the same `Record`. Image paths are resolved against the JSONL file's folder and stored as absolute paths.
Parsing never raises on bad data: it returns `Problem`s (line, field, message) so every problem is reported at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

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

    def format(self, path: Path | str | None = None) -> str:
        if self.line:
            where = f"{path}:{self.line}" if path is not None else f"line {self.line}"
        else:
            where = str(path) if path is not None else "file"
        fld = f" {self.field}:" if self.field else ""
        return f"{where}: {self.severity}:{fld} {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def format_problems(path: Path | str, problems: list[Problem], limit: int = 50) -> str:
    """Errors first, then warnings, at most `limit` lines, and a count of the rest."""
    ordered = [p for p in problems if p.severity == "error"] + [p for p in problems if p.severity != "error"]
    lines = [p.format(path) for p in ordered[:limit]]
    if len(ordered) > limit:
        lines.append(f"... and {len(ordered) - limit} more problem(s)")
    return "\n".join(lines)


def iter_lines(path: Path) -> Iterator[tuple[int, str | Problem]]:
    """Stream the non-blank lines of a JSONL file as text, or a Problem for a line that is not UTF-8.

    Lines are decoded one at a time, so one bad line does not hide the others and a huge file is never loaded.
    """
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                message = (
                    f"line is not valid UTF-8 (byte {exc.start}: {exc.reason}); re-save the file as UTF-8"
                )
                yield number, Problem(number, "", message)
                continue
            if text.strip():
                yield number, text.rstrip("\r\n")


def parse_line(text: str, line: int, base_dir: Path) -> tuple[Record | None, list[Problem]]:
    """Parse one JSONL line. Returns the record (None when there are errors) and every problem found."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [Problem(line, "", f"invalid JSON: {exc.msg} at column {exc.colno}")]
    from vlmtune.data.record_formats import parse_record  # imported here: record_formats builds our types

    return parse_record(obj, line, base_dir)


def scan(path: Path | str) -> Iterator[tuple[int, Record | None, list[Problem]]]:
    """Stream (line, record or None, problems) for every non-blank line; file-level problems come as line 0."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        yield 0, None, [Problem(0, "", f"data file {what}; check data.train_path / data.val_path")]
        return
    base_dir = path.parent.absolute()
    seen = False
    for number, item in iter_lines(path):
        seen = True
        if isinstance(item, Problem):
            yield number, None, [item]
        else:
            record, problems = parse_line(item, number, base_dir)
            yield number, record, problems
    if not seen:
        yield 0, None, [Problem(0, "", "file is empty: it has no records (one JSON object per line)")]


def _raise(path: Path, problems: list[Problem]) -> None:
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise DataError(
            f"{len(errors)} problem(s) in {path} (run `vlmtune data check {path}`):\n"
            + format_problems(path, errors)
        )


def read_records(path: Path | str) -> list[Record]:
    """All records of a valid file; raises DataError listing every problem otherwise.

    Checks structure only; image files are opened later (`vlmtune data check` opens them all up front).
    """
    path = Path(path)
    records, problems = [], []
    for _, record, found in scan(path):
        problems += found
        if record is not None:
            records.append(record)
    _raise(path, problems)
    return records


def iter_records(path: Path | str) -> Iterator[Record]:
    """Stream the records of a valid file. A first pass validates the whole file (raising DataError listing every
    problem), so no record is handed out from a file that turns out to be bad halfway through."""
    path = Path(path)
    problems = [p for _, _, found in scan(path) for p in found if p.severity == "error"]
    _raise(path, problems)
    for _, record, _ in scan(path):
        if record is not None:
            yield record
