"""Reading a JSON array file (`[{...}, {...}]`, LLaVA's, LLaMA-Factory's and Qwen's default) record by record.

The file is never parsed whole: a byte scanner finds where each top-level element starts and ends (brackets
outside strings, counted), so memory holds one element at a time (at most `data.max_record_bytes`; a longer one is
skipped unread, as a long JSONL line is) and `RecordFile` keeps one (offset, length) pair per record. Each element
is then parsed on its own, so a bad record is one error at its line; a broken array itself (a missing comma
between records, text after the closing bracket, a file that ends inside the array) is one error naming the line
and column, and the records after it are not read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

CHUNK = 1 << 20
_OUTSIDE = re.compile(rb'["\[\]{}\n]')
_INSIDE = re.compile(rb'["\\\n]')
_SPACE = b" \t\r\n"
_SCALAR_END = re.compile(rb"[,\]\s]")


@dataclass(frozen=True)
class Element:
    line: int
    """1-based line where the element starts."""
    column: int
    offset: int
    length: int
    data: bytes | None
    """The element's bytes; None when it is longer than the limit (skipped unread)."""
    depth: int
    """Deepest nesting of brackets inside it (the element's own bracket counts 1)."""


@dataclass(frozen=True)
class Broken:
    """The array's own structure is broken at (line, column); nothing after it is read."""

    line: int
    column: int
    message: str


def starts_as_array(head: bytes) -> bool:
    """Whether a file whose first bytes are `head` is a JSON array (first non-blank character `[`)."""
    return head.lstrip(b"\xef\xbb\xbf").lstrip(_SPACE)[:1] == b"["


class _Reader:
    """Bytes of a file with position, line and column, read in chunks."""

    def __init__(self, fh: BinaryIO):
        self.fh, self.buf, self.pos, self.base, self.line, self.line_start = fh, b"", 0, 0, 1, 0

    def fill(self) -> bool:
        chunk = self.fh.read(CHUNK)
        if not chunk:
            return False
        self.base += self.pos
        self.buf, self.pos = self.buf[self.pos:] + chunk, 0
        return True

    @property
    def offset(self) -> int:
        return self.base + self.pos

    @property
    def column(self) -> int:
        return self.offset - self.line_start + 1

    def newline_at(self, index: int) -> None:
        self.line += 1
        self.line_start = self.base + index + 1

    def skip_space(self) -> bytes:
        """The next non-blank byte (not consumed), or b'' at the end of the file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _SPACE:
                if self.buf[self.pos] == 10:
                    self.newline_at(self.pos)
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos:self.pos + 1]
            if not self.fill():
                return b""


def _show(byte: bytes) -> str:
    return "the end of the file" if not byte else f"{byte.decode('latin-1')!r}"


def scan_array(fh: BinaryIO, max_bytes: int) -> Iterator[Element | Broken]:
    """The top-level elements of the JSON array in `fh`, then a `Broken` if the array is malformed (and stop)."""
    r = _Reader(fh)
    if r.skip_space() == b"\xef":
        r.fill()
        if r.buf[r.pos:r.pos + 3] == b"\xef\xbb\xbf":
            r.pos += 3
    if r.skip_space() != b"[":
        yield Broken(r.line, r.column, "expected '[' at the start of a JSON array")
        return
    r.pos += 1
    index = 0
    while True:
        nxt = r.skip_space()
        if nxt == b"]" and index == 0:
            r.pos += 1
            break
        if nxt in (b"", b"]", b","):
            trailing = " (a comma after the last record, which JSON does not allow)" if nxt == b"]" else ""
            yield Broken(r.line, r.column, f"expected record {index + 1} of the array, found {_show(nxt)}{trailing}")
            return
        element = _element(r, max_bytes)
        if isinstance(element, Broken):
            yield element
            return
        yield element
        index += 1
        nxt = r.skip_space()
        if nxt == b"]":
            r.pos += 1
            break
        if nxt != b",":
            yield Broken(r.line, r.column, f"expected ',' or ']' after record {index} of the array (it starts "
                         f"at line {element.line}), found {_show(nxt)}: a missing comma, or a record that is "
                         "not valid JSON")
            return
        r.pos += 1
    nxt = r.skip_space()
    if nxt:
        yield Broken(r.line, r.column, f"text after the array's closing ']' (found {_show(nxt)}); a data file "
                     "holds one JSON array, or one JSON object per line (JSONL)")


def _element(r: _Reader, max_bytes: int) -> Element | Broken:
    """Consume one element, keeping its bytes while within `max_bytes`."""
    start, line, column, depth, deepest = r.offset, r.line, r.column, 0, 0
    kept: list[bytes] | None = []
    size = 0
    first = r.buf[r.pos:r.pos + 1]
    if first not in (b"{", b"[", b'"'):  # a number, true, false, null: up to the next , ] or blank
        match = _SCALAR_END.search(r.buf, r.pos)
        while match is None and r.offset - start <= max_bytes and r.fill():
            match = _SCALAR_END.search(r.buf, r.pos)
        end = match.start() if match else len(r.buf)
        data = r.buf[r.pos:end]
        r.pos = end
        return Element(line, column, start, len(data), data, 0)
    in_string = False
    while True:
        pattern = _INSIDE if in_string else _OUTSIDE
        match = pattern.search(r.buf, r.pos)
        if match is None:
            piece = r.buf[r.pos:]
            size += len(piece)
            if kept is not None:
                kept.append(piece)
                if size > max_bytes:
                    kept = None
            r.pos = len(r.buf)
            if not r.fill():
                where = "inside a string of" if in_string else "inside"
                deep = f", nested {deepest:,} levels deep" if deepest > 1 else ""
                return Broken(line, r.column, f"the file ends {where} the record starting at line {line}{deep}: "
                              "the JSON array is not closed (a truncated file?)")
            continue
        i = match.start()
        c = r.buf[i]
        step = i + 1
        if c == 10:
            r.newline_at(i)
        elif in_string:
            if c == 34:  # "
                in_string = False
            elif c == 92:  # backslash: skip the escaped byte
                if step >= len(r.buf):
                    piece = r.buf[r.pos:step]
                    size += len(piece)
                    if kept is not None:
                        kept.append(piece)
                    r.pos = step
                    if not r.fill():
                        return Broken(r.line, r.column, "the file ends inside a string: the JSON array is not "
                                      "closed (a truncated file?)")
                    step = r.pos
                if r.buf[step:step + 1] == b"\n":
                    r.newline_at(step)
                step += 1
        elif c == 34:
            in_string = True
            if depth == 0:  # a string element
                depth = -1
        elif c in (91, 123):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        else:  # ] }
            depth -= 1
        piece = r.buf[r.pos:step]
        size += len(piece)
        if kept is not None:
            kept.append(piece)
            if size > max_bytes:
                kept = None
        r.pos = step
        if depth == 0 or (depth == -1 and not in_string):
            return Element(line, column, start, size, b"".join(kept) if kept is not None else None, deepest)
