"""Reading data stays bounded in memory whatever the file holds: `vlmtune data check` (with and without token
counting) and training's data stage (check + dataset) peak within a fixed amount over the same command on a
two-record file. Each run is a fresh process; its peak RSS comes from getrusage(RUSAGE_CHILDREN) of a wrapper
process that ran only it.

The bound (docs/DATA.md, "Limits"): peak RSS <= baseline + 32 x data.max_record_bytes (+ one decoded image, and in
training the EAGER_LIMIT samples an eager data set holds), whatever the file's size, line lengths or record
count. Normal records cost 3-5x their bytes while parsed; 32x is JSON made of empty arrays. Below, the
measured growth must stay under MARGIN_MB.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.reliability("memory")]

MARGIN_MB = 32
"""Allowed growth over the baseline for the files below (the old code grew by the file size or more)."""
PARQUET_MARGIN_MB = 96
"""The same for the parquet file, whose reader's memory pool holds decoded row groups (see its test)."""

_WRAPPER = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.stderr.write(f'rc={r.returncode}\\n' + r.stdout[-3000:] + r.stderr[-3000:])\n"
)


def peak_mb(*argv: str) -> tuple[float, int, str]:
    """(peak RSS in MB, exit code, output tail) of `python argv...` run alone in a fresh process."""
    done = subprocess.run([sys.executable, "-c", _WRAPPER, sys.executable, *argv],
                          capture_output=True, text=True, timeout=600, check=True)
    rc_line, _, tail = done.stderr.partition("\n")
    return int(done.stdout.strip()) / 1024, int(rc_line.removeprefix("rc=")), tail


def data_check(path: Path, *extra: str) -> tuple[float, int, str]:
    code = "import sys; from vlmtune.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return peak_mb("-c", code, "data", "check", str(path), *extra)


def record(text: str = "What colour is the shape?", answer: str = "red") -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": "img.png"},
                                                      {"type": "text", "text": text}]},
                         {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("memory")
    Image.new("RGB", (28, 28), (200, 0, 0)).save(root / "img.png")
    (root / "small.jsonl").write_text(json.dumps(record()) + "\n" + json.dumps(record(answer="blue")) + "\n")
    return root


@pytest.fixture(scope="module")
def baseline(folder: Path) -> float:
    peak, rc, out = data_check(folder / "small.jsonl")
    assert rc == 0, out
    return peak


def test_a_200_mb_line_is_refused_without_being_read(folder: Path, baseline: float, reliability_note) -> None:
    path = folder / "huge-line.jsonl"
    with open(path, "wb") as fh:
        fh.write(json.dumps(record()).encode() + b"\n")
        fh.write(b'{"messages": [{"role": "user", "content": "')
        chunk = b"x" * (1 << 20)
        for _ in range(200):
            fh.write(chunk)
        fh.write(b'"}]}\n' + json.dumps(record()).encode() + b"\n")
    peak, rc, out = data_check(path)
    assert rc == 1 and f"{path}:2: error: the line is 209,715," in out and "data.max_record_bytes" in out, out
    assert peak - baseline < MARGIN_MB, (peak, baseline)
    reliability_note(f"data check, 200 MB line (refused): peak RSS {peak:.0f} MB, baseline {baseline:.0f} MB "
                     f"({peak - baseline:+.1f})")


def test_100k_records_stream(folder: Path, baseline: float, reliability_note) -> None:
    path = folder / "many.jsonl"
    with open(path, "w") as fh:
        for i in range(100_000):
            fh.write(json.dumps({"id": i, **record(text=f"Question {i}: what colour is the shape?")}) + "\n")
    peak, rc, out = data_check(path)
    assert rc == 0 and "OK: 100000 record(s)" in out, out
    assert peak - baseline < MARGIN_MB, (peak, baseline)
    reliability_note(f"data check, 100k records ({path.stat().st_size / 2**20:.0f} MB): peak RSS {peak:.0f} MB "
                     f"({peak - baseline:+.1f})")


def test_100k_records_of_a_json_array_stream(folder: Path, baseline: float, reliability_note) -> None:
    """A JSON array is scanned record by record, never parsed whole (pretty-printed, as LLaVA's files are)."""
    path = folder / "many.json"
    with open(path, "w") as fh:
        fh.write("[\n")
        for i in range(100_000):
            item = {"id": i, **record(text=f"Question {i}: what colour is the shape?")}
            fh.write(("" if i == 0 else ",\n") + json.dumps(item, indent=2))
        fh.write("\n]\n")
    peak, rc, out = data_check(path)
    assert rc == 0 and "OK: 100000 record(s)" in out, out
    assert peak - baseline < MARGIN_MB, (peak, baseline)
    reliability_note(f"data check, JSON array of 100k records ({path.stat().st_size / 2**20:.0f} MB): peak RSS "
                     f"{peak:.0f} MB ({peak - baseline:+.1f})")


def test_10k_parquet_rows_with_embedded_images_stream(folder: Path, reliability_note) -> None:
    """Parquet is read one row group at a time; each row's image bytes are let go with the row."""
    import io

    import pyarrow as pa  # the 'datasets' extra, which scripts/setup.sh dev installs
    import pyarrow.parquet as pq
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((224, 224), 60).convert("RGB").save(buf, "JPEG", quality=95)  # ~35 KB, a bit of work
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                        ("images", pa.list_(image))])

    def write(path: Path, rows: int) -> None:
        with pq.ParquetWriter(path, schema) as writer:
            for start in range(0, rows, 100):
                writer.write_table(pa.Table.from_pylist([
                    {"messages": [{"role": "user", "content": f"<image>Question {i}?"},
                                  {"role": "assistant", "content": "noise"}],
                     "images": [{"bytes": buf.getvalue(), "path": None}]}
                    for i in range(start, min(start + 100, rows))], schema=schema))

    write(folder / "small.parquet", 200)
    write(folder / "many.parquet", 10_000)
    base, rc, out = data_check(folder / "small.parquet")
    assert rc == 0, out
    peak, rc, out = data_check(folder / "many.parquet")
    assert rc == 0 and "OK: 10000 record(s)" in out, out
    # pyarrow's memory pool keeps decoded row-group buffers around: +7 to +23 MB over 200 rows when this test runs
    # alone, +46 MB once in a full suite run (2026-12-07). Keeping every row's image bytes, what this guards against,
    # would add 350 MB (10k x 35 KB; the file is 5 MB only because parquet stores the repeated bytes once).
    assert peak - base < PARQUET_MARGIN_MB, (peak, base)
    reliability_note(f"data check, parquet of 10k rows with embedded images "
                     f"({(folder / 'many.parquet').stat().st_size / 2**20:.0f} MB): peak RSS {peak:.0f} MB "
                     f"({peak - base:+.1f} over 200 rows)")


