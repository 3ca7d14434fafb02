"""Qwen3-VL results leave the engine like the others: a LoRA adapter whose trained projector includes the DeepStack
mergers (a module list, saved by its items) merges into a standalone model that gives the adapter's logits and
answers, through generation with interleaved M-RoPE."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmtune.data.collate import Collator
from vlmtune.data.processing import encode
from vlmtune.data.records import read_records
from vlmtune.export.merge import merge_adapter
from vlmtune.export.predict import answer, load_for_inference
from vlmtune.train.engine import train


@pytest.mark.slow
def test_lora_with_deepstack_projector_merges_and_answers(run_config, tmp_path):
    config = run_config("qwen3_vl", "lora", out=tmp_path / "run", lora={"dropout": 0.0, "train_projector": True})
    adapter = train(config).final_dir
    with_adapter = load_for_inference(adapter, device="cpu")
    names = [n for n, _ in with_adapter.model.named_parameters()]
    assert any("deepstack_merger_list" in n and "modules_to_save" in n for n in names), "DeepStack mergers not saved"

    out = merge_adapter(adapter, tmp_path / "merged", dtype="float32")
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    merged_loaded = load_for_inference(out, device="cpu")
    records = read_records(config.data.train_path)[:2]
    samples = [encode(r, merged_loaded.processor, merged_loaded.family, config.data) for r in records]
    batch = Collator(merged_loaded.processor.tokenizer.pad_token_id)(samples)
    with torch.no_grad():
        got = merged.eval()(**batch).logits.float()
        expected = with_adapter.model.eval()(**batch).logits.float()
        base = load_for_inference(config.model.name_or_path, device="cpu").model.eval()(**batch).logits.float()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - base).abs().max() > 1e-3

    image, question = records[0].images[0], "What colour is the shape?"
    reply = answer(merged_loaded, [image], question, 4)
    assert isinstance(reply, str) and reply == answer(with_adapter, [image], question, 4)
