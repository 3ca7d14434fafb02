"""`vlmtune data convert IN --out FILE.jsonl`: any input vlmtune reads, written as its own JSONL, to see exactly
what will be trained (and to split or edit it with line-based tools).

Each record becomes one chat-style line: the system prompt as a first `system` message, images as
`{"type": "image", "image": PATH}` items where they sit in the conversation, `"loss": false` on assistant turns
that are not trained. Image paths are written relative to the output file's folder (absolute when no relative path
exists), so they keep pointing at the same files. Embedded images (base64, `data:` URLs, parquet / arrow bytes) are
written once each, named by their content hash, into `FILE_images/` beside the output: the only files written
besides the output itself. Both go through a staging folder and the output marker (`outputs`): existing files are
replaced only when vlmtune wrote them, or with `--overwrite`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from vlmtune import outputs
from vlmtune.config.schema import DataConfig
from vlmtune.data.embedded import EmbeddedImage
from vlmtune.data.records import ImagePart, Record, read_records
from vlmtune.errors import DataError


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    records: int
    images_written: int


def _extension(image: EmbeddedImage) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image.data)) as im:
            kind = (im.format or "").lower()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{image} is not a readable image file: {exc}; fix or remove it before converting") from exc
    return {"jpeg": ".jpg", "": ".img"}.get(kind, f".{kind}")


class _Writer:
    def __init__(self, out_dir: Path, staging: Path, images_dir: str):
        self.out_dir, self.staging, self.images_dir = out_dir, staging, images_dir
        self.written: dict[str, str] = {}

    def image(self, image: Path | EmbeddedImage) -> str:
        if isinstance(image, Path):
            try:
                return PurePath(os.path.relpath(image, self.out_dir)).as_posix()
            except ValueError:  # another drive (Windows): no relative path
                return str(image)
        digest = hashlib.sha256(image.data).hexdigest()[:32]
        if digest not in self.written:
            name = f"{self.images_dir}/{digest}{_extension(image)}"
            target = self.staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(image.data)
            self.written[digest] = name
        return self.written[digest]

    def record(self, record: Record) -> dict[str, Any]:
        messages = []
        for m in record.messages:
            items = [{"type": "image", "image": self.image(p.path)} if isinstance(p, ImagePart)
                     else {"type": "text", "text": p.text} for p in m.parts]
            content: Any = items[0]["text"] if len(items) == 1 and items[0]["type"] == "text" else items
            message: dict[str, Any] = {"role": m.role, "content": content}
            if m.role == "assistant" and not m.train:
                message["loss"] = False
            messages.append(message)
        return {"messages": messages}


def _size(path: Path) -> int:
    """About what the output takes: the input's size (a folder's files added up)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def convert_file(source: Path | str, out: Path | str, data_cfg: DataConfig | None = None,
                 overwrite: bool = False) -> ConvertResult:
    """Write every record of `source` (any format `records` reads; it must pass its structure check) to `out` as
    JSONL, embedded images into `out`'s `<stem>_images/` folder. Raises DataError for bad data and VlmtuneError for
    outputs it may not replace."""
    out = Path(out)
    outputs.check_file(out, what="the converted data", overwrite=overwrite,
                       inputs={"the data being converted": source}, label=f"--out {out}")
    records = read_records(source, data_cfg)
    out_dir = out.parent.absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=outputs.STAGING_PREFIX, dir=out_dir))
    writer = _Writer(out_dir, staging, f"{out.stem}_images")
    try:
        with (outputs.disk_full_guard(out_dir, lambda: _size(Path(source)), out.name),
              open(staging / out.name, "w", encoding="utf-8") as fh):
            for record in records:
                fh.write(json.dumps(writer.record(record), ensure_ascii=False) + "\n")
        outputs.move_into(staging, out_dir, what="the converted data", by=f"convert:{out.name}", overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ConvertResult(out, len(records), len(writer.written))
