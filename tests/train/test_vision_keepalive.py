"""The mixed-batch fix in one process, for every family: a batch without images runs the vision tower (before the
language model, as a batch with images does) and adds an exact zero to the loss; a batch with images is untouched."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmtune.config.schema import DataConfig
from vlmtune.data.collate import Collator
from vlmtune.data.processing import encode
from vlmtune.data.records import read_records
from vlmtune.families import get_family
from vlmtune.train.vision_keepalive import VisionKeepAlive


@pytest.mark.parametrize("family_name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava"])
def test_text_only_batch_runs_the_vision_tower_first(family_name, tiny_model_dir, shapes_data):
    family = get_family(family_name)
    path = tiny_model_dir(family_name)
    processor = family.load_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    model.requires_grad_(True)
    records = read_records(shapes_data[0])[:2]
    collate = Collator(processor.tokenizer.pad_token_id)
    with_images = collate([encode(r, processor, family, DataConfig()) for r in records])
    text_only = {k: v for k, v in with_images.items() if k in ("input_ids", "attention_mask", "labels")}
    text_only["input_ids"] = text_only["input_ids"].masked_fill(
        text_only["input_ids"] == model.config.image_token_id, processor.tokenizer.pad_token_id)

    keep = VisionKeepAlive(processor.image_processor, family.language_prefixes).attach(model)
    order: list[str] = []
    vision = model.get_submodule(family.vision_prefixes[0])
    language = model.get_submodule(family.language_prefixes[0])
    vision.register_forward_pre_hook(lambda *a: order.append("vision"))
    language.register_forward_pre_hook(lambda *a: order.append("language"))  # runs after keep's own pre-hook

    with torch.no_grad():
        plain_loss = model(**text_only).loss  # not armed: no extra work
    assert order == ["language"]

    order.clear()
    keep.arm(text_only)
    loss = model(**text_only).loss
    assert order == ["vision", "language"]  # the order of a batch with images: ZeRO-3 gathers match
    assert loss.item() == plain_loss.item()  # 0 x the tower's output, inside the model's own loss
    loss.backward()
    assert any(p.grad is not None for p in vision.parameters())  # gradient reduce runs for the tower too

    order.clear()
    keep.arm(with_images)
    model(**with_images)
    assert order == ["vision", "language"]  # its own images, no blank one
    keep.remove()


def test_mllama_text_only_batch_stops_a_multi_process_run(tiny_model_dir):
    """Mllama's text model skips its cross-attention layers without images, so running its tower alone would not keep
    the processes in step: the keep-alive stops such a batch with the family's message (capability `zero3`)."""
    from vlmtune.errors import VlmtuneError

    family = get_family("mllama")
    path = tiny_model_dir("mllama")
    processor = family.load_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    keep = VisionKeepAlive(processor.image_processor, family.language_prefixes, family.image_features).attach(model)
    ids = processor.tokenizer("Say hello.", return_tensors="pt")["input_ids"]
    keep.arm({"input_ids": ids})
    with pytest.raises(VlmtuneError, match="mllama: a micro-batch without images on one of several processes: .*"
                                           "Give every record an image"):
        model(input_ids=ids)
    keep.remove()
    assert "every micro-batch needs an image" in family.capabilities["zero3"].note
