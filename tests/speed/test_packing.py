"""Padding-free packing: the loss (and LoRA gradients) of packed rows equal those of the same samples padded, per
family; positions restart per sample; the bin packer respects its budget."""

from __future__ import annotations

import random

import pytest
import torch
from speed_helpers import assert_same, lora_model, loss_and_grads
from transformers import AttentionInterface

from vlmtune.data.collate import Collator
from vlmtune.data.packing import PackedDataset, PackingCollator, pack_bins, rope_index_of
from vlmtune.data.processing import IGNORE_INDEX
from vlmtune.families import get_family
from vlmtune.speed.loss_hook import unwrap_peft
from vlmtune.speed.packed_attention import NAME, packed_attention, packed_sdpa_attention
from vlmtune.speed.span_layers import span_layers

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "smolvlm", "internvl", "qwen3_vl_moe", "qwen3_5"]


def test_pack_bins_budget_and_coverage():
    rng = random.Random(0)
    lengths = [rng.randint(5, 600) for _ in range(300)] + [900]
    bins = pack_bins(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert sum(lengths) / (len(bins) * 1024) > 0.95  # first-fit decreasing wastes little
    assert pack_bins([2000, 10], 1024) == [[0], [1]]  # an over-long sample gets its own bin
    assert all(b == sorted(b) for b in bins)


@pytest.mark.parametrize("attention", ["mask", "spans"])
@pytest.mark.parametrize("family_name", FAMILIES)
def test_packed_equals_padded(tiny_model_dir, encoded, family_name, attention):
    """mask: transformers' block-diagonal mask; spans: vlmtune's causal SDPA per sample (speed.packed_attention).
    Layers that carry state along the sequence (`packed_span_modules`) run per sample span, as apply_speed sets."""
    processor, samples = encoded(family_name)
    pad = processor.tokenizer.pad_token_id
    model = lora_model(tiny_model_dir(family_name), family_name)
    padded_batch = Collator(pad)(samples)
    padded = loss_and_grads(model, padded_batch)
    family = get_family(family_name)
    per_span = span_layers(unwrap_peft(model), family.packed_span_modules, family.language_prefixes)
    assert isinstance(per_span, str) != bool(family.packed_span_modules)
    collate = PackingCollator(pad, rope_index_of(model))
    one_row = collate(samples)
    two_rows = collate([samples[:3], samples[3:]])  # rows of different lengths: the shorter one is padded
    assert "attention_mask" not in one_row and one_row["input_ids"].shape == (1, sum(len(s) for s in samples))
    handle, spans = None, []
    if attention == "spans":
        handle = packed_attention(unwrap_peft(model), get_family(family_name).language_prefixes)
        assert not isinstance(handle, str)

        def spy(module, query, key, value, attention_mask, **kwargs):
            spans.append(attention_mask is None)
            return packed_sdpa_attention(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(NAME, spy)
    assert_same(padded, loss_and_grads(model, one_row), rel=1e-4, cosine=0.999)
    assert_same(padded, loss_and_grads(model, two_rows), rel=1e-4, cosine=0.999)
    if handle is not None:  # padded batches still work (plain SDPA with their mask), and the spans were used
        assert_same(padded, loss_and_grads(model, padded_batch), rel=1e-6, cosine=0.9999)
        handle.remove()
        AttentionInterface.register(NAME, packed_sdpa_attention)
        assert any(spans) and not all(spans)
    if not isinstance(per_span, str):
        per_span.remove()


@pytest.mark.parametrize("family_name", ["qwen2_vl", "llava"])
def test_positions_restart_per_sample(tiny_model_dir, encoded, family_name):
    from transformers import AutoModelForImageTextToText

    processor, samples = encoded(family_name)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir(family_name))
    rope = rope_index_of(model)
    assert (rope is None) == (family_name == "llava")
    batch = PackingCollator(processor.tokenizer.pad_token_id, rope)(samples)
    positions, labels, start = batch["position_ids"], batch["labels"][0], 0
    for sample in samples:
        end = start + len(sample)
        assert labels[start] == IGNORE_INDEX
        assert torch.equal(labels[start + 1 : end], sample.labels[1:])
        if rope is None:
            assert torch.equal(positions[0, start:end], torch.arange(len(sample)))
        else:  # text row, then the M-RoPE rows exactly as the model computes them for the sample alone
            inputs = sample.model_inputs()
            alone, _ = rope(
                input_ids=inputs["input_ids"],
                mm_token_type_ids=inputs["mm_token_type_ids"],
                image_grid_thw=inputs.get("image_grid_thw"),
                attention_mask=None,
            )
            assert torch.equal(positions[0, 0, start:end], torch.arange(len(sample)))
            assert torch.equal(positions[1:, 0, start:end], alone[:, 0])
        start = end


def test_packed_dataset_items(encoded):
    _, samples = encoded("qwen2_vl")

    class Base(list):
        lengths = [len(s) for s in samples]

    packed = PackedDataset.from_dataset(Base(samples), budget=120)
    assert sum(len(packed[i]) for i in range(len(packed))) == len(samples)
    assert all(sum(len(s) for s in packed[i]) <= 120 for i in range(len(packed)))


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _worst_logits(model, batch: dict, rows: list[list[int]], samples, reference) -> float:
    """Largest logit difference between each packed row of `batch` (its samples `rows[r]`, in order) and the same
    samples' logits in `reference` (their padded run)."""
    logits, diff = _logits(model, batch), 0.0
    for r, members in enumerate(rows):
        got = logits[r, : sum(len(samples[i]) for i in members)]
        want = torch.cat([reference[i] for i in members])
        diff = max(diff, (got - want).abs().max().item())
    return diff

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gemma3_packed_logits_equal_padded(tiny_model_dir, encoded, attn):
    """Gemma 3 builds its packed rows' masks itself (image tokens bidirectional within their image, samples apart,
    the sliding window on row indices). The loss of the random tiny model hardly moves when an image loses its
    bidirectional attention, so the logits of every sample are compared: packed (one row; two rows, the shorter one
    padded) against the same samples padded. Controls: transformers' own packed mask, and the family's masks without
    the image blocks (token_type_ids zeroed), miss by far more than the tolerance."""
    from transformers import AutoModelForImageTextToText

    from vlmtune.speed.family_mask import family_packed_masks

    family = get_family("gemma3")
    processor, samples = encoded("gemma3")
    pad = processor.tokenizer.pad_token_id
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("gemma3"), attn_implementation=attn).eval()
    window = model.config.text_config.sliding_window
    images = [int(s.sequence["token_type_ids"].sum()) for s in samples]
    assert max(len(s) for s in samples) > window and 0 in images and sum(n > 0 for n in images) >= 3
    padded = _logits(model, Collator(pad)(samples))
    reference = [padded[i, : len(s)] for i, s in enumerate(samples)]
    collate = PackingCollator(pad)

    def worst(batch: dict, rows: list[list[int]]) -> float:
        return _worst_logits(model, batch, rows, samples, reference)

    one, two = [[0, 1, 2, 3, 4]], [[0, 1, 2], [3, 4]]
    one_row, two_rows = collate(samples), collate([samples[:3], samples[3:]])
    assert "token_type_ids" in one_row and torch.equal(one_row["token_type_ids"][0].sum(), torch.tensor(sum(images)))
    transformers_mask = worst(one_row, one)
    handle = family_packed_masks(model, family)
    assert not isinstance(handle, str)
    try:
        assert worst(one_row, one) < 1e-5
        assert worst(two_rows, two) < 1e-5
        no_blocks = worst(dict(one_row, token_type_ids=torch.zeros_like(one_row["token_type_ids"])), one)
        assert worst(Collator(pad)(samples), [[0]]) == 0.0  # padded batches keep the model's own masks
    finally:
        handle.remove()
    assert transformers_mask > 1e-2 and no_blocks > 1e-2, (transformers_mask, no_blocks)


