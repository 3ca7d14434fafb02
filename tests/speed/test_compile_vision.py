"""speed.compile_vision: each frozen vision block goes through dynamo and the model gives the eager loss and gradients;
blocks that train stay eager; the engine records it and says why not where it does not apply."""

from __future__ import annotations

import os

import pytest
import torch
from speed_helpers import assert_same, cpu_varlen, eager_then_installed, lora_model, varied_batch

from vlmtune.families import all_families

EXPECTED_LISTS = {  # the block lists found per family, by the module class of their entries
    "qwen2_vl": "Qwen2VLVisionBlock",
    "qwen2_5_vl": "Qwen2_5_VLVisionBlock",
    "gemma3": "SiglipEncoderLayer",
    "smolvlm": "SmolVLMEncoderLayer",
}


def _eager_and_compiled(model, inner, family, batch):
    """Loss and gradients eagerly, then with the vision blocks compiled through a counting backend (dynamo's graphs
    run as traced: no inductor, no C compiler); also the graphs made and how often one ran."""
    from vlmtune.speed.compile_vision import compile_vision

    calls: list[int] = []
    graphs: list = []

    def counting(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            calls.append(1)
            return gm.forward(*args)

        return run

    torch._dynamo.reset()
    try:
        reference, compiled = eager_then_installed(
            model, batch, lambda: compile_vision(inner, family.vision_prefixes, backend=counting))
    finally:
        torch._dynamo.reset()
    return reference, compiled, graphs, calls


def _check_family(tiny_model_dir, varied_jsonl, family_name):
    from vlmtune.families import get_family
    from vlmtune.speed.compile_vision import vision_blocks
    from vlmtune.speed.frozen_vision import vision_without_grad
    from vlmtune.speed.loss_hook import unwrap_peft

    family = get_family(family_name)
    batch = varied_batch(tiny_model_dir, varied_jsonl, family)
    model = lora_model(tiny_model_dir(family_name), family_name)
    inner = unwrap_peft(model)
    blocks, left = vision_blocks(inner, family.vision_prefixes)
    assert blocks and not left, (family_name, left)
    if family_name in EXPECTED_LISTS:
        assert {type(b).__name__ for b in blocks} == {EXPECTED_LISTS[family_name]}
    no_grad = vision_without_grad(inner, family.vision_prefixes)
    assert not isinstance(no_grad, str), no_grad
    try:
        reference, compiled, graphs, calls = _eager_and_compiled(model, inner, family, batch)
    finally:
        no_grad.remove()
    # every block ran a traced graph (no fallback to eager), and blocks of one kind shared few graphs
    assert len(calls) >= len(blocks), (len(calls), len(blocks))
    assert 1 <= len(graphs) <= 4, len(graphs)
    assert_same(reference, compiled, rel=1e-5, cosine=0.9999)


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "gemma3"])
def test_compiled_vision_blocks_give_the_eager_loss_and_grads(tiny_model_dir, varied_jsonl, family_name):
    _check_family(tiny_model_dir, varied_jsonl, family_name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family_name", sorted(f.name for f in all_families() if f.name not in ("qwen2_5_vl", "gemma3"))
)
def test_compiled_vision_blocks_every_family(tiny_model_dir, varied_jsonl, family_name):
    """The other ten families: run by scripts/families.sh (VLMTUNE_ALL_FAMILIES=1); CI keeps Qwen2.5-VL and Gemma 3
    (Qwen and SigLIP towers) and the varlen case below."""
    if not os.environ.get("VLMTUNE_ALL_FAMILIES"):
        pytest.skip("run by scripts/families.sh (VLMTUNE_ALL_FAMILIES=1)")
    _check_family(tiny_model_dir, varied_jsonl, family_name)


def test_a_vision_tower_that_trains_stays_eager(tiny_model_dir):
    from vlmtune.families import get_family
    from vlmtune.speed.compile_vision import compile_vision, vision_blocks
    from vlmtune.speed.loss_hook import unwrap_peft

    family = get_family("qwen2_vl")
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl", adapt_vision_tower=True)
    inner = unwrap_peft(model)
    blocks, left = vision_blocks(inner, family.vision_prefixes)
    assert blocks == [] and left == ["model.visual.blocks (it trains)"]
    why = compile_vision(inner, family.vision_prefixes)
    assert isinstance(why, str) and "model.visual.blocks (it trains)" in why


