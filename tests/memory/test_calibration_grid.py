"""The estimate against `vlmtune train` on an H100 (benchmarks/RESULTS.md, estimator calibration): the grid's
points re-estimated with the current estimator, at the nvidia-smi level (max_memory_reserved + the measured CUDA
context, or the per-process NVML peak for the points only that run recorded).

Every measurement of a point counts: the grid of session 1, session 5's re-run of all its Qwen2-VL-2B points,
session 5's re-run of five 2B points with the memory timeline (RESULTS.md, session 5), and session 6's four LoRA /
QLoRA points after speed.fused_lora and use_cache=False (RESULTS.md, session 6). A point measured more than once
is compared by the mean of its measurements: allocated repeats to 0.5%, but reserved moved by -2.5% to +7.2% between
runs of the same configuration, as much as the ±5% band.

`pytest tests/memory/test_calibration_grid.py -s` prints the errors. The ZeRO points are DeepSpeed's: their
process also holds DeepSpeed's memory outside PyTorch's allocator, which reserved + the plain CUDA context does not
see, so they are compared at that level: the estimate's reserved + the same context.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import pytest

from vlmtune.memory import EstimateInputs, estimate

ROOT = Path(__file__).parents[2] / "benchmarks" / "results"
RESULTS = ROOT / "2026-11-24-calibration"
FILES = (
    RESULTS / "calibration.jsonl",
    RESULTS / "run1_nvml_only.jsonl",
    ROOT / "2026-11-24d-session5" / "calibration-2b-repeat" / "calibration.jsonl",
    ROOT / "2026-11-24d-session5" / "calibration-repeat" / "calibration.jsonl",
    ROOT / "2026-11-24e-session6" / "calibration-lora" / "calibration.jsonl",
)
MIB = 1 << 20


def _rows(files: tuple[Path, ...] = FILES[:2]) -> list[dict]:
    return [json.loads(x) for path in files for x in path.read_text().splitlines() if x.strip()]


def _errors(files: tuple[Path, ...] = FILES) -> tuple[dict[str, float], dict[str, int]]:
    """(error % of each point against the mean of its measurements, measurements per point)."""
    rows = _rows(files)
    context = statistics.median(
        r["context_mib"] for r in rows if r.get("context_mib") and r["method"] != "qlora"
    )
    measured: dict[str, list[float]] = defaultdict(list)
    first: dict[str, dict] = {}
    for r in rows:
        if r.get("meas_reserved_mib") is not None:
            measured[r["id"]].append(r["meas_reserved_mib"] + context)
        elif r.get("nvml_only"):
            measured[r["id"]].append(r["meas_smi_process_mib"])
        else:
            continue  # a run that failed
        first.setdefault(r["id"], r)
    out = {}
    for point, values in measured.items():
        r = first[point]
        i = {k: v for k, v in r["inputs"].items() if v is not None}
        i.update(model=r["catalogue_model"], gpu=None, image_hw=tuple(i["image_hw"]))
        i.setdefault("autocast", i["precision"] != "fp32")  # recorded before the field; the Trainer autocasts
        b = estimate(EstimateInputs(**i))
        est = b.peak_reserved / MIB + context if "-z" in point else b.peak_total / MIB
        mean = sum(values) / len(values)
        out[point] = 100 * (est - mean) / mean
    return out, {k: len(v) for k, v in measured.items()}


@pytest.fixture(scope="module")
def errors() -> dict[str, float]:
    out, counts = _errors()
    rows = sorted(out.items(), key=lambda kv: kv[1])
    print("\n" + "\n".join(f"{k:32s} {v:+6.1f}%  ({counts[k]} runs)" for k, v in rows))
    return out


def test_the_grid_is_there(errors):
    _, counts = _errors()
    assert len(errors) == 39  # 34 from session 1; the two ZeRO-3 points and three more 2B points measured in session 5
    assert sum(n >= 2 for n in counts.values()) == 17  # session 5 re-ran 22 2B points; 5 of them were new


def test_every_point_within_10_percent(errors):
    assert {k: round(v, 1) for k, v in errors.items() if abs(v) > 10} == {}


def test_within_5_percent_count(errors):
    """Issue 3 asks for 90%. With every run counted it is 35 of 39 (89.7%), one point short: session 6's run of
    q2vl2b-qlora-gc0-b1-A moved its mean from +4.x% to +5.2% (its reserved memory was 6,196 and 6,476 MiB in two
    identical earlier runs; the estimate is 6,613). Session 5's count with three files was 36 of 39."""
    within = sum(abs(v) <= 5 for v in errors.values())
    assert within >= 35 and len(errors) == 39  # the misses: RESULTS.md sessions 5 and 6
    assert sum(abs(v) for v in errors.values()) / len(errors) < 2.5


def test_without_the_selected_rerun_one_point_short():
    """The five-point re-run was chosen for its misses; without it the grid is 35 of 39 within ±5% (89.7%)."""
    out, _ = _errors(FILES[:3])
    assert len(out) == 39 and sum(abs(v) <= 5 for v in out.values()) == 35


def test_zero2_full_fine_tuning_within_5_percent_at_the_reserved_level():
    """ZeRO-2 full fine-tuning on one GPU: the optimizer step's fp32 gradient, foreach temporary and 16-bit
    partition (DeepSpeed's 2 + 18/G estimator was 24.6% short)."""
    (row,) = [r for r in _rows() if r["id"] == "q2vl2b-full-gc1-b1-A-z2"]
    i = dict(row["inputs"], model=row["catalogue_model"], gpu=None, image_hw=tuple(row["inputs"]["image_hw"]))
    i.setdefault("autocast", True)
    b = estimate(EstimateInputs(**i))
    assert abs(b.peak_allocated / MIB - row["meas_alloc_mib"]) / row["meas_alloc_mib"] < 0.05
    assert abs(b.peak_reserved / MIB - row["meas_reserved_mib"]) / row["meas_reserved_mib"] < 0.05
