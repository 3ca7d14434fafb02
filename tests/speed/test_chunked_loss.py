"""The chunked loss equals transformers' ForCausalLMLoss (value and gradients), alone and inside every family's
model, and leaves calls without labels (generation, inference) untouched."""

from __future__ import annotations

import pytest
import torch
from speed_helpers import assert_same, lora_model, loss_and_grads
from transformers.loss.loss_utils import ForCausalLMLoss

from vlmtune.data.collate import Collator
from vlmtune.families import get_family
from vlmtune.speed.chunked_ce import chunked_causal_lm_loss
from vlmtune.speed.loss_hook import install_chunked_loss

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "smolvlm", "gemma3", "qwen3_5", "internvl", "mllama",
            "qwen_vl"]


def _tensors(dtype=torch.float32, bias=False, vocab=50, hidden=16):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, hidden, generator=g, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=g).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (3, 11), generator=g)
    labels[0, :4] = -100
    labels[2, 7:] = -100
    return h, w, b, labels


def _reference(h, w, b, labels, **kw):
    logits = torch.nn.functional.linear(h, w, b)
    return ForCausalLMLoss(logits, labels, vocab_size=w.shape[0], **kw)


@pytest.mark.parametrize("chunk", [1, 4, 1024])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("num_items", [None, 13])
def test_equals_hf_loss_fp32(chunk, bias, num_items):
    h, w, b, labels = _tensors(bias=bias)
    params = [h, w] + ([b] if bias else [])
    ref = _reference(h, w, b, labels, num_items_in_batch=num_items)
    ref_grads = torch.autograd.grad(ref * 3.0, params)  # a scalar multiple, as gradient accumulation applies
    out = chunked_causal_lm_loss(h, w, labels, bias=b, num_items_in_batch=num_items, chunk_tokens=chunk)
    grads = torch.autograd.grad(out * 3.0, params)
    assert torch.allclose(out, ref, rtol=1e-5, atol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_shift_labels_and_no_labelled_token():
    h, w, _, labels = _tensors()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    ref = _reference(h, w, None, labels)
    assert torch.allclose(chunked_causal_lm_loss(h, w, None, shift_labels=shifted), ref, rtol=1e-5)
    empty = chunked_causal_lm_loss(h, w, torch.full_like(labels, -100))
    empty.backward()
    assert empty.item() == 0.0 and h.grad is not None and not h.grad.any()


def test_bf16_autocast_matches_hf():
    h, w, _, labels = _tensors(vocab=300, hidden=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference(h, w, None, labels)
        out = chunked_causal_lm_loss(h, w, labels, chunk_tokens=5)
    ref_g, out_g = torch.autograd.grad(ref, [h, w]), torch.autograd.grad(out, [h, w])
    assert abs(out.item() - ref.item()) <= 1e-2 * ref.item()
    for got, want in zip(out_g, ref_g, strict=True):
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) >= 0.999


@pytest.mark.parametrize("family_name", FAMILIES)
def test_lora_model_same_loss_and_grads(tiny_model_dir, encoded, family_name):
    processor, samples = encoded(family_name)
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    model = lora_model(tiny_model_dir(family_name), family_name)
    for num_items in (None, torch.tensor(40)):
        inputs = batch if num_items is None else {**batch, "num_items_in_batch": num_items}
        reference = loss_and_grads(model, inputs)
        hook = install_chunked_loss(model, get_family(family_name).lm_head_names, chunk_tokens=16)
        assert not isinstance(hook, str)
        chunked = loss_and_grads(model, inputs)
        assert model(**inputs).logits.shape[-1] == 0  # logits were never computed
        hook.remove()
        assert_same(reference, chunked, rel=1e-5, cosine=0.9999)
    with torch.no_grad():  # without labels (generation, inference) the head computes logits as before
        hook = install_chunked_loss(model, get_family(family_name).lm_head_names, chunk_tokens=16)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        assert model(**inputs).logits.shape[-1] == model.get_base_model().lm_head.out_features
        hook.remove()


def test_full_finetuning_tied_head(tiny_model_dir, encoded):
    """Qwen2-VL's tiny model ties lm_head to the embeddings: the shared weight gets both gradients."""
    from transformers import AutoModelForImageTextToText

    processor, samples = encoded("qwen2_vl")
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(
        tiny_model_dir("qwen2_vl"), dtype=torch.float32
    ).train()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    reference = loss_and_grads(model, batch)
    hook = install_chunked_loss(model, ("lm_head",), chunk_tokens=8)
    chunked = loss_and_grads(model, batch)
    hook.remove()
    assert_same(reference, chunked, rel=1e-5, cosine=0.9999)


def test_quantized_head_takes_the_checkpointed_path(tiny_model_dir, encoded):
    """A 4-bit lm_head (QLoRA with quantization.quantize_lm_head) cannot be read as a weight: each chunk calls the
    head itself under checkpointing, with the same loss and adapter gradients."""
    pytest.importorskip("bitsandbytes")
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.methods import get_method

    family = get_family("qwen2_5_vl")  # its tiny model has an untied lm_head
    config = VlmtuneConfig.model_validate(
        {
            "model": {"name_or_path": str(tiny_model_dir("qwen2_5_vl"))},
            "method": {"name": "qlora", "lora": {"dropout": 0.0}, "quantization": {"quantize_lm_head": True}},
            "hardware": {"precision": "bf16", "use_cpu": True},
        }
    )
    torch.manual_seed(0)
    model = get_method("qlora").load_and_prepare(config, family).train()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    processor, samples = encoded("qwen2_5_vl")
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    reference = loss_and_grads(model, batch)
    hook = install_chunked_loss(model, family.lm_head_names, chunk_tokens=16)
    assert not isinstance(hook, str) and not hook.fused
    chunked = loss_and_grads(model, batch)
    hook.remove()
    assert_same(reference, chunked, rel=1e-3, cosine=0.999)


def test_no_gradient_work_under_no_grad():
    h, w, _, labels = _tensors()
    with torch.no_grad():
        loss = chunked_causal_lm_loss(h, w, labels)
    assert not loss.requires_grad
    assert torch.allclose(loss, _reference(h, w, None, labels).detach(), rtol=1e-5)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_one_host_sync_per_loss(checkpointed):
    """The labelled rows are found with one nonzero (a host sync on a GPU: the rows' count sets the shapes) for
    both the hidden states and the labels, and backward scatters the gradient back without another one. Boolean
    indexing ran it three times per step (hidden[keep] and labels[keep] in forward, hidden[keep]'s backward), two
    of them mid-step on the GPU (Gemma 3 profile, benchmarks/results/2026-12-07-gemma3-step/)."""
    from torch.profiler import ProfilerActivity, profile

    from vlmtune.speed.chunked_ce import checkpointed_causal_lm_loss

    h, w, _, labels = _tensors()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        if checkpointed:
            head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            loss = checkpointed_causal_lm_loss(h, head, labels, chunk_tokens=4)
        else:
            loss = chunked_causal_lm_loss(h, w, labels, chunk_tokens=4)
        loss.backward()
    calls = sum(e.count for e in prof.key_averages() if e.key in ("aten::nonzero", "aten::nonzero_static"))
    assert calls == 1
    assert h.grad is not None and h.grad[0, :3].abs().sum() == 0  # rows whose next label is -100 get no gradient
    assert h.grad[1].abs().sum() > 0
