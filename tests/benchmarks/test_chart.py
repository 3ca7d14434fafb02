"""The speed picture: ratios to the reference of the same results, and a PNG with one block per workload."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks.speed.chart import Bar, bars, main, render


def _row(variant: str, path: str, mean: float, median: float | None, reserved: float, workload: str = "W1") -> dict:
    return {"workload": workload, "variant": variant, "path": path, "tokens_per_second": mean,
            "tokens_per_second_median_step": median, "peak_reserved_gib": reserved}


def test_bars_are_ratios_to_the_workloads_reference_at_the_median_step():
    results = [
        _row("plain_gc", "plain", 4000, 5000, 11.9),
        _row("vlmtune_gc2_compile", "vlmtune", 9000, 12500, 11.6),
        _row("liger_gc", "liger", 4100, None, 6.1),  # no median: its mean
        _row("vlmtune_padded", "vlmtune", 7000, 7000, 8.9, workload="W5"),  # another workload: not in W1's block
    ]
    assert bars(results, "W1") == [
        Bar("plain_gc", "plain", 1.0, 11.9),
        Bar("vlmtune_gc2_compile", "vlmtune", 2.5, 11.6),
        Bar("liger_gc", "liger", 0.82, 6.1),
    ]
    assert bars(results, "W4") == []  # no reference row


def test_png_has_a_block_per_workload(tmp_path):
    path = tmp_path / "call" / "results.jsonl"
    path.parent.mkdir()
    rows = [_row("plain_gc", "plain", 4000, 5000, 11.9), _row("vlmtune_gc", "vlmtune", 6000, 6000, 6.7),
            _row("vlmtune_padded", "vlmtune", 7000, 7000, 8.9, "W5"), _row("vlmtune_packed", "vlmtune", 1, 13000, 10.5, "W5")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one = main([str(tmp_path / "one.png"), f"{path}:W1"])
    both = main([str(tmp_path / "both.png"), str(path)])
    assert Image.open(one).size[0] == Image.open(both).size[0] == 900
    assert Image.open(both).size[1] > Image.open(one).size[1]  # the W5 block adds rows
    with pytest.raises(ValueError, match="nothing to draw"):
        render([("W4", [])], tmp_path / "none.png")
