from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vlmtune.data.check import check_file
from vlmtune.data.images import open_image
from vlmtune.data.records import read_records
from vlmtune.data.synthetic import COLORS, make_shapes_vqa


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_valid_balanced_and_deterministic(tmp_path: Path) -> None:
    path = make_shapes_vqa(tmp_path / "a", n=24, seed=5)
    assert check_file(path).ok
    records = read_records(path)
    assert len(records) == 24
    answers = Counter(r.messages[-1].text for r in records)
    assert answers == {c: 6 for c in COLORS}
    first = records[0]
    assert [m.role for m in first.messages] == ["user", "assistant"]
    assert len(first.images) == 1 and open_image(first.images[0]).size == (56, 56)
    assert first.messages[0].text == "What colour is the shape?"
    make_shapes_vqa(tmp_path / "b", n=24, seed=5)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    make_shapes_vqa(tmp_path / "c", n=24, seed=6)
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_the_answer_is_in_the_pixels(tmp_path: Path) -> None:
    """The most saturated pixels' nearest palette colour is the answer: the task is learnable from the image."""
    names = list(COLORS)
    palette = np.array([COLORS[c] for c in names], dtype=float)
    for record in read_records(make_shapes_vqa(tmp_path, n=40, seed=1)):
        pixels = np.asarray(open_image(record.images[0]), dtype=float).reshape(-1, 3)
        saturated = pixels[pixels.max(1) - pixels.min(1) > 100]
        assert len(saturated) > 0.25 * len(pixels), "the shape covers a large part of the image"
        nearest = np.argmin(((saturated[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
        assert names[np.bincount(nearest).argmax()] == record.messages[-1].text


def test_shape_task_and_parameters(tmp_path: Path) -> None:
    path = make_shapes_vqa(
        tmp_path,
        n=36,
        seed=0,
        tasks=("color", "shape"),
        colors=("red", "blue"),
        image_size=32,
        file_name="mixed.jsonl",
    )
    assert path.name == "mixed.jsonl"
    records = read_records(path)
    by_question = Counter((r.messages[0].text, r.messages[-1].text) for r in records)
    assert by_question == {
        ("What colour is the shape?", "red"): 9,
        ("What colour is the shape?", "blue"): 9,
        ("What shape is it?", "circle"): 6,
        ("What shape is it?", "square"): 6,
        ("What shape is it?", "triangle"): 6,
    }
    assert open_image(records[0].images[0]).size == (32, 32)
    with pytest.raises(ValueError, match="unknown"):
        make_shapes_vqa(tmp_path, n=4, tasks=("count",))
