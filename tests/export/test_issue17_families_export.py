"""Qwen3.5, InternVL and Llama 3.2 Vision through predict and export: a trained LoRA adapter answers through
generation (Qwen3.5: its DeltaNet layers' recurrent cache, the prompt ending in the empty thinking block; InternVL:
tiles; Mllama: cross-attention to the images, whose mask generation extends), and merged into its base gives the
adapter's logits and answers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmtune.config.schema import DataConfig
from vlmtune.data.collate import Collator
from vlmtune.data.processing import encode
from vlmtune.data.records import read_records
from vlmtune.export.merge import merge_adapter
from vlmtune.export.predict import answer, load_for_inference, predict_file

QUESTION = "What colour is the shape?"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_5", "internvl", "mllama"])
def test_trained_adapter_predicts_and_merges(train_tiny, red_data, tmp_path, family):
    adapter = train_tiny("lora", steps=15, family=family)
    loaded = load_for_inference(adapter, device="cpu")
    assert loaded.family.name == family
    result = predict_file(loaded, red_data, tmp_path / "predictions.jsonl", max_new_tokens=5)
    assert (result.total, result.correct) == (8, 8)

    image = read_records(red_data)[0].images[0]
    reply = answer(loaded, [image], QUESTION, max_new_tokens=5)
    assert reply == "red"

    out = merge_adapter(adapter, tmp_path / "merged", dtype="float32")
    merged = load_for_inference(out, device="cpu")
    assert not any("lora" in name or "modules_to_save" in name for name, _ in merged.model.named_parameters())
    assert answer(merged, [image], QUESTION, max_new_tokens=5) == reply
    samples = [encode(r, merged.processor, merged.family, DataConfig()) for r in read_records(red_data)[:2]]
    batch = Collator(merged.processor.tokenizer.pad_token_id)(samples)
    plain = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, loaded.model.eval()(**batch).logits.float(), atol=1e-4,
                                   rtol=1e-4)
