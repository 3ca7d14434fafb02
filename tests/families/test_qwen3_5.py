"""What is special about Qwen3.5, on its tiny model (one gated-DeltaNet layer, one gated-attention layer): the
non-thinking template and its labels token by token, LoRA sets on both layer kinds, padded batches equal to single
samples through the linear-attention layers, packing with those layers run per sample, the kernel note, the
image-token rule of the full-size processor against the estimator's, and the 9B architecture against the
catalogue."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmtune.config.schema import DataConfig, VlmtuneConfig
from vlmtune.data.collate import Collator
from vlmtune.data.processing import IGNORE_INDEX, count_tokens, encode
from vlmtune.data.records import ImagePart, Message, Record, TextPart
from vlmtune.families import get_family

FAMILY = get_family("qwen3_5")
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
THINK_OFF = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    path = tiny_model_dir("qwen3_5")
    return AutoModelForImageTextToText.from_pretrained(path).eval(), FAMILY.load_processor(path, DataConfig())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("q35-images")
    Image.new("RGB", (80, 60), "red").save(folder / "a.png")
    Image.new("RGB", (40, 90), "blue").save(folder / "b.png")
    return folder / "a.png", folder / "b.png"


def _conversation(images: tuple[Path, Path]) -> Record:
    a, b = images
    return Record(5, [
        Message("system", [TextPart("Be brief.")]),
        Message("user", [ImagePart(a), TextPart("What colour?")]),
        Message("assistant", [TextPart("red")]),
        Message("user", [TextPart("And this?"), ImagePart(b)]),
        Message("assistant", [TextPart("blue")]),
    ])


def test_the_tiny_model_has_both_layer_kinds(tiny):
    model, _ = tiny
    assert model.config.text_config.layer_types == ["linear_attention", "full_attention"]
    layers = model.model.language_model.layers
    assert hasattr(layers[0], "linear_attn") and hasattr(layers[1], "self_attn")
    assert not hasattr(model.model.visual, "deepstack_merger_list")


def test_prompt_and_labels_token_by_token(tiny, images):
    _, processor = tiny
    tok = processor.tokenizer
    record = _conversation(images)
    rendered = processor.apply_chat_template(record.to_chat(), tokenize=False)
    assert rendered == (f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{IMAGE}What colour?<|im_end|>\n"
                        f"<|im_start|>assistant\n{THINK_OFF}red<|im_end|>\n<|im_start|>user\nAnd this?{IMAGE}"
                        f"<|im_end|>\n<|im_start|>assistant\n{THINK_OFF}blue<|im_end|>\n")
    prompt = processor.apply_chat_template(record.to_chat()[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(f"<|im_start|>assistant\n{THINK_OFF}")  # predict generates after the same block

    sample = encode(record, processor, FAMILY, DataConfig())
    pad = "<|image_pad|>"
    n_a, n_b = FAMILY.image_token_count(60, 80, processor), FAMILY.image_token_count(90, 40, processor)
    pieces = [(f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>{pad * n_a}"
               f"<|vision_end|>What colour?<|im_end|>\n<|im_start|>assistant\n{THINK_OFF}", False),
              ("red<|im_end|>", True),
              (f"\n<|im_start|>user\nAnd this?<|vision_start|>{pad * n_b}<|vision_end|><|im_end|>\n"
               f"<|im_start|>assistant\n{THINK_OFF}", False),
              ("blue<|im_end|>", True), ("\n", False)]
    ids, labels = [], []
    for text, labelled in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if labelled else [IGNORE_INDEX] * len(piece)
    assert sample.input_ids.tolist() == ids and sample.labels.tolist() == labels
    assert tok.convert_ids_to_tokens([i for i in labels if i != IGNORE_INDEX]).count("</think>") == 0
    assert count_tokens(record, processor, FAMILY, DataConfig()) == len(sample)


@pytest.mark.parametrize("kind, full, linear", [("minimal", {"q_proj", "v_proj", "o_proj"},
                                                  {"in_proj_qkv", "out_proj"}),
                                                 ("attention", {"q_proj", "k_proj", "v_proj", "o_proj"},
                                                  {"in_proj_qkv", "out_proj", "in_proj_z"})])
def test_lora_sets_reach_both_layer_kinds(tiny, kind, full, linear):
    model, _ = tiny
    regex = FAMILY.lora_target_regex(kind)
    hits = [n for n, _ in model.named_modules() if re.fullmatch(regex, n)]
    by_layer = {0: set(), 1: set()}
    for name in hits:
        layer = int(name.split(".")[3])
        by_layer[layer].add(name.rsplit(".", 1)[-1])
    assert by_layer == {0: linear, 1: full}
    mlp = {"gate_proj", "up_proj", "down_proj"}
    all_hits = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if re.fullmatch(FAMILY.lora_target_regex("all"), n)}
    assert all_hits == full | linear | {"in_proj_z"} | mlp | {"k_proj"}
    assert not {"in_proj_a", "in_proj_b"} & all_hits  # one scalar per value head: left out


def test_padded_batch_equals_single_samples(tiny, images):
    """Right padding through the gated DeltaNet layer: the padded rows' logits are each sample's on its own."""
    model, processor = tiny
    a, _ = images
    records = [Record(1, [Message("user", [ImagePart(a), TextPart("Colour?")]), Message("assistant", [TextPart("red")])]),
               _conversation(images)]
    samples = [encode(r, processor, FAMILY, DataConfig()) for r in records]
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    with torch.no_grad():
        out = model(**batch).logits
        for row, sample in enumerate(samples):
            inputs = sample.model_inputs()
            inputs.pop("labels")
            torch.testing.assert_close(out[row, : len(sample)], model(**inputs).logits[0], atol=1e-4, rtol=1e-4)


def test_packing_runs_the_deltanet_layers_per_sample(tiny):
    config = VlmtuneConfig.model_validate({"model": {"name_or_path": "x"}, "speed": {"packing": True}})
    assert FAMILY.check(config) == []
    assert FAMILY.packed_span_modules == ("linear_attn",) and FAMILY.packed_row_attention == "per_sample"
    # Why: two texts in one row with positions restarting and no cache (what packing sends) give the second a
    # different output than on its own, even with the attention layer per sample span, because the DeltaNet layer's
    # state runs on from the first; with that layer run per span too the packed sample is its own again.
    from vlmtune.speed.packed_attention import packed_attention
    from vlmtune.speed.span_layers import span_layers

    model, processor = tiny
    first = processor.tokenizer("What colour is the square?", return_tensors="pt")["input_ids"]
    second = processor.tokenizer("The circle is red.", return_tensors="pt")["input_ids"]
    row = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(first.shape[1]), torch.arange(second.shape[1])])[None]
    spans = packed_attention(model, FAMILY.language_prefixes)
    try:
        with torch.no_grad():
            alone = model(input_ids=second).logits[0]
            leaked = model(input_ids=row, position_ids=positions, use_cache=False).logits[0, first.shape[1]:]
            per_span = span_layers(model, FAMILY.packed_span_modules, FAMILY.language_prefixes)
            packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0, first.shape[1]:]
            per_span.remove()
    finally:
        spans.remove()
    assert not torch.allclose(leaked, alone, atol=1e-3)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_missing_kernels_are_a_note_not_a_problem(monkeypatch):
    import importlib.util

    config = VlmtuneConfig.model_validate({"model": {"name_or_path": "x"}})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("fla", "causal_conv1d")
                        else real(name, *a))
    notes = FAMILY.notes(config)
    assert FAMILY.check(config) == []
    assert len(notes) == 1 and "fla, causal_conv1d not installed" in notes[0] and "PyTorch reference" in notes[0]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert FAMILY.notes(config) == []
    assert "flash-linear-attention" in FAMILY.capabilities["linear_attention_kernels"].note


SIZES = [(448, 448), (1080, 1920), (37, 900), (3000, 200), (10, 10), (256, 255), (4000, 3000)]


@pytest.fixture(scope="module")
def full_size_processor(tmp_path_factory):
    return FAMILY.load_processor(FAMILY.build_tiny(tmp_path_factory.mktemp("q35-9b"), arch="9b"), DataConfig())


@pytest.mark.parametrize("height, width", SIZES)
def test_image_tokens_equal_the_processors_and_the_estimators(full_size_processor, height, width):
    from vlmtune.memory.catalogue import lookup_model
    from vlmtune.memory.image_tokens import image_cost

    processor = full_size_processor
    out = processor(text=[IMAGE], images=[Image.new("RGB", (width, height))], return_tensors="pt")
    tokens = int((out["input_ids"] == processor.image_token_id).sum())
    assert FAMILY.image_token_count(height, width, processor) == tokens
    assert image_cost(lookup_model("Qwen/Qwen3.5-9B").image, height, width).llm_tokens == tokens
    assert int(out["image_grid_thw"].prod()) == tokens * 4  # 16 px patches, 2x2 merged


def test_the_9b_architecture_is_the_catalogues(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.memory.catalogue import lookup_model
    from vlmtune.memory.params import count_params

    spec = lookup_model("Qwen/Qwen3.5-9B")
    assert spec.model_type == "qwen3_5" and count_params(spec).total == spec.params
    config = AutoConfig.from_pretrained(FAMILY.build_tiny(tmp_path / "9b", arch="9b"))
    assert config.text_config.layer_types.count("full_attention") == 8  # every fourth of 32
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == spec.params
