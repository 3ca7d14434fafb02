"""Answering questions with a trained result and scoring a JSONL file by exact match."""

from __future__ import annotations

import json

import pytest

from vlmtune.data.records import read_records
from vlmtune.export.predict import answer, load_for_inference, normalize_answer, predict_file


@pytest.mark.parametrize(
    "text, expected",
    [(" Red. ", "red"), ("RED!", "red"), ("a  big\nred", "a big red"), ("red?!", "red"), ("3.5", "3.5")],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.slow
def test_predict_file_scores_exact_match(train_tiny, red_data, tmp_path):
    loaded = load_for_inference(train_tiny("full", steps=15), device="cpu")
    result = predict_file(loaded, red_data, tmp_path / "predictions.jsonl", max_new_tokens=5)
    assert (result.total, result.correct, result.accuracy) == (8, 8, 1.0)
    rows = [json.loads(line) for line in result.path.read_text().splitlines()]
    assert rows[0] == {"line": 1, "prediction": "red", "reference": "red", "correct": True}

    # References are normalised (case, whitespace, trailing punctuation); a different word is wrong.
    lines = red_data.read_text().splitlines()[:3]
    records = [json.loads(line) for line in lines]
    for record, reference in zip(records, [" Red. ", "RED", "blue"], strict=True):
        record["messages"][1]["content"] = [{"type": "text", "text": reference}]
    mixed = red_data.parent / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = predict_file(loaded, mixed, tmp_path / "mixed_predictions.jsonl", max_new_tokens=5)
    assert (result.total, result.correct) == (3, 2)

    image = read_records(red_data)[0].images[0]
    assert answer(loaded, [image], "What colour is the shape?", max_new_tokens=5) == "red"
