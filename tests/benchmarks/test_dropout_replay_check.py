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


def test_the_hash_check_compares_compiled_with_eager(monkeypatch, capsys):
    """--hash: the hashed mask through torch.compile against eager (here dynamo with the eager backend: the CPU check
    needs no C compiler; the GPU run compiles it with inductor), and it fails when the two differ."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn: real(fn, backend="eager"))
    args = ["--tokens", "256", "--hidden", "512", "--out", "16", "--rank", "4", "--hash"]
    assert dropout_replay_check.main(args) == 0
    assert "PASS hashed dropout masks" in capsys.readouterr().out

    def flipped(fn):
        return lambda shape, seed, p, device: ~fn(shape, seed, p, device)

    monkeypatch.setattr(torch, "compile", flipped)
    assert dropout_replay_check.main(args) == 1
    assert "hash mask: compiled differs" in capsys.readouterr().out
