"""A frozen vision tower runs without grad (nothing saved for backward, not checkpointed) and the trainable weights
get the same gradients as before; a trained projector or vision adapters keep training."""

from __future__ import annotations

import pytest
import torch
from speed_helpers import assert_same, lora_model, loss_and_grads

from vlmtune.data.collate import Collator
from vlmtune.families import get_family
from vlmtune.speed.frozen_vision import vision_without_grad
from vlmtune.speed.loss_hook import unwrap_peft

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "smolvlm", "gemma3", "qwen3_5", "internvl", "mllama",
            "qwen_vl"]


def _saved_bytes(model: torch.nn.Module, batch: dict) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def _vision_calls(model: torch.nn.Module, prefix: str) -> list[bool]:
    """Records, for every vision block run, whether grad was enabled (recomputation runs show up as extra calls)."""
    calls: list[bool] = []
    for name, module in model.named_modules():
        # the blocks of the tower's layer list (Mllama's vision layers are not checkpointing layers)
        if name.startswith(prefix + ".") and name[len(prefix) + 1:].isdigit():
            module.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    return calls


@pytest.mark.parametrize("family_name", FAMILIES)
def test_frozen_tower_saves_nothing_and_grads_match(tiny_model_dir, encoded, family_name):
    family = get_family(family_name)
    processor, samples = encoded(family_name)
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    model = lora_model(tiny_model_dir(family_name), family_name)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = _vision_calls(model, "base_model.model." + family.vision_layers_prefix)
    reference, before = loss_and_grads(model, batch), _saved_bytes(model, batch)
    assert calls and any(calls)  # the hooked-in tower ran with grad (and was recomputed in backward)
    handle = vision_without_grad(unwrap_peft(model), family.vision_prefixes)
    assert not isinstance(handle, str) and handle.names == list(family.vision_prefixes)
    calls.clear()
    after = loss_and_grads(model, batch)
    assert calls and not any(
        calls
    )  # every block ran once per forward, without grad: no recompute in backward
    assert _saved_bytes(model, batch) < before
    handle.remove()
    assert_same(reference, after, rel=1e-6, cosine=0.9999)


def test_trained_projector_inside_the_tower_still_trains(tiny_model_dir, encoded):
    """Qwen's merger (the projector) lives inside model.visual: only what runs before it goes without grad."""
    family = get_family("qwen2_vl")
    processor, samples = encoded("qwen2_vl")
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl", modules_to_save=["model.visual.merger"])
    reference = loss_and_grads(model, batch)
    handle = vision_without_grad(unwrap_peft(model), family.vision_prefixes)
    assert not isinstance(handle, str)
    assert "model.visual.patch_embed" in handle.names and "model.visual.blocks.1" in handle.names
    assert not any("merger" in name for name in handle.names)
    after = loss_and_grads(model, batch)
    handle.remove()
    assert any("merger" in name for name in after[1])
    assert_same(reference, after, rel=1e-6, cosine=0.9999)


def test_vision_adapters_keep_their_gradients(tiny_model_dir, encoded):
    family = get_family("qwen2_5_vl")
    processor, samples = encoded("qwen2_5_vl")
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    model = lora_model(tiny_model_dir("qwen2_5_vl"), "qwen2_5_vl", adapt_vision_tower=True)
    reference = loss_and_grads(model, batch)
    handle = vision_without_grad(unwrap_peft(model), family.vision_prefixes)
    assert not isinstance(handle, str) and handle.names == ["model.visual.patch_embed"]
    after = loss_and_grads(model, batch)
    handle.remove()
    assert any("visual.blocks" in name for name in after[1])
    assert_same(reference, after, rel=1e-6, cosine=0.9999)
