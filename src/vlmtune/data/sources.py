"""Which reader a data input needs, detected per file, and the per-format record scans (docs/DATA.md).

`open_source(path)` tells JSONL, a JSON array (`json_array`), parquet / arrow data and `hf://datasets/...`
(`hf_files`) and a `dataset_info.json#NAME` entry (`dataset_info`) apart, from the file and not only its name;
`scan_source` yields (line, offset, length, record or None, problems) per record, which `records.scan`,
`records.read_records` (keeping the offsets) and `data check` build on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vlmtune.data.dataset_info import ColumnMap
from vlmtune.data.limits import RecordRules, oversized_line_message
from vlmtune.data.records import FILE_CODE, Problem, Record, _decode, _lines, parse_line


def _not_a_file(path: Path) -> str | None:
    try:
        if path.is_file():
            return None
        what = (
            "is a folder, not a file (a folder is read only when it holds parquet / arrow files)" if path.is_dir()
            else "is a broken symbolic link" if path.is_symlink()
            else "is not a regular file" if path.exists()
            else "does not exist"
        )
    except OSError as exc:
        what = f"cannot be read ({exc.strerror or exc})"
    return f"data file {what}; check data.train_path / data.val_path"


Kind = Literal["jsonl", "json-array", "hf"]


@dataclass(frozen=True)
class Source:
    """A data file as it is read: the file, its format, and a dataset_info.json entry's column mapping."""

    file: Path
    kind: Kind
    columns: ColumnMap | None = None

    @property
    def base_dir(self) -> Path:
        """Relative image paths resolve here (after data.image_root): the data file's folder (or the folder read)."""
        from vlmtune.data.hf_files import split_of

        folder = split_of(self.file)[0] if self.kind == "hf" else self.file
        return (folder if folder.is_dir() else folder.parent).absolute()


def open_source(path: Path) -> Source | Problem:
    """Which reader `path` needs, detected from the file (not only its name); a Problem (line 0) when none can."""
    from vlmtune.data import dataset_info, hf_files

    columns = None
    hub = hf_files.hub_folder(path)
    if isinstance(hub, str):
        return Problem(0, "", hub)
    if hub is not None:
        return Source(hub, "hf")
    if dataset_info.names_entry(path):
        found = dataset_info.resolve(path)
        if isinstance(found, str):
            return Problem(0, "", found)
        path, columns = found
    if hf_files.is_hf_input(path):
        return Source(path, "hf", columns)
    problem = _not_a_file(path)
    if problem:
        return Problem(0, "", problem)
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        return Problem(0, "", f"cannot open the data file: {exc.strerror or exc}")
    from vlmtune.data.json_array import starts_as_array

    first_line = head.lstrip(b"\xef\xbb\xbf").lstrip(b" \t\r\n").split(b"\n", 1)[0].strip()
    if first_line == b"{" and columns is None:
        return Problem(0, "", "the file is one JSON object spread over several lines (pretty-printed), not records: "
                       "vlmtune reads JSONL (one record per line) or a JSON array of records ([{...}, {...}]). If the "
                       "object wraps the records (e.g. {\"data\": [...]}), save that list alone as the file")
    return Source(path, "json-array" if starts_as_array(head) else "jsonl", columns)


def _scan_jsonl(source: Source, rules: RecordRules) -> Iterator[tuple[int, int, int, Record | None, list[Problem]]]:
    seen = False
    for number, offset, item in _lines(source.file, rules.max_record_bytes):
        seen = True
        if isinstance(item, Problem):
            yield number, offset, 0, None, [item]
        else:
            record, problems = parse_line(item, number, source.base_dir, rules, source.columns)
            yield number, offset, 0, record, problems
    if not seen:
        yield 0, 0, 0, None, [Problem(0, "", "file is empty: it has no records (one JSON object per line)")]


def parse_element(data: bytes | None, line: int, column: int, length: int, source: Source,
                   rules: RecordRules) -> tuple[Record | None, list[Problem]]:
    if data is None:
        return None, [Problem(line, "", oversized_line_message(length, rules.max_record_bytes).replace(
            "the line is", "the record is"))]
    text = _decode(line, data)
    if isinstance(text, Problem):
        return None, [Problem(line, "", text.message.replace("line is", "record is"))]
    return parse_line(text, line, source.base_dir, rules, source.columns, column)


def _scan_array(source: Source, rules: RecordRules) -> Iterator[tuple[int, int, int, Record | None, list[Problem]]]:
    from vlmtune.data.json_array import Broken, scan_array

    count = 0
    with open(source.file, "rb") as fh:
        for item in scan_array(fh, rules.max_record_bytes):
            if isinstance(item, Broken):
                yield item.line, 0, 0, None, [Problem(item.line, "", (
                    f"the file is a JSON array (it starts with '['), and it is malformed at line {item.line} "
                    f"column {item.column}: {item.message}. {count} record(s) before it were read; fix the file "
                    "there (`python -m json.tool FILE` shows the first JSON error), or write one record per line "
                    "(JSONL)"), code=FILE_CODE)]
                return
            count += 1
            record, problems = parse_element(item.data, item.line, item.column, item.length, source, rules)
            yield item.line, item.offset, item.length, record, problems
    if count == 0:
        yield 0, 0, 0, None, [Problem(0, "", "the JSON array is empty: it has no records")]


def scan_source(path: Path, rules: RecordRules) -> Iterator[tuple[int, int, int, Record | None, list[Problem]]]:
    """(line, offset, length, record or None, problems) per record; file-level problems as line 0."""
    source = open_source(path)
    if isinstance(source, Problem):
        yield 0, 0, 0, None, [source]
        return
    if source.kind == "jsonl":
        yield from _scan_jsonl(source, rules)
    elif source.kind == "json-array":
        yield from _scan_array(source, rules)
    else:
        from vlmtune.data import hf_files

        yield from hf_files.scan(source, rules)
