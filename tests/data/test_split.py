from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmtune.data.check import check_file
from vlmtune.data.records import read_records
from vlmtune.data.split import split_file
from vlmtune.errors import DataError


@pytest.fixture
def source(tmp_path: Path, make_image, write_jsonl) -> Path:
    make_image("data/images/a.png")
    absolute = make_image("elsewhere/b.png")
    records = []
    for i in range(20):
        if i % 2:
            records.append(
                {
                    "id": i,
                    "image": "images/a.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nq"},
                        {"from": "gpt", "value": f"a{i}"},
                    ],
                }
            )
        else:
            records.append(
                {
                    "id": i,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image", "image": str(absolute)},
                                {"type": "image_url", "image_url": {"url": "images/a.png"}},
                                {"type": "text", "text": "q"},
                            ],
                        },
                        {"role": "assistant", "content": f"a{i}"},
                    ],
                }
            )
    return write_jsonl(records, name="data/all.jsonl")


def ids(path: Path) -> list[int]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_split_is_complete_deterministic_and_ordered(tmp_path: Path, source: Path) -> None:
    train, val = split_file(source, 0.25, seed=3, out_dir=tmp_path / "out")
    assert (train.name, val.name) == ("train.jsonl", "val.jsonl")
    train_ids, val_ids = ids(train), ids(val)
    assert len(val_ids) == 5 and sorted(train_ids + val_ids) == list(range(20))
    assert train_ids == sorted(train_ids) and val_ids == sorted(val_ids)
    again = split_file(source, 0.25, seed=3, out_dir=tmp_path / "again")
    assert (ids(again[0]), ids(again[1])) == (train_ids, val_ids)
    other = split_file(source, 0.25, seed=4, out_dir=tmp_path / "other")
    assert ids(other[1]) != val_ids


def test_image_paths_still_resolve_after_the_move(tmp_path: Path, source: Path) -> None:
    train, val = split_file(source, 0.3, seed=0, out_dir=tmp_path / "runs" / "splits")
    originals = {r.messages[-1].text: r.images for r in read_records(source)}
    for path in (train, val):
        assert check_file(path).ok
        for record in read_records(path):
            assert record.images == originals[record.messages[-1].text]
    lines = [json.loads(line) for line in train.read_text().splitlines()]
    sharegpt = next(r for r in lines if "image" in r)
    assert sharegpt["image"] == "../../data/images/a.png", "relative paths stay relative, from the new folder"
    chat = next(r for r in lines if "messages" in r)
    assert chat["messages"][0]["content"][0]["image"] == str(tmp_path / "elsewhere" / "b.png"), (
        "absolute kept"
    )


@pytest.mark.parametrize("n_records, ratio, n_val", [(2, 0.5, 1), (2, 0.01, 1), (3, 0.99, 2), (10, 0.1, 1)])
def test_both_sides_get_at_least_one_record(
    tmp_path: Path, write_jsonl, chat, n_records, ratio, n_val
) -> None:
    path = write_jsonl([chat(image=None, answer=str(i)) for i in range(n_records)])
    train, val = split_file(path, ratio, seed=0, out_dir=tmp_path / "out")
    assert len(read_records(val)) == n_val and len(read_records(train)) == n_records - n_val


def test_refuses_bad_inputs(tmp_path: Path, write_jsonl, chat) -> None:
    one = write_jsonl([chat(image=None)], name="one.jsonl")
    with pytest.raises(DataError, match="at least 2"):
        split_file(one, 0.5, out_dir=tmp_path / "o")
    two = write_jsonl([chat(image=None)] * 2, name="two.jsonl")
    for ratio in (0, 1, -0.1, 1.5):
        with pytest.raises(DataError, match="val_ratio"):
            split_file(two, ratio, out_dir=tmp_path / "o")
    bad = write_jsonl([chat(image=None), "{oops", chat(image=None)], name="bad.jsonl")
    with pytest.raises(DataError, match=r"bad.jsonl:2:"):
        split_file(bad, 0.5, out_dir=tmp_path / "o")
    assert not (tmp_path / "o" / "train.jsonl").exists()