def test_only_lists_of_blocks_are_taken():
    from vlmtune.speed.compile_vision import vision_blocks

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])

    class Merger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)

    tower = torch.nn.Module()
    tower.blocks = torch.nn.ModuleList([Block(), Block(), Block()])
    tower.mergers = torch.nn.ModuleList([Merger(), Merger()])  # not "...Block"/"...Layer": left alone
    tower.mixed = torch.nn.ModuleList([Block(), Merger()])  # two classes: not a block list
    model = torch.nn.Module()
    model.visual = tower
    model.requires_grad_(False)
    blocks, left = vision_blocks(model, ("visual", "absent"))
    assert blocks == list(tower.blocks) and left == []  # the nested Linear lists inside each block are not entered


def test_engine_compiles_the_vision_blocks_only_with_speed_compile(tiny_model_dir):
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.families import get_family
    from vlmtune.speed import apply_speed
    from vlmtune.speed.compile_layers import CompiledLayers

    family = get_family("qwen2_vl")
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")
    blocks = list(model.base_model.model.model.visual.blocks)

    def config(compile_on: bool, vision: bool) -> VlmtuneConfig:
        return VlmtuneConfig.model_validate(
            {"model": {"name_or_path": str(tiny_model_dir("qwen2_vl"))}, "hardware": {"use_cpu": True},
             "speed": {"compile": compile_on, "compile_vision": vision}})

    setup = apply_speed(model, config(False, True), family)
    assert "compile_vision" not in setup.active
    assert "speed.compile is off" in setup.skipped["compile_vision"]
    setup.remove()
    try:
        setup = apply_speed(model, config(True, True), family)
        assert "compile_vision" in setup.active
        compiled = [h for h in setup.handles if isinstance(h, CompiledLayers) and h.layers[0] is blocks[0]]
        assert len(compiled) == 1 and compiled[0].layers == blocks
        assert all(b._compiled_call_impl is not None for b in blocks)
        setup.remove()
        assert all(b._compiled_call_impl is None for b in blocks)
        setup = apply_speed(model, config(True, False), family)  # off by default: only the decoder layers
        assert "compile_vision" not in setup.active and "compile_vision" not in setup.skipped
        assert all(b._compiled_call_impl is None for b in blocks)
        setup.remove()
    finally:
        torch._dynamo.reset()
    assert VlmtuneConfig.model_validate({"model": {"name_or_path": "x"}}).speed.compile_vision is False


@pytest.mark.parametrize("family_name", ["qwen2_vl", "qwen2_5_vl"])
def test_with_the_varlen_attention_each_block_is_one_graph(tiny_model_dir, varied_jsonl, family_name, monkeypatch):
    """On the GPU the Qwen towers attend through speed.varlen_attention (one kernel over cu_seqlens); with it each
    compiled block traces whole: one graph call per block, one graph per kind of block (Qwen2.5-VL: window and
    full attention), and the eager loss and gradients."""
    from vlmtune.families import get_family
    from vlmtune.speed import varlen_attention as varlen
    from vlmtune.speed.frozen_vision import vision_without_grad
    from vlmtune.speed.loss_hook import unwrap_peft

    monkeypatch.setattr(varlen, "_usable", lambda query, dropout: dropout == 0.0)
    monkeypatch.setattr(varlen, "_varlen_fn", lambda: cpu_varlen)
    family = get_family(family_name)
    batch = varied_batch(tiny_model_dir, varied_jsonl, family)
    model = lora_model(tiny_model_dir(family_name), family_name)
    inner = unwrap_peft(model)
    installed = varlen.varlen_attention(inner, family, "cpu", packed=False, require_kernel=False)
    assert not isinstance(installed, str), installed
    no_grad = vision_without_grad(inner, family.vision_prefixes)
    tower = inner.get_submodule(family.vision_prefixes[0])
    try:
        reference, compiled, graphs, calls = _eager_and_compiled(model, inner, family, batch)
    finally:
        no_grad.remove()
        installed.remove()
    assert len(calls) == len(tower.blocks)  # no graph breaks: one graph call per block
    assert 1 <= len(graphs) <= 2, len(graphs)  # window blocks and full-attention blocks may differ in shapes
    assert_same(reference, compiled, rel=1e-5, cosine=0.9999)
