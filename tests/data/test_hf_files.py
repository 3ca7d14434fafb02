"""Hugging Face `datasets` files as data: parquet and arrow files with embedded image bytes (as `datasets` writes an
`Image` column), save_to_disk and load_dataset-style folders, read lazily by row; pyarrow is the `datasets` extra,
installed by `scripts/setup.sh dev`, so these tests run in CI."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pyarrow as pa  # the 'datasets' extra: scripts/setup.sh dev installs it, so these tests always run
import pyarrow.parquet as pq
import pytest
import torch

from vlmtune.config.schema import DataConfig
from vlmtune.data.check import check_file
from vlmtune.data.embedded import EmbeddedImage
from vlmtune.data.processing import encode
from vlmtune.data.records import read_records
from vlmtune.errors import MissingDependencyError
from vlmtune.families import get_family

FORMATS = Path(__file__).parent / "formats"
RED, BLUE = (FORMATS / "images" / name for name in ("red.png", "blue.png"))
Q = "What colour is the shape?"
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
ITEM = pa.struct([("index", pa.int64()), ("text", pa.string()), ("type", pa.string())])
MESSAGES = pa.list_(pa.struct([("content", pa.list_(ITEM)), ("role", pa.string())]))
FEATURES = {"messages": [{"content": [{"index": {"dtype": "int64", "_type": "Value"},
                                       "text": {"dtype": "string", "_type": "Value"},
                                       "type": {"dtype": "string", "_type": "Value"}}],
                          "role": {"dtype": "string", "_type": "Value"}}],
            "images": [{"_type": "Image"}]}


def row(question: str, answer: str, images: list[Path], embed: bool = True) -> dict:
    """One record as `datasets` stores it: every struct field present (null where unused), images as structs."""
    content = [{"index": i, "text": None, "type": "image"} for i in range(len(images))]
    content.append({"index": None, "text": question, "type": "text"})
    return {"messages": [{"content": content, "role": "user"},
                         {"content": [{"index": None, "text": answer, "type": "text"}], "role": "assistant"}],
            "images": [{"bytes": p.read_bytes() if embed else None, "path": p.name if not embed else None}
                       for p in images]}


ROWS = [row(Q, "red", [RED]), row("Which is blue?", "The second.", [RED, BLUE]), row("Name a colour.", "Green.", []),
        row(Q, "blue", [BLUE], embed=False)]


def table(rows: list[dict]) -> pa.Table:
    schema = pa.schema([("messages", MESSAGES), ("images", pa.list_(IMAGE))],
                       metadata={"huggingface": json.dumps({"info": {"features": FEATURES}})})
    return pa.Table.from_pylist(rows, schema=schema)


def write_parquet(path: Path, rows: list[dict] = ROWS, row_group_size: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table(rows), path, row_group_size=row_group_size)
    return path


def write_arrow(path: Path, rows: list[dict] = ROWS) -> Path:
    """An arrow IPC stream, as `datasets` writes its cache and save_to_disk files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = table(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as writer:
        writer.write_table(t, max_chunksize=2)
    return path


def summary(record) -> list[tuple]:
    def part(p):
        if hasattr(p, "text"):
            return p.text
        if isinstance(p.path, EmbeddedImage):
            return "embedded:" + next(f.name for f in (RED, BLUE) if f.read_bytes() == p.path.data)
        return p.path.name
    return [(m.role, [part(p) for p in m.parts]) for m in record.messages]


EXPECTED = [
    [("user", ["embedded:red.png", Q]), ("assistant", ["red"])],
    [("user", ["embedded:red.png", "embedded:blue.png", "Which is blue?"]), ("assistant", ["The second."])],
    [("user", ["Name a colour."]), ("assistant", ["Green."])],
    [("user", ["blue.png", Q]), ("assistant", ["blue"])],
]


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_a_file_reads_row_by_row_to_the_exact_records(tmp_path: Path, kind: str) -> None:
    path = (write_parquet if kind == "parquet" else write_arrow)(tmp_path / f"train.{kind}")
    config = DataConfig(image_root=RED.parent)  # the path-only image of row 4
    records = read_records(path, config)
    assert [summary(r) for r in records] == EXPECTED
    assert [r.line for r in records] == [1, 2, 3, 4]  # the row number stands for the line
    assert summary(records[3]) == EXPECTED[3] and summary(records[1]) == EXPECTED[1]  # random access, any order
    assert summary(pickle.loads(pickle.dumps(records))[0]) == EXPECTED[0]  # for data loader workers
    report = check_file(path, config)
    assert report.ok and report.summary["images"] == 4, report.format()


def test_rows_are_read_lazily(tmp_path: Path) -> None:
    """The reader keeps row numbers, not rows: reading record 5 of 400 touches one row group."""
    path = write_parquet(tmp_path / "big.parquet", ROWS * 100, row_group_size=8)
    records = read_records(path, DataConfig(image_root=RED.parent))
    assert len(records) == 400 and records._rows is None
    assert summary(records[5]) == EXPECTED[1]
    group = records._rows._cache
    assert group[:2] == (0, 0) and group[2].num_rows == 8


def test_the_same_conversation_encodes_as_from_jsonl(tmp_path: Path, tiny_model_dir) -> None:
    family = get_family("qwen2_vl")
    processor = family.load_processor(tiny_model_dir("qwen2_vl"), DataConfig())
    reference = encode(read_records(FORMATS / "canonical.jsonl")[0], processor, family, DataConfig())
    sample = encode(read_records(write_parquet(tmp_path / "t.parquet"))[0], processor, family, DataConfig())
    for key in ("input_ids", "labels"):
        assert torch.equal(sample.sequence[key], reference.sequence[key])
    assert torch.equal(sample.images["pixel_values"], reference.images["pixel_values"])


def test_folders_as_datasets_writes_them(tmp_path: Path) -> None:
    hub = tmp_path / "hub_layout"  # load_dataset-style: data/<split>-NNNNN-of-NNNNN.parquet
    write_parquet(hub / "data" / "train-00000-of-00002.parquet", ROWS[:2])
    write_parquet(hub / "data" / "train-00001-of-00002.parquet", ROWS[2:3])
    write_parquet(hub / "data" / "test-00000-of-00001.parquet", ROWS[:1])
    report = check_file(hub)
    (error,) = report.errors
    assert "holds several splits (test, train); name one as" in error.message and f"{hub}#test" in error.message
    assert [summary(r) for r in read_records(f"{hub}#train")] == EXPECTED[:3]
    assert len(read_records(f"{hub}#test")) == 1
    assert "has no split 'validation'; it has: test, train" in check_file(Path(f"{hub}#validation")).errors[0].message

    saved = tmp_path / "saved"  # save_to_disk: state.json lists the arrow files in order
    write_arrow(saved / "data-00000-of-00002.arrow", ROWS[2:3])
    write_arrow(saved / "data-00001-of-00002.arrow", ROWS[:2])
    (saved / "state.json").write_text(json.dumps({"_data_files": [
        {"filename": "data-00001-of-00002.arrow"}, {"filename": "data-00000-of-00002.arrow"}]}))
    assert [summary(r) for r in read_records(saved)] == EXPECTED[:3]


def test_bad_rows_name_the_row_and_field(tmp_path: Path) -> None:
    bad = row(Q, "red", [RED])
    bad["messages"][1]["role"] = "bot"
    missing = row(Q, "blue", [BLUE], embed=False)
    path = write_parquet(tmp_path / "train.parquet", [ROWS[0], bad, missing])
    report = check_file(path)
    assert [(p.line, p.field) for p in report.errors] == [(2, "messages[1].role"), (3, "image 1 (blue.png)")]
    assert f"image file not found: {tmp_path / 'blue.png'}" in report.errors[1].message


def test_a_damaged_file_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1 not really")
    (error,) = check_file(path).errors
    assert error.line == 0 and "not a readable parquet / arrow file" in error.message


def test_without_pyarrow_the_error_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    path = write_parquet(tmp_path / "train.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'vlmtune\[datasets\]'") as info:
        read_records(path)
    assert str(path) in str(info.value)


def test_an_index_out_of_order_is_an_error(tmp_path: Path) -> None:
    swapped = row("Which is blue?", "The second.", [RED, BLUE])
    content = swapped["messages"][0]["content"]
    content[0]["index"], content[1]["index"] = 1, 0
    path = write_parquet(tmp_path / "train.parquet", [swapped])
    errors = check_file(path).errors
    assert errors and errors[0].field == "messages[0].content[0].index"
    assert "reorder the 'images' list" in errors[0].message


def test_a_data_set_in_the_hub_cache(tmp_path: Path, monkeypatch) -> None:
    """`hf://datasets/ORG/NAME#SPLIT` reads the snapshot that huggingface_hub's cache holds (offline, as in CI)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "datasets--someone--shapes-vqa"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_parquet(repo / "snapshots" / commit / "data" / "train-00000-of-00001.parquet", ROWS[:3])
    write_parquet(repo / "snapshots" / commit / "data" / "test-00000-of-00001.parquet", ROWS[:1])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert [summary(r) for r in read_records("hf://datasets/someone/shapes-vqa#train")] == EXPECTED[:3]
    assert len(read_records(Path("hf://datasets/someone/shapes-vqa#test"))) == 1  # a Path folds the '//'
    (error,) = check_file(Path("hf://datasets/someone/not-there")).errors
    assert "is not in the Hugging Face cache" in error.message and "hf download someone/not-there" in error.message


@pytest.mark.slow
def test_training_runs_on_parquet_with_embedded_images(run_config, tmp_path: Path) -> None:
    from vlmtune.train.engine import train

    path = write_parquet(tmp_path / "data" / "train.parquet", ROWS[:3])
    config = run_config(out=tmp_path / "run", data={"train_path": str(path)},
                        training={"max_steps": 2, "batch_size": 1})
    assert train(config).steps == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.parquet"]  # nothing written beside the data


def test_a_pandas_index_column_is_not_data(tmp_path: Path) -> None:
    t = table(ROWS[:2]).append_column("__index_level_0__", pa.array([7, 9]))
    path = tmp_path / "train.parquet"
    pq.write_table(t, path)
    assert [summary(r) for r in read_records(path)] == EXPECTED[:2]
