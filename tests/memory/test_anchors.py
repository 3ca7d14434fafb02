"""The estimate against the 26 measured H100 runs (memory_anchors.md §9): within 5% of the nvidia-smi peak.

`pytest tests/memory/test_anchors.py -s` prints the full table (allocated / reserved / nvidia-smi levels).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmtune.memory.calibration import compare, read_runs, report

RUNS = read_runs(Path(__file__).parent / "data" / "h100_anchors.jsonl")


def test_all_26_runs_are_there():
    assert len(RUNS) == 26


@pytest.fixture(scope="module")
def results():
    out = compare(RUNS)
    print("\n" + report(out))
    return out


def test_nvidia_smi_peak_within_5_percent(results):
    assert [(r.case, round(r.err_total, 1)) for r in results if abs(r.err_total) > 5.0] == []


def test_allocated_peak_within_2_percent(results):
    assert [(r.case, round(r.err_alloc, 1)) for r in results if abs(r.err_alloc) > 2.0] == []


def test_mean_error_is_small(results):
    assert sum(abs(r.err_total) for r in results) / len(results) < 2.0
