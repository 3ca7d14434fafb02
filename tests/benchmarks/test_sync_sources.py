"""The sync report names the innermost line outside torch, counts only while recording, and leaves other warnings
alone."""

from __future__ import annotations

import traceback
import warnings

from benchmarks.speed.sync_sources import SyncRecorder, _StepSwitch, caller, report


def _frame(filename: str, lineno: int, name: str) -> traceback.FrameSummary:
    return traceback.FrameSummary(filename, lineno, name)


def test_caller_is_the_innermost_frame_outside_torch():
    frames = [
        _frame("/x/site-packages/transformers/trainer.py", 10, "training_step"),
        _frame("/x/site-packages/transformers/models/qwen2_vl/modeling_qwen2_vl.py", 879, "get_vision_position_ids"),
        _frame("/x/site-packages/torch/_tensor.py", 5, "tolist"),
        _frame("/usr/lib/python3.12/warnings.py", 1, "warn"),
    ]
    assert caller(frames) == "qwen2_vl/modeling_qwen2_vl.py:879 get_vision_position_ids"
    assert caller([_frame("/x/site-packages/torch/nn/functional.py", 1, "f")]) == "?"


def _sync_warning() -> None:
    warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)


def test_recorder_counts_only_sync_warnings_while_on():
    with SyncRecorder() as recorder:
        switch = _StepSwitch(recorder, skip=1)
        _sync_warning()  # step 0: not recorded
        switch.end()
        _sync_warning()
        _sync_warning()  # step 1: recorded, twice from the same line
        switch.end()
        _sync_warning()  # after: not recorded
        with warnings.catch_warnings(record=True) as other:
            warnings.simplefilter("always")
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert sum(recorder.counts.values()) == 2
    ((where, n),) = recorder.counts.items()
    assert n == 2 and "test_sync_sources.py" in where and "_sync_warning" in where
    assert [str(w.message) for w in other] == ["something else"]
    text = report(recorder.counts, "W1 test")
    assert "2 synchronizing CUDA calls" in text and "_sync_warning" in text
