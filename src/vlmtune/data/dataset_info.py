"""Column mappings: LLaMA-Factory's `dataset_info.json` entries, and `data.columns` (`rename`) for anything else.

LLaMA-Factory's `dataset_info.json` is read by data set name: `data.train_path: data/dataset_info.json#mllm_demo`.

An entry names a local file (`file_name`, relative to the dataset_info.json folder, which is also where its
relative image paths resolve, as LLaMA-Factory's default `media_dir` has it), its `formatting` (`alpaca`, the
default, or `sharegpt`), and optionally `columns` (which record key holds what) and, for sharegpt, `tags` (the role
and content keys and the role names). `ColumnMap.apply` renames each record's keys to the styles vlmtune reads
(`conversations` with `from` / `value`, or alpaca's `instruction` / `input` / `output`); a column the entry does
not map keeps its name and so is read or reported as any other key. Hub entries (`hf_hub_url`, ...), preference
data (`ranking`) and keys vlmtune does not read are errors naming the entry and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtune.config.schema import RECORD_COLUMNS, TURN_COLUMNS

INFO_NAME = "dataset_info.json"
MAX_INFO_BYTES = 16 << 20
_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_ENTRY_KEYS = {"file_name", "formatting", "columns", "tags", "ranking", "split"}
_COLUMNS = {
    "sharegpt": {"messages": "conversations", "system": None, "tools": None, "images": None, "videos": None,
                 "audios": None},
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None,
               "tools": None, "images": None, "videos": None, "audios": None},
}
_ALPACA_KEYS = {"prompt": "instruction", "query": "input", "response": "output"}
_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
         "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}


@dataclass(frozen=True)
class ColumnMap:
    """How one dataset_info.json entry's records map onto vlmtune's keys."""

    formatting: str
    columns: dict[str, str] = field(default_factory=dict)
    """vlmtune's (LLaMA-Factory's) column name -> the record's key."""
    tags: dict[str, str] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.formatting, tuple(self.columns.items()), tuple(self.tags.items())))

    def apply(self, obj: Any) -> Any:
        if not isinstance(obj, dict):
            return obj
        rest, out = dict(obj), {}
        for name, key in self.columns.items():
            if key in rest:
                target = _ALPACA_KEYS.get(name, name) if self.formatting == "alpaca" else name
                out["conversations" if target == "messages" else target] = rest.pop(key)
        if isinstance(out.get("conversations"), list):
            out["conversations"] = [self._turn(m) for m in out["conversations"]]
        return {**out, **rest}

    def _turn(self, m: Any) -> Any:
        if not isinstance(m, dict):
            return m
        tags = self.tags
        roles = {tags["user_tag"]: "human", tags["assistant_tag"]: "gpt", tags["system_tag"]: "system"}
        rest = {k: v for k, v in m.items() if k not in (tags["role_tag"], tags["content_tag"])}
        turn = dict(rest)
        if tags["role_tag"] in m:
            role = m[tags["role_tag"]]
            turn["from"] = roles.get(role, role) if isinstance(role, str) else role
        if tags["content_tag"] in m:
            turn["value"] = m[tags["content_tag"]]
        return turn


def rename(obj: Any, columns: tuple[tuple[str, str], ...]) -> Any:
    """A record with data.columns applied: each record key given becomes vlmtune's; in each turn, too."""
    if not isinstance(obj, dict):
        return obj
    top = {theirs: ours for ours, theirs in columns if ours in RECORD_COLUMNS}
    inner = {theirs: ours for ours, theirs in columns if ours in TURN_COLUMNS}
    out = {top.get(k, k): v for k, v in obj.items()}
    if inner:
        for key in ("messages", "conversations"):
            if isinstance(out.get(key), list):
                out[key] = [{inner.get(k, k): v for k, v in m.items()} if isinstance(m, dict) else m
                            for m in out[key]]
    return out


def names_entry(path: Path) -> bool:
    """Whether `path` is a dataset_info.json, with or without `#NAME`."""
    head, sep, _ = str(path).rpartition("#")
    return Path(head if sep else path).name == INFO_NAME


def _entry_problem(info: Path, name: str, entry: dict[str, Any]) -> str | None:
    where = f"{info}: data set {name!r}"
    hub = [k for k in _HUB_KEYS if k in entry]
    if hub and "file_name" not in entry:
        return (f"{where} is on a hub ({hub[0]}: {entry[hub[0]]!r}); vlmtune reads local files: download it and "
                "give its file_name (or point data.train_path at the downloaded parquet / arrow / JSON file)")
    if entry.get("ranking"):
        return f"{where} is preference data (ranking: true); vlmtune trains supervised fine-tuning only"
    unread = [k for k in entry if k not in _ENTRY_KEYS and k not in _HUB_KEYS]
    if unread:
        return (f"{where}: {', '.join(unread)} not read by vlmtune (it would train on the whole file as written); "
                "remove the key(s), or prepare the file to train on")
    if entry.get("split", "train") != "train":
        return f"{where}: split {entry['split']!r}: a local file has one split, read whole; remove 'split'"
    if not isinstance(entry.get("file_name"), str):
        return f"{where} has no file_name; give the data file's name, relative to {info.parent}"
    formatting = entry.get("formatting", "alpaca")
    if formatting not in _COLUMNS:
        return f"{where}: formatting {formatting!r} is not one of alpaca, sharegpt"
    columns = entry.get("columns", {})
    if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
        return f"{where}: 'columns' must map column names to the record's keys (strings)"
    unknown = [k for k in columns if k not in _COLUMNS[formatting]]
    if unknown:
        return (f"{where}: columns {', '.join(unknown)} are not {formatting} columns vlmtune reads "
                f"({', '.join(_COLUMNS[formatting])}); preference columns (chosen, rejected, kto_tag) are not "
                "supported")
    tags = entry.get("tags", {})
    if not isinstance(tags, dict) or any(k not in _TAGS or not isinstance(v, str) for k, v in tags.items()):
        return f"{where}: 'tags' must map {', '.join(_TAGS)} to strings"
    return None


def resolve(path: Path) -> tuple[Path, ColumnMap] | str:
    """`.../dataset_info.json#NAME` -> (the entry's data file, its column map), or why not (a message)."""
    head, sep, name = str(path).rpartition("#")
    info = Path(head if sep else path)
    try:
        size = info.stat().st_size
        if size > MAX_INFO_BYTES:
            return f"{info} is {size:,} bytes, over {MAX_INFO_BYTES:,}: not a dataset_info.json"
        listing = json.loads(info.read_text(encoding="utf-8"))
    except OSError as exc:
        return f"cannot read {info}: {exc.strerror or exc}"
    except (ValueError, UnicodeDecodeError) as exc:
        return f"{info} is not valid JSON ({exc}); fix the file"
    if not isinstance(listing, dict):
        return f"{info} must be a JSON object of data set entries"
    names = ", ".join(list(listing)[:30])
    if not sep:
        return f"{info} lists data sets; name one as {info}#NAME (it lists: {names})"
    entry = listing.get(name)
    if not isinstance(entry, dict):
        return f"{info} has no data set {name!r}; it lists: {names}"
    problem = _entry_problem(info, name, entry)
    if problem:
        return problem
    formatting = entry.get("formatting", "alpaca")
    columns = {k: v for k, v in _COLUMNS[formatting].items() if v is not None}
    columns.update(entry.get("columns", {}))
    tags = {**_TAGS, **entry.get("tags", {})} if formatting == "sharegpt" else {}
    return info.parent / entry["file_name"], ColumnMap(formatting, columns, tags)
