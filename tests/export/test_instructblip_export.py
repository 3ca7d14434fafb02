"""InstructBLIP through predict and export: generation gets the Q-Former's text input (the question), a merged
LoRA adapter answers like the adapter, and a question with two images is refused with the reason."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmtune.config.schema import DataConfig
from vlmtune.data.collate import Collator
from vlmtune.data.processing import encode
from vlmtune.data.records import read_records
from vlmtune.errors import VlmtuneError
from vlmtune.export.merge import merge_adapter
from vlmtune.export.predict import answer, load_for_inference, predict_file

QUESTION = "What colour is the shape?"


@pytest.mark.slow
def test_trained_instructblip_predicts_and_merges(train_tiny, red_data, tmp_path):
    adapter = train_tiny("lora", steps=15, family="instructblip")
    loaded = load_for_inference(adapter, device="cpu")
    assert loaded.family.name == "instructblip"
    result = predict_file(loaded, red_data, tmp_path / "predictions.jsonl", max_new_tokens=5)
    assert (result.total, result.correct) == (8, 8)

    image = read_records(red_data)[0].images[0]
    assert answer(loaded, [image], QUESTION, max_new_tokens=5) == "red"
    with pytest.raises(VlmtuneError, match="one image per sample|exactly one image"):
        answer(loaded, [image, image], QUESTION, max_new_tokens=5)

    out = merge_adapter(adapter, tmp_path / "merged", dtype="float32")
    merged = load_for_inference(out, device="cpu")
    assert not any("lora" in name for name, _ in merged.model.named_parameters())
    assert answer(merged, [image], QUESTION, max_new_tokens=5) == "red"
    samples = [encode(r, merged.processor, merged.family, DataConfig()) for r in read_records(red_data)[:2]]
    batch = Collator(merged.processor.tokenizer.pad_token_id)(samples)
    plain = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, loaded.model.eval()(**batch).logits.float(), atol=1e-4,
                                   rtol=1e-4)
