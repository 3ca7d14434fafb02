"""Reading a config file with bounded memory and time, every problem a ConfigError naming the file and line.

A config holds a few hundred values, 4-5 levels deep, in a few kilobytes. The limits below are far above that and
far below what hurts: the size is checked before the file is read, the encoding before it is parsed, and YAML
nesting and aliases while the document is composed, before any alias is expanded (PyYAML shares an aliased block;
copying or validating the result expands it, so a 1 KB "billion laughs" file would become gigabytes).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from vlmtune.errors import ConfigError

MAX_BYTES = 1 << 20
"""Largest config file read (1 MiB)."""
MAX_DEPTH = 32
"""Deepest nesting of sections and lists (the schema needs 4)."""
MAX_VALUES = 10_000
"""Most values in one document, counted with every YAML alias expanded."""

SAVE_AS = "save it as UTF-8 YAML or JSON"


class Refused(Exception):
    """A limit or encoding problem found while reading; `line` is 1-based where known."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.message, self.line = message, line

    def text(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


def read_config_file(path: str | Path) -> Any:
    """The parsed content of a YAML (or, by suffix, JSON) config file."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".jsonlines", ".ndjson"):
        raise ConfigError([f"this is a JSONL data file, not a config: give it as --train-data {shown_path(path)} "
                           "(data.train_path) and the config separately"], source=shown_path(path))
    try:
        text = decode(_read_bytes(path))
        if path.suffix.lower() == ".json":
            return parse_json(text)
        return parse_yaml(text)
    except Refused as exc:
        raise ConfigError([exc.text()], source=shown_path(path)) from None


def shown_path(path: str | Path) -> str:
    """The path as messages show it: a 5000-character path keeps its start and end."""
    text = str(path)
    return text if len(text) <= 200 else f"{text[:100]}...{text[-60:]}"


def _read_bytes(path: Path) -> bytes:
    """At most MAX_BYTES + 1 bytes; a pipe (`<(...)`) is read like a file, a folder or a huge file is refused."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise Refused("is a folder, not a config file: give the .yaml/.yml/.json file inside it")
        if stat.S_ISREG(info.st_mode) and info.st_size > MAX_BYTES:
            raise Refused(_too_large(info.st_size))
        with open(path, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise Refused(_os_problem(path, exc)) from None
    if len(data) > MAX_BYTES:
        raise Refused(_too_large(None))
    return data


def _too_large(size: int | None) -> str:
    shown = f"{size:,} bytes" if size is not None else "more than 1 MiB"
    return (f"the file is {shown}; a config file is limited to 1 MiB (a config is a few hundred lines). Is this "
            "the right file? A data set goes in data.train_path")


def _os_problem(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "config file not found (give an existing .yaml/.yml/.json file)"
    if exc.errno == errno.ENAMETOOLONG:
        return (f"the path is too long for the file system ({len(str(path)):,} characters; a file or folder name "
                "can have at most 255 bytes)")
    if exc.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a folder"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "cannot be read: permission denied (check the file's permissions)"
    if exc.errno == errno.EISDIR:
        return "is a folder, not a config file: give the .yaml/.yml/.json file inside it"
    return f"cannot be read: {exc.strerror or exc}"


_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (WebP, WAV)"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (or .docx / .xlsx)"),
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"BZh", "bzip2-compressed data"),
    (b"\xfd7zXZ", "xz-compressed data"),
    (b"\x7fELF", "an executable program"),
    (b"SQLite format 3", "an SQLite database"),
    (b"\x80\x02", "a Python pickle"),
    (b"\x80\x04", "a Python pickle"),
    (b"\x80\x05", "a Python pickle"),
)
_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


def decode(data: bytes) -> str:
    """UTF-8 text (a UTF-8 byte-order mark is dropped); anything else is refused with what it looks like."""
    for magic, what in _MAGIC:
        if data.startswith(magic):
            raise Refused(f"this is {what}, not a text config; {SAVE_AS}")
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            raise Refused(f"the file is {encoding} text (byte-order mark {bom.hex(' ').upper()}); {SAVE_AS}")
    nul = data.find(b"\x00")
    if nul >= 0:
        head = data[:512]
        if head[1::2].count(0) > len(head) // 4 or head[0::2].count(0) > len(head) // 4:
            raise Refused(f"the file looks like UTF-16 text without a byte-order mark (every other byte is 0); "
                          f"{SAVE_AS}")
        raise Refused(f"binary data, not a text config (a NUL byte at offset {nul}); {SAVE_AS}",
                      data.count(b"\n", 0, nul) + 1)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        head = data[:4096]
        controls = sum(1 for b in head if b < 0x20 and b not in b"\t\n\r\f")
        if controls > len(head) // 20:
            raise Refused(f"binary data, not a text config; {SAVE_AS}") from None
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        raise Refused(
            f"byte 0x{data[exc.start]:02X} at column {exc.start - line_start + 1} is not UTF-8 (the file may be "
            f"saved as Latin-1 or Windows-1252); {SAVE_AS}",
            data.count(b"\n", 0, exc.start) + 1,
        ) from None


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts, while composing, each node's size with aliases expanded and the nesting depth, and
    refuses duplicate keys; constructor errors (a 5000-digit integer, the date 2024-13-01) name their line."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._expanded = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))
            if size is None:
                raise Refused(f"the alias *{event.anchor} is inside the block it refers to (a structure that "
                              "contains itself); write the values out", line)
            self._count(size, line)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise Refused(f"nested more than {MAX_DEPTH} levels deep (a config needs 4); is this the right file?",
                          line)
        self._count(1, line)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._sizes[id(node)] = 1 + sum(self._sizes.get(id(child), 1) for child in _children(node))
        if isinstance(node, MappingNode):
            _refuse_duplicate_keys(node)
        return node

    def _count(self, size: int, line: int) -> None:
        self._expanded += size
        if self._expanded > MAX_VALUES:
            raise Refused(f"the document holds more than {MAX_VALUES:,} values, counting each alias (*name) as "
                          "the block it repeats (a config has a few hundred); refused before expanding it. Is this "
                          "the right file? Write repeated blocks out, with fewer aliases", line)

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(None, None, f"cannot read {node.value!r:.60}: {_plain(exc)}",
                                                    node.start_mark) from None


def _plain(exc: Exception) -> str:
    """Python's message for a 5000-digit number suggests sys.set_int_max_str_digits(); say what the file has."""
    text = str(exc)
    return "a number with more than 4300 digits" if "integer string conversion" in text else text


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _refuse_duplicate_keys(node: MappingNode) -> None:
    seen: dict[str, int] = {}
    for key, _ in node.value:
        if not isinstance(key, ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        line = key.start_mark.line + 1
        if key.value in seen:
            raise Refused(f"the key '{key.value:.60}' appears twice in one section (lines {seen[key.value]} and "
                          f"{line}); the second would silently replace the first: merge them", line)
        seen[key.value] = line


def parse_yaml(text: str) -> Any:
    try:
        loader = _BoundedLoader(text)  # the reader checks for unprintable characters here
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise Refused(*_yaml_problem(exc, text)) from None


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[str, int | None]:
    """(one-line message, line) from PyYAML's multi-line error text."""
    if isinstance(exc, yaml.reader.ReaderError):
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        return (f"unacceptable character {char} ({exc.reason}); remove it or {SAVE_AS}",
                text.count("\n", 0, exc.position) + 1)
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        parts = [p for p in (exc.context, exc.problem) if p]
        message = "cannot parse: " + ", ".join(" ".join(p.split()) for p in parts)
        return message, mark.line + 1 if mark else None
    return f"cannot parse: {' '.join(str(exc).split())}", None


_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def parse_json(text: str) -> Any:
    depth = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise Refused(f"nested more than {MAX_DEPTH} levels deep (a config needs 4); is this the right "
                              "file?", text.count("\n", 0, match.start()) + 1)
        elif token in "]}":
            depth -= 1
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise Refused(f"cannot parse: {exc.msg} (column {exc.colno})", exc.lineno) from None
    except ValueError as exc:  # a 5000-digit number; duplicate keys
        raise Refused(f"cannot parse: {_plain(exc)}") from None
    check_size(data)
    return data


def parse_value(raw: str) -> Any:
    """A dotted override's value read as YAML (`32`, `[q_proj,v_proj]`, `null`) within the same limits; text that
    is not valid YAML (or a date that does not exist) stays the string it is."""
    try:
        loader = _BoundedLoader(raw)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError:
        return raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key '{key:.60}' appears twice in one object; the second would silently replace "
                             "the first: merge them")
        out[key] = value
    return out


def check_size(data: Any) -> None:
    """Refuse a parsed structure deeper than MAX_DEPTH or larger than MAX_VALUES (walked without recursion)."""
    count, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise Refused(f"nested more than {MAX_DEPTH} levels deep (a config needs 4)")
        if count > MAX_VALUES:
            raise Refused(f"more than {MAX_VALUES:,} values (a config has a few hundred)")
        if isinstance(value, dict):
            stack += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]
