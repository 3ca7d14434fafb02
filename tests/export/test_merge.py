"""Merging adapters (LoRA, and QLoRA into its 16-bit base) into standalone models that answer like the adapter."""

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
from vlmtune.export.predict import answer, load_for_inference
from vlmtune.families import get_family


def _batch(processor, red_data) -> dict[str, torch.Tensor]:
    family, cfg = get_family("qwen2_vl"), DataConfig()
    samples = [encode(r, processor, family, cfg) for r in read_records(red_data)[:2]]
    return Collator(processor.tokenizer.pad_token_id)(samples)


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model.eval()(**batch).logits.float()


@pytest.mark.slow
def test_merged_lora_equals_the_adapter_model(train_tiny, red_data, tmp_path):
    adapter = train_tiny("lora")  # with a fully trained projector saved alongside
    out = merge_adapter(adapter, tmp_path / "merged", dtype="float32")
    with_adapter = load_for_inference(adapter, device="cpu")
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    processor = get_family("qwen2_vl").load_processor(out)  # saved next to the model
    batch = _batch(processor, red_data)
    torch.testing.assert_close(
        _logits(merged, batch), _logits(with_adapter.model, batch), atol=1e-5, rtol=1e-5
    )

    image = read_records(red_data)[0].images[0]
    merged_loaded = load_for_inference(out, device="cpu")
    question = "What colour is the shape?"
    assert answer(merged_loaded, [image], question, 5) == answer(with_adapter, [image], question, 5)


@pytest.mark.slow
def test_qlora_adapter_merges_into_the_16bit_base(train_tiny, tiny_model_dir, red_data, tmp_path):
    adapter = train_tiny("qlora")
    out = merge_adapter(adapter, tmp_path / "merged")  # base recorded in adapter_config.json, loaded in bf16
    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert getattr(merged.config, "quantization_config", None) is None
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}

    # In float32 the merge is exact against the adapter applied to the unquantized base.
    out32 = merge_adapter(adapter, tmp_path / "merged32", dtype="float32")
    merged32 = AutoModelForImageTextToText.from_pretrained(out32, dtype=torch.float32)
    reference = load_for_inference(adapter, device="cpu", load_in_4bit=False, dtype="float32")
    batch = _batch(reference.processor, red_data)
    got = _logits(merged32, batch)
    torch.testing.assert_close(got, _logits(reference.model, batch), atol=1e-5, rtol=1e-5)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen2_vl"), dtype=torch.float32)
    assert (got - _logits(base, batch)).abs().max() > 1e-3  # the adapter did change the model


def test_merge_refuses_a_folder_without_an_adapter(tmp_path):
    with pytest.raises(VlmtuneError, match="not an adapter folder"):
        merge_adapter(tmp_path, tmp_path / "out")
