"""Qwen-VL through predict and export: a trained LoRA adapter answers (one image or two), and its merge is a
standalone model in the Hub layout (config.json with the original auto_map and architectures, the checkpoint's
weight names, qwen.tiktoken and the remote tokenizer config) that answers like the adapter."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from vlmtune.config.schema import DataConfig
from vlmtune.data.collate import Collator
from vlmtune.data.processing import encode
from vlmtune.data.records import read_records
from vlmtune.export.merge import merge_adapter
from vlmtune.export.predict import answer, load_for_inference, predict_file
from vlmtune.families import get_family

QUESTION = "What colour is the shape?"


@pytest.mark.slow
def test_trained_qwen_vl_predicts_and_merges_in_the_hub_layout(train_tiny, red_data, tmp_path):
    adapter = train_tiny("lora", steps=15, family="qwen_vl")
    loaded = load_for_inference(adapter, device="cpu")
    assert loaded.family.name == "qwen_vl"
    result = predict_file(loaded, red_data, tmp_path / "predictions.jsonl", max_new_tokens=5)
    assert (result.total, result.correct) == (8, 8)
    image = read_records(red_data)[0].images[0]
    assert answer(loaded, [image], QUESTION, max_new_tokens=5) == "red"
    assert isinstance(answer(loaded, [image, image], QUESTION, max_new_tokens=5), str)  # Picture 1, Picture 2

    out = merge_adapter(adapter, tmp_path / "merged", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen" and config["architectures"] == ["QWenLMHeadModel"]
    assert config["auto_map"] == {"AutoConfig": "configuration_qwen.QWenConfig",
                                  "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
    keys = set(load_file(out / "model.safetensors"))
    assert "transformer.h.0.attn.c_attn.weight" in keys and "transformer.visual.attn_pool.query" in keys
    assert not any("lora" in k or "base_model" in k or "modules_to_save" in k for k in keys)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_qwen.QWenTokenizer"
    base = loaded.processor.vocab_file.parent
    assert (out / "qwen.tiktoken").read_bytes() == (base / "qwen.tiktoken").read_bytes()

    merged = load_for_inference(out, device="cpu")
    assert answer(merged, [image], QUESTION, max_new_tokens=5) == "red"
    samples = [encode(r, merged.processor, merged.family, DataConfig()) for r in read_records(red_data)[:2]]
    batch = Collator(merged.processor.tokenizer.pad_token_id)(samples)
    plain = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, loaded.model.eval()(**batch).logits.float(), atol=1e-4,
                                   rtol=1e-4)


def test_saving_carries_the_checkpoints_remote_code_files(tiny_model_dir, tmp_path):
    """A downloaded checkpoint has the remote-code files its auto_map names; what vlmtune saves from it keeps them
    (vlmtune never imports them), so the original code loads the export as it loaded the checkpoint."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir("qwen_vl"), base)
    (base / "modeling_qwen.py").write_text("# the checkpoint's own code\n")
    processor = get_family("qwen_vl").load_processor(base)
    processor.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "modeling_qwen.py").read_text() == "# the checkpoint's own code\n"
    assert not (tmp_path / "out" / "visual.py").exists()  # only what the source folder has
