"""A 100,000-record parquet data set with embedded 448 px images, as Hugging Face `datasets` writes one (an `Image`
column of {bytes, path} structs, row groups of 100 rows): how much memory `vlmtune data check` takes on it, and how
long training takes to reach its first step without decoding the set first (issue 18).

    .venv/bin/python benchmarks/data_hf_100k.py OUT_DIR [--rows 100000]

Writes OUT_DIR/train.parquet (~1.5 GB; reused when present), then runs, each in its own process:
  1. `vlmtune data check OUT_DIR/train.parquet` under /usr/bin/time: peak RSS and wall time;
  2. a tiny-model training run of 1 step with data.check_before_training=false: the time from the command's start
     to the first step's log line, and the peak RSS.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

IMAGE_SIDE = 448
ROW_GROUP = 100  # datasets' row group size for image data sets


def _images(n: int) -> list[bytes]:
    from PIL import Image, ImageDraw

    out = []
    rng = random.Random(0)
    for _ in range(n):
        im = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (235, 235, 235))
        draw = ImageDraw.Draw(im)
        for _ in range(30):
            x, y = rng.randrange(IMAGE_SIDE), rng.randrange(IMAGE_SIDE)
            r = rng.randrange(10, 80)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_parquet(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    item = pa.struct([("index", pa.int64()), ("text", pa.string()), ("type", pa.string())])
    schema = pa.schema([("messages", pa.list_(pa.struct([("content", pa.list_(item)), ("role", pa.string())]))),
                        ("images", pa.list_(image))])
    pictures = _images(64)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, ROW_GROUP):
            batch = []
            for i in range(start, min(start + ROW_GROUP, rows)):
                batch.append({
                    "messages": [
                        {"role": "user", "content": [{"index": 0, "text": None, "type": "image"},
                                                     {"index": None, "text": f"Record {i}: what is drawn?",
                                                      "type": "text"}]},
                        {"role": "assistant", "content": [{"index": None, "text": "Circles.", "type": "text"}]}],
                    "images": [{"bytes": pictures[i % len(pictures)], "path": None}],
                })
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))


def _timed(cmd: list[str], first_line: str | None = None) -> dict:
    start = time.monotonic()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if first_line and first is None and re.search(first_line, line):
            first = time.monotonic() - start
    proc.wait()
    text = "".join(lines)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"rc": proc.returncode, "wall_s": round(time.monotonic() - start, 1),
            "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None,
            "first_step_s": round(first, 1) if first is not None else None, "tail": text[-1500:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--skip-check", action="store_true", help="measure only the training run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "train.parquet"
    if not data.exists():
        t = time.monotonic()
        write_parquet(data, args.rows)
        print(f"wrote {data}: {data.stat().st_size / 1e9:.2f} GB in {time.monotonic() - t:.0f} s", flush=True)
    vlmtune = str(Path(sys.executable).with_name("vlmtune"))
    if not args.skip_check:
        check = _timed([vlmtune, "data", "check", str(data)])
        print(json.dumps({"data_check": {k: v for k, v in check.items() if k != "tail"}}), flush=True)
        print(check["tail"][-600:], flush=True)

    from vlmtune.families import get_family

    model = args.out / "tiny-qwen2_vl"
    if not model.exists():
        get_family("qwen2_vl").build_tiny(model)
    train = _timed([vlmtune, "train", f"model.name_or_path={model}", f"data.train_path={data}",
                    "data.check_before_training=false", "training.max_steps=1", "training.batch_size=1",
                    "training.logging_steps=1", "training.report_to=[none]", "hardware.use_cpu=true",
                    f"output_dir={args.out / 'run'}", "--overwrite"], first_line=r"'loss'|loss[=:]|step 1")
    print(json.dumps({"train": {k: v for k, v in train.items() if k != "tail"}}), flush=True)
    print(train["tail"][-1500:], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
