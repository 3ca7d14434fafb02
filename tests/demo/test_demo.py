"""The README's demo, end to end: a tiny model learns the synthetic visual-QA task through the real engine."""

import json

import pytest


@pytest.mark.slow
def test_demo_learns_the_task(tmp_path):
    from vlmtune.cli.main import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "train_loss_first", "train_loss_last", "seconds"):
        assert key in summary
    assert summary["accuracy_after"] >= 0.9
    assert summary["accuracy_after"] - summary["accuracy_before"] >= 0.3
    assert summary["train_loss_last"] < summary["train_loss_first"] / 5
    assert (tmp_path / "predictions_after.jsonl").is_file()
    # Again in the same folder (the README's command run twice): the demo starts over instead of refusing
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["accuracy_after"] >= 0.9