def test_gemma3_packed_loss_equals_padded(tiny_model_dir, encoded):
    """The training-level check of the other families: loss and LoRA gradients of packed rows (the family's masks
    installed as `apply_speed` does) equal those of the same samples padded."""
    from vlmtune.speed.family_mask import family_packed_masks

    processor, samples = encoded("gemma3")
    pad = processor.tokenizer.pad_token_id
    model = lora_model(tiny_model_dir("gemma3"), "gemma3")
    padded = loss_and_grads(model, Collator(pad)(samples))
    handle = family_packed_masks(unwrap_peft(model), get_family("gemma3"))
    assert not isinstance(handle, str)
    collate = PackingCollator(pad, rope_index_of(model))
    try:
        assert_same(padded, loss_and_grads(model, collate(samples)), rel=1e-4, cosine=0.999)
        assert_same(padded, loss_and_grads(model, collate([samples[:3], samples[3:]])), rel=1e-4, cosine=0.999)
    finally:
        handle.remove()


def test_qwen3_5_packed_logits_equal_padded(tiny_model_dir, encoded):
    """Qwen3.5's gated DeltaNet layer carries a recurrent state and a 4-token conv window along the row; run once
    per sample span (`packed_span_modules`) it restarts per sample, so every sample's packed logits (one row; two
    rows, the shorter one padded) equal its padded ones. Control: the same rows without the per-span layer (the
    attention layer still per sample) miss by far more than the tolerance, so the test sees the leak."""
    from transformers import AutoModelForImageTextToText

    family = get_family("qwen3_5")
    processor, samples = encoded("qwen3_5")
    pad = processor.tokenizer.pad_token_id
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen3_5")).eval()
    image_token = model.config.image_token_id
    images = [int((s.input_ids == image_token).sum()) for s in samples]
    assert 0 in images and sum(n > 0 for n in images) >= 3 and len({len(s) for s in samples}) >= 3
    padded = _logits(model, Collator(pad)(samples))
    reference = [padded[i, : len(s)] for i, s in enumerate(samples)]
    collate = PackingCollator(pad, rope_index_of(model))

    def worst(batch: dict, rows: list[list[int]]) -> float:
        return _worst_logits(model, batch, rows, samples, reference)

    one, two = [[0, 1, 2, 3, 4]], [[0, 1, 2], [3, 4]]
    one_row, two_rows = collate(samples), collate([samples[:3], samples[3:]])
    attention = packed_attention(model, family.language_prefixes)
    assert not isinstance(attention, str)
    calls = []
    layer = model.model.language_model.layers[0].linear_attn
    counter = layer.in_proj_qkv.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1]))
    try:
        leak = worst(one_row, one)
        handle = span_layers(model, family.packed_span_modules, family.language_prefixes)
        assert not isinstance(handle, str) and handle.layers == [layer]
        try:
            calls.clear()
            packed_one = worst(one_row, one)
            assert calls == [len(s) for s in samples]  # one forward per sample span
            packed_two = worst(two_rows, two)
            assert worst(Collator(pad)(samples), [[0]]) == 0.0  # padded batches run the layer as it is
        finally:
            handle.remove()
    finally:
        counter.remove()
        attention.remove()
    assert packed_one < 1e-5 and packed_two < 1e-5, (packed_one, packed_two)
    assert leak > 1e-2, leak
    print(f"qwen3_5 packed vs padded logits: one row {packed_one:.2e}, two rows {packed_two:.2e}; "
          f"without the per-span layer {leak:.3f}")


def test_qwen3_5_packed_gradients_under_checkpointing(tiny_model_dir, encoded):
    """Gradient checkpointing replays each decoder layer's forward without its hooks: the spans travel as the
    layer's arguments, so the recomputed DeltaNet layer is cut the same way and the gradients equal the padded ones."""
    processor, samples = encoded("qwen3_5")
    pad = processor.tokenizer.pad_token_id
    family = get_family("qwen3_5")
    model = lora_model(tiny_model_dir("qwen3_5"), "qwen3_5")
    padded = loss_and_grads(model, Collator(pad)(samples))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert unwrap_peft(model).model.language_model.layers[0].gradient_checkpointing
    handle = span_layers(unwrap_peft(model), family.packed_span_modules, family.language_prefixes)
    assert not isinstance(handle, str)
    try:
        packed = loss_and_grads(model, PackingCollator(pad, rope_index_of(model))(samples))
    finally:
        handle.remove()
    assert_same(padded, packed, rel=1e-5, cosine=0.99999)
