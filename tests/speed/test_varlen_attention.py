"""speed.varlen_attention: the vision tower's images and packed rows attended in one variable-length call.

PyTorch's kernel (`torch.nn.attention.varlen.varlen_attn`) is CUDA-only; here a reference implementation with its
signature (per-sequence SDPA over the cumulative lengths it is given) stands in for it, so the code that flattens
query/key/value, builds the cumulative lengths and lays the output back out is what is tested: the loss and LoRA
gradients must equal those of transformers' own per-image SDPA path and of vlmtune's per-sample spans. The GPU
correctness check (benchmarks/speed/check.py) runs the real kernel.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from speed_helpers import assert_same, lora_model, loss_and_grads

from vlmtune.data.collate import Collator
from vlmtune.data.packing import PackingCollator, rope_index_of
from vlmtune.families import get_family
from vlmtune.speed import varlen_attention as varlen_module
from vlmtune.speed.loss_hook import unwrap_peft
from vlmtune.speed.packed_attention import packed_attention
from vlmtune.speed.varlen_attention import PACKED_NAME, VISION_NAME, _packed_cu, varlen_attention


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """varlen_attn's contract on the CPU: (tokens, heads, dim) in, per-sequence attention, (tokens, heads, dim) out."""
    bounds = cu_q.tolist()
    assert cu_q.dtype == torch.int32 and bounds == cu_k.tolist() and bounds[-1] == q.shape[0]
    assert max_q == max_k == max(e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True))
    calls.append((len(bounds) - 1, window_size))
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        o = F.scaled_dot_product_attention(
            qs, ks, vs, scale=scale, is_causal=window_size == (-1, 0), enable_gqa=enable_gqa
        )
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


calls: list[tuple[int, tuple[int, int]]] = []


@pytest.fixture
def kernel(monkeypatch):
    """The reference stands in for the CUDA kernel, and CPU fp32 tensors count as usable."""
    calls.clear()
    monkeypatch.setattr(varlen_module, "_varlen_fn", lambda: reference_varlen)
    monkeypatch.setattr(varlen_module, "_usable", lambda query, dropout: dropout == 0.0)
    return calls


def test_packed_cumulative_lengths_cover_every_row():
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]])
    cu, longest = _packed_cu(positions, torch.device("cpu"))
    assert cu.tolist() == [0, 3, 5, 9, 10] and cu.dtype == torch.int32 and longest == 4
    assert _packed_cu(positions, torch.device("cpu"))[0] is cu  # once per forward, not per layer


def image_features(model, batch) -> torch.Tensor:
    """The vision tower's output for the batch's images (what the language model receives)."""
    visual = unwrap_peft(model).model.visual
    with torch.no_grad():
        out = visual(batch["pixel_values"].to(visual.dtype), grid_thw=batch["image_grid_thw"])
    return out.pooler_output if hasattr(out, "pooler_output") else out


@pytest.mark.parametrize("family_name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_vision_tower_in_one_call_equals_per_image_sdpa(tiny_model_dir, encoded, family_name, kernel):
    processor, samples = encoded(family_name)
    model = lora_model(tiny_model_dir(family_name), family_name)
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    reference = loss_and_grads(model, batch)
    features = image_features(model, batch)
    handle = varlen_attention(unwrap_peft(model), get_family(family_name), "cpu", packed=False, require_kernel=False)
    assert not isinstance(handle, str) and handle.names == [VISION_NAME]
    torch.testing.assert_close(image_features(model, batch), features, rtol=1e-5, atol=1e-6)
    got = loss_and_grads(model, batch)
    images = int(batch["image_grid_thw"].shape[0])
    # one call per vision block (Qwen2.5-VL: window and full-attention blocks), each over every image or window
    assert kernel and all(n >= images for n, _ in kernel) and all(w == (-1, -1) for _, w in kernel)
    assert_same(reference, got, rel=1e-5, cosine=0.9999)
    handle.remove()
    kernel.clear()
    loss_and_grads(model, batch)
    assert not kernel  # removed: transformers' own path again


def test_packed_rows_in_one_call_equal_spans(tiny_model_dir, encoded, kernel):
    family_name = "qwen2_vl"
    processor, samples = encoded(family_name)
    pad = processor.tokenizer.pad_token_id
    model = lora_model(tiny_model_dir(family_name), family_name)
    family = get_family(family_name)
    collate = PackingCollator(pad, rope_index_of(model))
    rows = collate([samples[:3], samples[3:]])  # two rows of different lengths: the shorter is padded
    spans = packed_attention(unwrap_peft(model), family.language_prefixes)
    reference = loss_and_grads(model, rows)
    spans.remove()
    handle = varlen_attention(unwrap_peft(model), family, "cpu", packed=True, require_kernel=False)
    assert not isinstance(handle, str) and handle.names == [VISION_NAME, PACKED_NAME]
    got = loss_and_grads(model, rows)
    causal = [n for n, w in kernel if w == (-1, 0)]
    assert causal and all(n >= len(samples) for n in causal)  # every sample of both rows in each layer's call
    assert_same(reference, got, rel=1e-5, cosine=0.9999)
    padded = Collator(pad)(samples)  # padded batches (a mask) still go through SDPA
    kernel.clear()
    assert_same(loss_and_grads(model, padded), loss_and_grads(model, padded), rel=1e-6)
    assert all(w == (-1, -1) for _, w in kernel)
    handle.remove()


def test_not_installed_where_it_cannot_help(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    assert "CPU" in varlen_attention(torch.nn.Linear(1, 1), get_family("qwen2_vl"), "cpu", packed=False)
    llava = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("llava"))
    why = varlen_attention(llava, get_family("llava"), "cpu", packed=False, require_kernel=False)
    assert isinstance(why, str) and "cu_seqlens" in why


def test_packed_rows_through_compiled_layers(tiny_model_dir, encoded, kernel):
    """speed.compile + packing + varlen: the cumulative lengths are built outside dynamo's trace (it cannot trace
    pin_memory: an H100 run failed there) and the loss equals the eager one."""
    from vlmtune.speed.compile_layers import compile_layers

    family_name = "qwen2_vl"
    processor, samples = encoded(family_name)
    model = lora_model(tiny_model_dir(family_name), family_name)
    family = get_family(family_name)
    rows = PackingCollator(processor.tokenizer.pad_token_id, rope_index_of(model))([samples[:3], samples[3:]])
    handle = varlen_attention(unwrap_peft(model), family, "cpu", packed=True, require_kernel=False)
    reference = loss_and_grads(model, rows)
    compiled = compile_layers(unwrap_peft(model), family.language_layers_prefix, backend="eager")
    assert not isinstance(compiled, str)
    kernel.clear()
    got = loss_and_grads(model, rows)
    assert any(w == (-1, 0) for _, w in kernel), "the packed rows did not reach the varlen call"
    compiled.remove()
    handle.remove()
    assert_same(reference, got, rel=1e-5, cosine=0.9999)
    # the pinned-memory copy only runs on CUDA, so this CPU run cannot reach it: the builder must stay out of the trace
    assert getattr(varlen_module._packed_cu, "_torchdynamo_disable", False)