def test_token_counting_refuses_huge_text_before_the_tokenizer(
    folder: Path, tiny_model_dir, reliability_note
) -> None:
    model = str(tiny_model_dir("qwen2_vl"))
    base, rc, out = data_check(folder / "small.jsonl", "--model", model)
    assert rc == 0 and "tokens: p50" in out, out
    path = folder / "huge-text.jsonl"
    huge = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * (50 << 20)}]}
    long = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 600_000}]}
    path.write_text("\n".join(json.dumps(r) for r in (record(), huge, long, record())) + "\n")
    peak, rc, out = data_check(path, "--model", model)
    assert rc == 1 and f"{path}:2: error: the line is 52,428," in out, out
    assert f"{path}:3: error: 3,000,001 characters of text" in out and "data.max_text_chars" in out, out
    assert peak - base < MARGIN_MB, (peak, base)
    reliability_note(f"data check --model, 50 MB and 3 MB answers (refused): peak RSS {peak:.0f} MB, baseline "
                     f"{base:.0f} MB ({peak - base:+.1f})")
    many = folder / "many-counted.jsonl"
    many.write_text("".join(json.dumps(record(text=f"Question {i}?")) + "\n" for i in range(10_000)))
    peak, rc, out = data_check(many, "--model", model)
    assert rc == 0 and "OK: 10000 record(s)" in out, out
    assert peak - base < MARGIN_MB, (peak, base)
    reliability_note(f"data check --model, 10k records counted: peak RSS {peak:.0f} MB ({peak - base:+.1f})")


_STAGE = """
import resource, sys
from pathlib import Path
import vlmtune.data.dataset as dataset
from vlmtune.config.schema import VlmtuneConfig
from vlmtune.train.engine import _check_data, build_dataset, resolve_family

dataset.EAGER_LIMIT = 100  # the samples an eager data set holds are a fixed amount; keep it small here
path = Path(sys.argv[1])
config = VlmtuneConfig.model_validate({"output_dir": sys.argv[3], "model": {"name_or_path": sys.argv[2]},
                                       "data": {"train_path": str(path), "max_length": 4096}})
family = resolve_family(config)
processor = family.load_processor(config.model.name_or_path, config.data)
passes = _check_data(config, processor, family)
data = build_dataset(path, processor, family, config, passes.get(path))
print(len(data), "samples")
"""


def test_the_training_data_stage_does_not_grow_with_the_file(
    folder: Path, tiny_model_dir, tmp_path: Path, reliability_note
) -> None:
    """Training's check encodes every record (EncodeOnce) and the data set indexes them: per record it keeps a
    few numbers, not the record or its encoding (the old code kept every record twice, ~5 KB each here)."""
    model = str(tiny_model_dir("qwen2_vl"))
    text = {"messages": [{"role": "system", "content": "You describe pictures. " * 10},
                         {"role": "user", "content": "Tell me about it. " * 60},
                         {"role": "assistant", "content": "It is a red shape on grey. " * 30}]}
    peaks = {}
    for n in (300, 2400):
        path = folder / f"stage-{n}.jsonl"
        path.write_text((json.dumps(text) + "\n") * n)
        peak, rc, out = peak_mb("-c", _STAGE, str(path), model, str(tmp_path / f"run-{n}"))
        assert rc == 0 and f"{n} samples" in out, out
        peaks[n] = peak
    growth = peaks[2400] - peaks[300]
    assert growth < 8, peaks
    reliability_note(f"train data stage, 300 -> 2400 records of {len(json.dumps(text)):,} bytes: peak RSS "
                     f"{peaks[300]:.0f} -> {peaks[2400]:.0f} MB ({growth:+.1f})")
