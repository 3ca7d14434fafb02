"""benchmarks/host_reads.py counts a training step's host reads of device values by call site; with
speed.vision_positions_on_cpu the Qwen2.5-VL tower's own reads (positions, windows, max lengths) are gone."""

from __future__ import annotations

import re

import torch


def _total(out: str) -> tuple[int, str]:
    return int(re.search(r"^\s*(\d+)\s+in all$", out, re.M).group(1)), out


def test_the_tower_reads_drop_to_the_grid_read(capsys):
    from benchmarks.host_reads import main
    from vlmtune.speed import varlen_attention as varlen

    original, usable = torch.Tensor.tolist, varlen._usable
    assert main(["--family", "qwen2_5_vl"]) == 0
    without, out_without = _total(capsys.readouterr().out)
    assert main(["--family", "qwen2_5_vl", "--vision-positions-on-cpu"]) == 0
    with_hook, out_with = _total(capsys.readouterr().out)
    assert torch.Tensor.tolist is original and varlen._usable is usable  # the counting and the stand-in are undone
    assert "get_vision_window_index" in out_without and "get_max_seqlen" in out_without
    assert "get_vision_" not in out_with and "get_max_seqlen" not in out_with
    assert re.search(r"^\s*1\s+tolist vision_positions\.py:\d+ hook$", out_with, re.M), out_with
    assert with_hook <= without - 6, (without, with_hook)
