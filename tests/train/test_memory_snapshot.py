"""The GPU memory snapshot diagnostic: the summary of a synthetic allocator snapshot, its tables, and the callback
(a no-op without CUDA; with a faked CUDA allocator it writes the lines and the raw pickle)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from transformers import TrainerState

from vlmtune.errors import VlmtuneError
from vlmtune.train import memory_snapshot
from vlmtune.train.engine import _debug_callbacks
from vlmtune.train.memory_snapshot import MemorySnapshotCallback, format_markdown, summarise

SP = "/usr/lib/python3/dist-packages/"
DS = {
    "filename": "/venv/lib/python3.12/site-packages/deepspeed/runtime/zero/partition_parameters.py",
    "line": 1234,
    "name": "_partition_param",
}
LINEAR = {
    "filename": "/venv/lib/python3.12/site-packages/torch/nn/modules/linear.py",
    "line": 125,
    "name": "forward",
}
OURS = {"filename": "/work/main/src/vlmtune/train/trainer.py", "line": 88, "name": "compute_loss"}
ADAM = {"filename": SP + "torch/optim/adamw.py", "line": 300, "name": "_multi_tensor_adamw"}
CPP = {"filename": "??", "line": 0, "name": "c10::cuda::CUDACachingAllocator::malloc"}
STAGE3 = {"filename": SP + "deepspeed/runtime/zero/stage3.py", "line": 77, "name": "_create_fp16_partitions"}

DS_SITE = "deepspeed/runtime/zero/partition_parameters.py:1234 _partition_param"
OURS_SITE = "vlmtune/train/trainer.py:88 compute_loss"
ADAM_SITE = "torch/optim/adamw.py:300 _multi_tensor_adamw"


def block(state: str, size: int, *frames: dict) -> dict:
    return {"size": size, "requested_size": size - 16, "state": state, "frames": list(frames)}


def segment(kind: str, *blocks: dict, **extra) -> dict:
    allocated = sum(b["size"] for b in blocks if b["state"] == "active_allocated")
    total = sum(b["size"] for b in blocks)
    return {
        "total_size": total,
        "allocated_size": allocated,
        "active_size": allocated,
        "segment_type": kind,
        "address": 0,
        "stream": 0,
        "blocks": list(blocks),
        **extra,
    }


SNAPSHOT = {
    "segments": [
        segment(
            "large",
            block("active_allocated", 4096, LINEAR, DS, OURS),  # innermost non-torch frame: DeepSpeed's
            block("inactive", 2048),
            block("active_allocated", 1024, CPP, LINEAR, OURS),
        ),
        segment(
            "small",
            block("active_allocated", 512),  # no frames: made before history was recorded
            block("active_awaiting_free", 256, OURS),  # the segment's first block with frames
            block("inactive", 256),
        ),
        segment(
            "large",
            block("active_allocated", 8192, ADAM, OURS),  # torch's optimizers are a site of their own
            block("active_allocated", 1024, DS),
            block("inactive", 8192),
        ),
    ],
    "device_traces": [[]],
}


def test_summary_groups_bytes_by_site_and_segment_maker():
    s = summarise(SNAPSHOT)
    assert s["totals"] == {
        "segments": 3,
        "reserved": 7168 + 1024 + 17408,
        "allocated": 4096 + 1024 + 512 + 8192 + 1024,
        "requested": 4096 + 1024 + 512 + 8192 + 1024 - 5 * 16,
        "inactive": 2048 + 256 + 8192,
        "pending_free": 256,
    }
    assert s["by_site"] == [
        {"site": ADAM_SITE, "bytes": 8192, "blocks": 1},
        {"site": DS_SITE, "bytes": 5120, "blocks": 2},
        {"site": OURS_SITE, "bytes": 1024, "blocks": 1},
        {"site": "unknown", "bytes": 512, "blocks": 1},
    ]
    assert sum(r["bytes"] for r in s["by_site"]) == s["totals"]["allocated"]
    assert s["cached_by_segment_site"] == [
        {"site": ADAM_SITE, "bytes": 8192, "segments": 1},
        {"site": DS_SITE, "bytes": 2048, "segments": 1},
        {"site": OURS_SITE, "bytes": 256, "segments": 1},
    ]
    assert s["largest_segments"] == [
        {"total_size": 17408, "allocated_size": 9216, "inactive": 8192, "site": ADAM_SITE},
        {"total_size": 7168, "allocated_size": 5120, "inactive": 2048, "site": DS_SITE},
        {"total_size": 1024, "allocated_size": 512, "inactive": 256, "site": OURS_SITE},
    ]


def test_segment_frames_win_and_missing_frames_are_unknown():
    made = segment("large", block("inactive", 4096, OURS), frames=[LINEAR, STAGE3])
    bare = {"total_size": 64, "allocated_size": 64, "blocks": [{"size": 64, "state": "active_allocated"}]}
    s = summarise({"segments": [made, bare]})
    assert s["cached_by_segment_site"] == [
        {"site": "deepspeed/runtime/zero/stage3.py:77 _create_fp16_partitions", "bytes": 4096, "segments": 1}
    ]
    assert s["by_site"] == [{"site": "unknown", "bytes": 64, "blocks": 1}]
    assert summarise({})["totals"]["segments"] == 0


def test_markdown_names_the_sites():
    record = {
        "step": 2,
        "allocated": 3 * 1024**3,
        "reserved": 4 * 1024**3,
        "peak_allocated": 5 * 1024**3,
        "peak_reserved": 6 * 1024**3,
        "summary": summarise(SNAPSHOT),
    }
    text = format_markdown([record])
    assert "### step 2" in text
    assert "allocated 3.00 GiB, reserved 4.00 GiB" in text
    for name in (ADAM_SITE, DS_SITE, OURS_SITE, "unknown"):
        assert name in text


def _state(step: int) -> TrainerState:
    state = TrainerState()
    state.global_step = step
    return state


def test_callback_without_cuda_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "snapshot.jsonl"
    callback = MemorySnapshotCallback(path, steps=(1,), raw=True)
    callback.on_step_end(None, _state(1), None)
    callback.on_train_end(None, _state(1), None)
    assert not callback.recording
    assert list(tmp_path.iterdir()) == []


def test_callback_with_a_faked_allocator_writes_lines_and_the_raw_pickle(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: SNAPSHOT)
    for name, value in [
        ("memory_allocated", 10),
        ("memory_reserved", 20),
        ("max_memory_allocated", 30),
        ("max_memory_reserved", 40),
    ]:
        monkeypatch.setattr(torch.cuda, name, lambda v=value: v)
    monkeypatch.setattr(memory_snapshot, "_rank_zero", lambda: True)
    path = tmp_path / "snapshot.jsonl"
    callback = MemorySnapshotCallback(path, steps=(1, 3), raw=True)
    for step in (1, 2, 3):
        callback.on_step_end(None, _state(step), None)
    callback.on_train_end(None, _state(3), None)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["allocated"], r["peak_reserved"]) for r in lines] == [(1, 10, 40), (3, 10, 40)]
    assert lines[0]["summary"] == summarise(SNAPSHOT)
    assert pickle.loads(path.with_suffix(".pickle").read_bytes()) == SNAPSHOT
    assert calls[0]["max_entries"] == 200_000 and calls[-1] == {"enabled": None}


def test_engine_adds_the_callback_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on a GPU machine too: record nothing
    assert _debug_callbacks({}) == []
    assert _debug_callbacks({"VLMTUNE_MEMORY_SNAPSHOT": ""}) == []
    path = tmp_path / "s.jsonl"
    (callback,) = _debug_callbacks(
        {"VLMTUNE_MEMORY_SNAPSHOT": str(path), "VLMTUNE_MEMORY_SNAPSHOT_STEPS": "3, 5"}
    )
    assert isinstance(callback, MemorySnapshotCallback)
    assert (callback.path, callback.steps, callback.raw) == (path, (3, 5), False)
    with pytest.raises(VlmtuneError, match="VLMTUNE_MEMORY_SNAPSHOT_STEPS"):
        _debug_callbacks({"VLMTUNE_MEMORY_SNAPSHOT": str(path), "VLMTUNE_MEMORY_SNAPSHOT_STEPS": "one"})


def test_blocks_are_grouped_by_size_for_runs_without_history():
    mib = 2**20
    snap = {"segments": [segment("large", block("inactive", 3 * mib), block("inactive", 3 * mib),
                                 block("active_allocated", mib), block("inactive", 5 * mib))]}
    s = summarise(snap)
    assert s["inactive_by_size"] == [{"site": "3.0 MiB", "bytes": 6 * mib, "blocks": 2},
                                     {"site": "5.0 MiB", "bytes": 5 * mib, "blocks": 1}]
    assert s["allocated_by_size"] == [{"site": "1.0 MiB", "bytes": mib, "blocks": 1}]
    assert "| 3.0 MiB | 0.01 | 2 |" in format_markdown([{"step": 0, "allocated": 0, "reserved": 0,
                                                         "peak_allocated": 0, "peak_reserved": 0, "summary": s}])


def test_without_history_nothing_is_recorded_and_step_0_is_the_start(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: SNAPSHOT)
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, lambda: 1)
    monkeypatch.setattr(memory_snapshot, "_rank_zero", lambda: True)
    path = tmp_path / "s.jsonl"
    callback = memory_snapshot.from_env({"VLMTUNE_MEMORY_SNAPSHOT": str(path), "VLMTUNE_MEMORY_SNAPSHOT_STEPS": "0,2",
                                         "VLMTUNE_MEMORY_SNAPSHOT_HISTORY": "0"})
    callback.on_train_begin(None, _state(0), None)
    for step in (1, 2):
        callback.on_step_end(None, _state(step), None)
    callback.on_train_end(None, _state(2), None)
    assert calls == []  # no history: ZeRO-3's autograd functions fail while torch records stacks
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 2]


def test_timeline_finds_where_the_step_peaks_and_snapshots_there_next_step(tmp_path, monkeypatch):
    """A model of two blocks and a head, run for three steps with a fake allocator whose allocated memory grows
    inside block 1 of every step: step 2's timeline has its peak at block 1's exit, and step 3's snapshot is taken
    at that same event."""
    allocated = {"now": 0}
    taken = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: taken.append(allocated["now"]) or SNAPSHOT)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 99)
    for name in ("memory_reserved", "max_memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, lambda: 1)
    monkeypatch.setattr(memory_snapshot, "_rank_zero", lambda: True)

    class Grow(torch.nn.Module):
        def __init__(self, by):
            super().__init__()
            self.by = by

        def forward(self, x):
            allocated["now"] += self.by
            return x

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Grow(0), Grow(5 * 2**30)])
    model.lm_head = Grow(-5 * 2**30)
    path = tmp_path / "s.jsonl"
    callback = memory_snapshot.from_env({"VLMTUNE_MEMORY_SNAPSHOT": str(path), "VLMTUNE_MEMORY_SNAPSHOT_STEPS": "9",
                                         "VLMTUNE_MEMORY_SNAPSHOT_HISTORY": "0", "VLMTUNE_MEMORY_TIMELINE": "2"})
    callback.on_train_begin(None, _state(0), None, model=model)
    for step in (1, 2, 3):
        callback.on_step_begin(None, _state(step - 1), None)
        for layer in (*model.layers, model.lm_head):
            layer(torch.zeros(1))
        callback.on_pre_optimizer_step(None, _state(step - 1), None)
        callback.on_step_end(None, _state(step), None)
    callback.on_train_end(None, _state(3), None)
    timeline, at_peak = (json.loads(x) for x in path.read_text().splitlines())
    events = [r["event"] for r in timeline["timeline"]]
    assert timeline["step"] == 2 and events[:3] == ["step begin", "layers.0 in", "layers.0 out"]
    assert events[-2:] == ["before optimizer step", "step end"] and "lm_head in" in events
    assert at_peak["step"] == 3 and at_peak["at_peak"]["event"] == "layers.1 out"
    assert taken == [5 * 2**30] and at_peak["at_peak"]["summary"] == summarise(SNAPSHOT)
    text = format_markdown([timeline, at_peak])
    assert "| layers.1 out **peak** | 5.00 | +5.00 |" in text and "at `layers.1 out` (where step 2 peaked)" in text
    assert not model.layers[0]._forward_hooks  # detached at the end
    with pytest.raises(VlmtuneError, match="VLMTUNE_MEMORY_TIMELINE"):
        memory_snapshot.from_env({"VLMTUNE_MEMORY_SNAPSHOT": str(path), "VLMTUNE_MEMORY_TIMELINE": "yes"})
