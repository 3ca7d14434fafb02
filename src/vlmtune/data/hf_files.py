"""Hugging Face `datasets` files as training data: parquet and arrow files, and the folders that hold them.

What `datasets` writes and reads: a parquet file (`Dataset.to_parquet`, the hub's `data/train-00000-of-00001.parquet`),
an arrow file (the hub cache's and `save_to_disk`'s `data-00000-of-00001.arrow`), a folder of either (a
`load_dataset`-style folder, or a `save_to_disk` folder with its `state.json`), and `FOLDER#SPLIT` for one split of
a folder that holds several, and `hf://datasets/ORG/NAME[@REVISION][#SPLIT]` for a data set in the Hugging Face hub
cache (`huggingface_hub.snapshot_download`, the standard path: offline it reads the cache, online it downloads).
Each row is one record, in any style `record_styles` reads; an `Image` column holds
`{"bytes", "path"}` structs, read as embedded images (nothing is written to disk) or as paths.

Reading is lazy and bounded: pyarrow reads parquet one row group at a time (the last one read is kept) and
memory-maps arrow files, so a 100,000-record data set is neither decoded nor held up front; `RecordFile` keeps the
row number per record. pyarrow is the optional `datasets` extra (`pip install 'vlmtune[datasets]'`), imported only
here and only when such a file is read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.errors import require

if TYPE_CHECKING:
    from vlmtune.data.limits import RecordRules
    from vlmtune.data.records import Problem, Record
    from vlmtune.data.sources import Source

SUFFIXES = (".parquet", ".arrow")
_MAGIC = (b"PAR1", b"ARROW1", b"\xff\xff\xff\xff")
_SPLIT = re.compile(r"(?:^|[/_-])(train|test|validation|valid|val|dev)(?=[-_./]|$)")
BATCH_ROWS = 64


class NotData(ValueError):
    """The path names no readable set of files (the message says why)."""


_HUB = re.compile(r"^hf:/+datasets/([^/@#]+/[^/@#]+)(?:@([^#]+))?(?:#(.+))?$")


def hub_folder(path: Path) -> Path | str | None:
    """`hf://datasets/ORG/NAME[@REVISION][#SPLIT]` -> its snapshot folder (with `#SPLIT`), or why not (a message);
    None for any other path. Offline (HF_HUB_OFFLINE=1) only the local cache is read."""
    found = _HUB.match(str(path))
    if found is None:
        return None
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision, split = found.groups()
    try:
        folder = snapshot_download(repo, repo_type="dataset", revision=revision,
                                   local_files_only=constants.HF_HUB_OFFLINE)
    except LocalEntryNotFoundError:
        return (f"the data set {repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub is "
                f"not reachable (or HF_HUB_OFFLINE=1); download it first: hf download {repo} --repo-type dataset")
    except (HfHubHTTPError, OSError, ValueError) as exc:
        return f"cannot get the data set {repo} from the Hugging Face hub: {exc}"
    return Path(f"{folder}#{split}") if split else Path(folder)


def split_of(path: Path) -> tuple[Path, str | None]:
    """`FOLDER#SPLIT` -> (FOLDER, SPLIT); other paths -> (path, None)."""
    head, sep, tail = str(path).rpartition("#")
    if sep and tail and Path(head).is_dir():
        return Path(head), tail
    return path, None


def _looks_like(path: Path) -> bool:
    if path.suffix in SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(6).startswith(_MAGIC)
    except OSError:
        return False


def is_hf_input(path: Path) -> bool:
    """A parquet / arrow file, a folder holding some, or `FOLDER#SPLIT`."""
    folder, split = split_of(path)
    if split is not None:
        return True
    if path.is_file():
        return _looks_like(path)
    return path.is_dir() and any(p.suffix in SUFFIXES for p in path.rglob("*"))


def data_files(path: Path) -> list[Path] | str:
    """The files of `path` in order, or why they cannot be read (a message)."""
    folder, split = split_of(path)
    if folder.is_file():
        return [folder]
    state = folder / "state.json"
    if state.is_file():  # save_to_disk
        try:
            listed = json.loads(state.read_text(encoding="utf-8"))["_data_files"]
            return [folder / item["filename"] for item in listed]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{state} is not a datasets save_to_disk state file ({type(exc).__name__}: {exc})"
    files = sorted(p for p in folder.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    if not files:
        return f"{folder} holds no parquet or arrow files"
    splits: dict[str, list[Path]] = {}
    for file in files:
        found = _SPLIT.search(str(file.relative_to(folder)))
        splits.setdefault(found.group(1) if found else "", []).append(file)
    if split is not None:
        if split not in splits:
            return f"{folder} has no split {split!r}; it has: {', '.join(sorted(s or '(unnamed)' for s in splits))}"
        return splits[split]
    if len(splits) > 1:
        names = sorted(s for s in splits if s)
        return (f"{folder} holds several splits ({', '.join(names)}); name one as {folder}#{names[0]} "
                "(data.train_path / data.val_path)")
    return files


class Rows:
    """Random access to the rows of a list of parquet / arrow files, read lazily; `len()` is the total."""

    def __init__(self, path: Path):
        self.pa = require("pyarrow", "datasets", f"Reading parquet / arrow data ({path})")
        import pyarrow.parquet as pq

        self.pq = pq
        files = data_files(path)
        if isinstance(files, str):
            raise NotData(files)
        self.files, self.starts = files, [0]
        self._cache: tuple[Any, Any, Any] = (None, None, None)
        self._parts: list[Any] = []
        for file in files:
            part = self._open(file)
            self._parts.append(part)
            self.starts.append(self.starts[-1] + part[1])

    def _open(self, file: Path) -> tuple[Any, int]:
        with open(file, "rb") as fh:
            magic = fh.read(6)
        if magic.startswith(b"PAR1") or file.suffix == ".parquet":
            parquet = self.pq.ParquetFile(file)
            return parquet, parquet.metadata.num_rows
        source = self.pa.memory_map(str(file))
        reader = (self.pa.ipc.open_file(source) if magic == b"ARROW1" else self.pa.ipc.open_stream(source))
        table = reader.read_all()  # memory-mapped: pages are read when a row is
        return table, table.num_rows

    def __len__(self) -> int:
        return self.starts[-1]

    def _locate(self, row: int) -> tuple[int, int]:
        from bisect import bisect_right

        k = bisect_right(self.starts, row) - 1
        return k, row - self.starts[k]

    def row(self, row: int) -> Any:
        k, i = self._locate(row)
        part = self._parts[k][0]
        if not hasattr(part, "metadata") or not hasattr(part, "read_row_group"):
            return part.slice(i, 1).to_pylist()[0]
        meta = part.metadata
        start = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if i < start + n:
                if self._cache[:2] != (k, g):
                    self._cache = (k, g, part.read_row_group(g))
                return self._cache[2].slice(i - start, 1).to_pylist()[0]
            start += n
        raise IndexError(row)

    def iter_rows(self) -> Iterator[Any]:
        """Every row in order. Parquet is read one row group at a time (`ParquetFile.iter_batches` over a whole file
        keeps what it has read: its memory grew by ~1 GB a minute on 100,000 rows of images)."""
        for part, _ in self._parts:
            if hasattr(part, "read_row_group"):
                tables: Iterator[Any] = (part.read_row_group(g) for g in range(part.metadata.num_row_groups))
            else:
                tables = iter([part])
            for table in tables:
                for batch in table.to_batches(max_chunksize=BATCH_ROWS):
                    yield from batch.to_pylist()


_PANDAS_INDEX = re.compile(r"^__index_level_\d+__$")


def _row(value: dict[str, Any]) -> dict[str, Any]:
    """A row as the record it was made from: pandas' saved index columns (`__index_level_0__`, written by
    `DataFrame.to_parquet`) are not data and are left out; nulls are dropped (`_drop_nulls`)."""
    return {k: _drop_nulls(v) for k, v in value.items() if v is not None and not _PANDAS_INDEX.match(k)}


def _drop_nulls(value: Any) -> Any:
    """Arrow structs have every field in every row (null where a record had none): drop the nulls, so a row reads
    as the JSON record it was made from."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def parse_row(rows: Rows, row: int, source: Source, rules: RecordRules,
              value: Any = None) -> tuple[Record | None, list[Problem]]:
    from vlmtune.data.record_formats import parse_record

    obj = _row(rows.row(row) if value is None else value)
    if source.columns is not None:
        obj = source.columns.apply(obj)
    elif rules.columns:
        from vlmtune.data.dataset_info import rename

        obj = rename(obj, rules.columns)
    return parse_record(obj, row + 1, source.base_dir, rules)


def scan(source: Source, rules: RecordRules) -> Iterator[tuple[int, int, int, Record | None, list[Problem]]]:
    """(row number from 1, row, 0, record or None, problems) per row; a file-level problem as line 0."""
    from vlmtune.data.records import Problem

    try:
        rows = Rows(source.file)
    except NotData as exc:
        yield 0, 0, 0, None, [Problem(0, "", str(exc))]
        return
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid / ArrowIOError
        yield 0, 0, 0, None, [Problem(0, "", f"not a readable parquet / arrow file ({exc}); re-write it, e.g. "
                                      "with datasets' Dataset.to_parquet")]
        return
    if len(rows) == 0:
        yield 0, 0, 0, None, [Problem(0, "", "the data set is empty: it has no rows")]
        return
    done = 0
    try:
        for row, value in enumerate(rows.iter_rows()):
            record, problems = parse_row(rows, row, source, rules, value)
            done += 1
            yield row + 1, row, 0, record, problems
    except (OSError, ValueError) as exc:
        yield done + 1, 0, 0, None, [Problem(done + 1, "", f"cannot read the rows from here on ({exc}): the file "
                                             "is damaged; re-write it")]
