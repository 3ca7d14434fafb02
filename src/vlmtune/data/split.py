"""Split one JSONL file into train.jsonl and val.jsonl, deterministically for a seed.

Records are copied as written (their style and any extra keys kept); only image paths change: a relative path is
rewritten relative to the output folder, so it still points at the same file, and the source and output folders
can move together (e.g. a repository copied to another machine). Absolute paths and file:// URIs stay as they are.

Existing train.jsonl / val.jsonl are replaced only when vlmtune wrote them (and they are unchanged since) or with
`overwrite`, never when one of them is the file being split (see `vlmtune.outputs`).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

from vlmtune import outputs
from vlmtune.config.schema import DataConfig
from vlmtune.data.records import Problem, format_problems, iter_lines, scan
from vlmtune.errors import DataError


def map_image_paths(obj: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """A copy of a raw record with `fn(str) -> str` applied to every image path string (both styles).

    Visits the same keys that `record_formats` reads images from; keep the two in step.
    """
    new = dict(obj)
    for key in ("image", "images"):
        value = new.get(key)
        if isinstance(value, str):
            new[key] = fn(value)
        elif isinstance(value, list):
            new[key] = [fn(v) if isinstance(v, str) else v for v in value]
    if isinstance(new.get("messages"), list):
        new["messages"] = [_map_message(m, fn) for m in new["messages"]]
    return new


def _map_message(message: Any, fn: Callable[[str], str]) -> Any:
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    content = []
    for item in message["content"]:
        item = dict(item) if isinstance(item, dict) else item
        if isinstance(item, dict) and item.get("type") == "image":
            for k in ("image", "path", "url"):
                if isinstance(item.get(k), str):
                    item[k] = fn(item[k])
        elif isinstance(item, dict) and item.get("type") == "image_url":
            ref = item.get("image_url")
            if isinstance(ref, str):
                item["image_url"] = fn(ref)
            elif isinstance(ref, dict) and isinstance(ref.get("url"), str):
                item["image_url"] = {**ref, "url": fn(ref["url"])}
        content.append(item)
    return {**message, "content": content}


def _count_valid(path: Path) -> int:
    from vlmtune.data.records import Problem as _Problem
    from vlmtune.data.sources import open_source

    source = open_source(path)
    if not isinstance(source, _Problem) and (source.kind != "jsonl" or source.columns is not None):
        raise DataError(
            f"cannot split {path}: split copies the lines of a JSONL file, and this is "
            f"{'a JSON array' if source.kind == 'json-array' else 'parquet / arrow data' if source.kind == 'hf' else 'a dataset_info.json entry'}"
            f". Convert it first (`vlmtune data convert {path} --out data.jsonl`), then split data.jsonl"
        )
    count, problems = 0, []
    # Split copies records as written: a field vlmtune does not read travels along (train's data check decides).
    for _, record, found in scan(path, DataConfig(on_ignored_field="warn")):
        problems += [p for p in found if p.severity == "error"]
        count += record is not None
    if problems:
        raise DataError(
            f"cannot split {path}: {len(problems)} problem(s) (run `vlmtune data check {path}`):\n"
            + format_problems(path, problems)
        )
    return count


def _path_rewriter(source_dir: Path, out_dir: Path) -> Callable[[str], str]:
    def rewrite(raw: str) -> str:
        if "://" in raw or raw.startswith("data:") or Path(raw).expanduser().is_absolute():
            return raw
        target = os.path.normpath(source_dir / raw)
        try:
            return PurePath(os.path.relpath(target, out_dir)).as_posix()
        except ValueError:  # a different drive on Windows: no relative path exists
            return target

    return rewrite


def split_file(
    path: Path | str,
    val_ratio: float,
    seed: int = 42,
    out_dir: Path | str = Path("output/splits"),
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write `out_dir/train.jsonl` and `out_dir/val.jsonl`; returns their paths.

    round(n * val_ratio) records go to validation, at least one and at most n - 1; both files keep the source
    order. Raises DataError for a file with problems or fewer than 2 records, or a ratio outside (0, 1), and
    VlmtuneError for outputs it may not replace (`overwrite` allows those vlmtune did not write).
    """
    path, out_dir = Path(path), Path(out_dir)
    if not 0 < val_ratio < 1:
        raise DataError(f"val_ratio must be between 0 and 1 (exclusive), got {val_ratio}")
    train_path, val_path = out_dir / "train.jsonl", out_dir / "val.jsonl"
    for target in (train_path, val_path):
        outputs.check_file(
            target, what="the split", overwrite=overwrite, inputs={"the file being split": path},
            label=f"{target}, an output of the split,",
        )
    n = _count_valid(path)
    if n < 2:
        raise DataError(f"cannot split {path}: it has {n} record(s); a split needs at least 2")
    n_val = min(max(round(n * val_ratio), 1), n - 1)
    val_index = set(random.Random(seed).sample(range(n), n_val))
    out_dir.mkdir(parents=True, exist_ok=True)
    rewrite = _path_rewriter(path.parent.absolute(), out_dir.absolute())
    tmp_train, tmp_val = (out_dir / f"{outputs.STAGING_PREFIX}-{p.name}" for p in (train_path, val_path))
    index = 0
    try:
        with (
            outputs.disk_full_guard(out_dir, path.stat().st_size, "train.jsonl and val.jsonl"),
            open(tmp_train, "w", encoding="utf-8") as train_fh,
            open(tmp_val, "w", encoding="utf-8") as val_fh,
        ):
            for _, text in iter_lines(path):
                if isinstance(text, Problem):  # not reached: _count_valid raised on any bad line
                    continue
                record = map_image_paths(json.loads(text), rewrite)
                fh = val_fh if index in val_index else train_fh
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                index += 1
        os.replace(tmp_train, train_path)
        os.replace(tmp_val, val_path)
        outputs.record(out_dir, [train_path.name, val_path.name], by="split")
    finally:
        tmp_train.unlink(missing_ok=True)
        tmp_val.unlink(missing_ok=True)
    return train_path, val_path
