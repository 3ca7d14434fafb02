"""speed.positions_in_collator: padded batches carry the model's own M-RoPE position ids, computed by the collator
(in the data loader's workers); the forward then skips its own computation and gives the same loss and gradients."""

from __future__ import annotations

import pytest
import torch
from speed_helpers import assert_same, lora_model, loss_and_grads

from vlmtune.data.collate import Collator
from vlmtune.data.packing import rope_index_of


@pytest.mark.parametrize("family_name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_collator_positions_are_the_models_and_change_nothing(tiny_model_dir, encoded, family_name, monkeypatch):
    processor, samples = encoded(family_name)
    pad = processor.tokenizer.pad_token_id
    model = lora_model(tiny_model_dir(family_name), family_name)
    rope = rope_index_of(model)
    plain = Collator(pad)(samples)
    with_positions = Collator(pad, rope_index=rope)(samples)
    assert "position_ids" not in plain
    positions = with_positions["position_ids"]
    assert positions.shape == (3, *plain["input_ids"].shape)
    reference = loss_and_grads(model, plain)
    # the forward must use the collator's positions: count the model's own computations
    owner = next(m for m in model.modules() if callable(getattr(m, "get_rope_index", None)))
    calls = []
    original = owner.get_rope_index
    monkeypatch.setattr(owner, "get_rope_index", lambda *a, **k: calls.append(1) or original(*a, **k))
    got = loss_and_grads(model, with_positions)
    assert calls == []
    assert_same(reference, got, rel=1e-6, cosine=0.99999)
    loss_and_grads(model, plain)
    assert calls  # without them the model computes its own (the spy works)
    # positions differ per sample: images take one position per merged patch row / column, padding is left alone
    assert not torch.equal(positions[1], positions[0]) and positions.dtype == torch.long


def test_families_without_mrope_get_no_positions(tiny_model_dir, encoded):
    from transformers import AutoModelForImageTextToText

    processor, samples = encoded("llava")
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("llava"))
    assert rope_index_of(model) is None
    assert "position_ids" not in Collator(processor.tokenizer.pad_token_id, rope_index=None)(samples)
