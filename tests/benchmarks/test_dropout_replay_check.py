"""benchmarks/dropout_replay_check.py: passes on the fused LoRA layer as it is, and fails where the mask drawn again
in backward is not the forward's."""

from __future__ import annotations

import torch

from benchmarks import dropout_replay_check
from vlmtune.speed import fused_lora


def test_passes_on_the_cpu(capsys):
    assert dropout_replay_check.main(["--tokens", "64", "--hidden", "32", "--out", "16", "--rank", "4"]) == 0
    assert capsys.readouterr().out.startswith("PASS")


def test_fails_when_backward_draws_another_mask(monkeypatch, capsys):
    def other_mask(x, p, state):
        return torch.native_dropout(x, p, True)  # from wherever the generator is now, not the forward's state

    monkeypatch.setattr(fused_lora, "_dropout_again", other_mask)
    assert dropout_replay_check.main(["--tokens", "64", "--hidden", "32", "--out", "16", "--rank", "4",
                                      "--p", "0.3"]) == 1
    assert capsys.readouterr().out.startswith("FAIL")
