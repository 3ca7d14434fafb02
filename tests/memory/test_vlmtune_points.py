"""The estimate against today's `vlmtune train` / engine runs with exact configurations (data/vlmtune_points.jsonl,
built by data/make_vlmtune_points.py from benchmarks/results/2026-11-24-speed, -multi-gpu, 2026-11-24b-session3 and
2026-11-24c-session4, 2026-12-07-session10; RESULTS.md, estimator calibration): the speed harness's vlmtune variants on an H100 (W1-W4), the
multi-GPU runs on H200s, the 1-GPU DeepSpeed offload runs on an H100 (nvidia-smi level), the 14 held-out calibration
points, and session 4's 1-GPU runs (7B full fine-tuning without DeepSpeed on an H100; ZeRO-3 + whole or partial
optimizer offload, offload_ratio / sub_group_size, on an H200; nvidia-smi level), and session 10's QLoRA runs loading
their weights from disk, capped to 8-16 GB cards (the configs `vlmtune recommend` wrote; nvidia-smi level), and
session 13's 21 runs with expandable segments (`s13-*`: `vlmtune recommend`'s configs for four models x 8-80 GB cards
and the speed harness's W2u lean QLoRA, one H100; added by benchmarks/preflight_points.py; nvidia-smi level).

Levels: `reserved+context` = max_memory_reserved + the calibration's measured CUDA context (762 MiB), as the grid's
points (the speed harness read the whole device, about 490 MiB more than its process: kept as meas_smi_device_mib);
`nvidia-smi` = the busiest GPU's nvidia-smi reading (multi-GPU, the DeepSpeed and NCCL memory outside PyTorch
included); `bound` = spread data whose measured batches are not known: the worst-case estimate must not be below.
`pytest tests/memory/test_vlmtune_points.py -s` prints the errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmtune.memory import EstimateInputs, estimate

DATA = Path(__file__).parent / "data" / "vlmtune_points.jsonl"
MIB = 1 << 20
CONTEXT_MIB = 762
BAND: dict[str, tuple[float, float]] = {
    # point -> (low, high) % allowed where a point cannot be held to ±5%; each says why (RESULTS.md, estimator).
    # ZeRO-3 LoRA with parameters offloaded: allocated is now within 5% (3.43 vs 3.61 GiB, the prefetcher's run-ahead
    # to stage3_max_live_parameters, memory/zero.py `_prefetched`; it was -24.5% before); reserved is 10% short (4.24
    # vs 4.72): two 594 MiB blocks the chunked loss leaves cached beside the gathered set are not modelled.
    "2b_lora_z3_offall": (-10.0, -5.0),
    # Checkpointed full fine-tuning of the Qwen2.5-VL-3B architecture (tied embeddings, micro-batch 1): measured
    # reserved is only 0.7 GiB above allocated, so the forward working set (mostly the chunked loss's lm_head
    # gradient blocks, 2.9 GiB) is not kept in segments of its own beside grads + foreach temporaries as in the 2B
    # runs (allocator._full_checkpointed_reserve); why the blocks are shared here is not derived.
    "3b_full_plain": (0.0, 10.0),
    "q25vl3b-full-gc1-b1-C": (0.0, 8.0),
    # Full fine-tuning without checkpointing at 1,601 tokens x 2: allocated +0.1%, reserved -6.4%: the fitted
    # FRAG_STATES/FRAG_FOREACH terms under-reserve at this longer sequence (1.6 GiB); no mechanism derived.
    "q2vl2b-full-gc0-b2-C": (-9.0, -3.0),
    # QLoRA's reserved-but-unused memory depends on how the weights were loaded. Allocated is within 2.4% in all three
    # (W2 lean +1.4%, q25_qlora_r8 -0.3%, llava7b_16gb +2.4%); reserved minus allocated is not: 0.07 GiB measured in
    # W2 lean's random-weight build (0.44 modelled), but 0.65-1.80 GiB in session 10's runs that load their weights
    # from disk as a user does (q25_qlora_r8 1.08, its reserved growing from 7.99 to 8.54 GiB between steps 2 and 4 on
    # batches of one length; llava7b_16gb 1.80 against 0.76 modelled). Not derived yet: benchmarks/gpu_allocator.sh
    # runs the from-disk points with expandable segments, the candidate fix (RESULTS.md, 2026-12-07).
    "W2-vlmtune_lean": (0.0, 7.0),
    "q25_qlora_r8": (-8.0, -5.0),
    "llava7b_16gb": (-8.0, -5.0),
}


def _points() -> list[dict]:
    return [json.loads(x) for x in DATA.read_text().splitlines() if x.strip()]


def _error(row: dict) -> float:
    i = dict(row["inputs"], image_hw=tuple(row["inputs"]["image_hw"]))
    b = estimate(EstimateInputs(**i))
    if row["level"] == "nvidia-smi":
        measured = row["meas_smi_device_mib"]
    else:
        measured = row["meas_reserved_mib"] + CONTEXT_MIB
    return 100 * (b.peak_total / MIB - measured) / measured


@pytest.fixture(scope="module")
def errors() -> dict[str, float]:
    out = {r["id"]: _error(r) for r in _points()}
    print("\n" + "\n".join(f"{k:32s} {v:+6.1f}%" for k, v in out.items()))
    return out


def test_the_points_are_there():
    rows = _points()
    assert len(rows) == 70
    assert sum(r["level"] != "bound" for r in rows) == 68


@pytest.mark.parametrize("row", [r for r in _points() if r["level"] != "bound"], ids=lambda r: r["id"])
def test_point_within_its_band(row):
    low, high = BAND.get(row["id"], (-5.0, 5.0))
    assert low <= _error(row) <= high


@pytest.mark.parametrize("row", [r for r in _points() if r["level"] == "bound"], ids=lambda r: r["id"])
def test_worst_case_estimate_is_an_upper_bound(row):
    assert 0 <= _error(row) <= 40


def test_lora_bf16_compute_does_not_change_the_activations():
    """Measured: W1x allocated 16.69 GiB with and without speed.lora_bf16_compute (autocast re-casts PEFT's fp32
    copy to 16-bit before lora_A; the dropout's 16-bit output is what is saved either way)."""
    (row,) = [r for r in _points() if r["id"] == "W1x-vlmtune_nogc"]
    i = EstimateInputs(**dict(row["inputs"], image_hw=tuple(row["inputs"]["image_hw"])))
    assert estimate(i).peak_allocated == estimate(i.with_(lora_16bit_inputs=False)).peak_allocated


def test_all_within_10_percent(errors):
    rows = {r["id"]: r for r in _points()}
    out = {k: round(v, 1) for k, v in errors.items() if rows[k]["level"] != "bound" and abs(v) > 10}
    assert {k: v for k, v in out.items() if k not in BAND} == {}


def test_checkpointed_full_fine_tuning_reserves_the_working_set_beside_grads_and_step_temporaries():
    """W4 (fused AdamW, no param-sized temporary) and the grid's q2vl2b-full-gc1-b4-A (foreach AdamW, same shape)
    reserved 16.77 and 19.90 GiB: the 3.1 GiB between them is foreach's temporary (2.9 GiB); the rest, 3.7 GiB above
    the grads, is the forward/backward working set that the first step's optimizer moments took over."""
    (row,) = [r for r in _points() if r["id"] == "W4-vlmtune_gc"]
    fused = EstimateInputs(**dict(row["inputs"], image_hw=tuple(row["inputs"]["image_hw"])))
    a, b = estimate(fused), estimate(fused.with_(optimizer="adamw_torch"))
    assert (b.peak_reserved - a.peak_reserved) / MIB == pytest.approx(1577802240 * 2 / MIB, rel=0.02)
    assert abs(a.peak_reserved / MIB - row["meas_reserved_mib"]) / row["meas_reserved_mib"] < 0.02
