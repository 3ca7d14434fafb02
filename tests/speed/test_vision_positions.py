"""speed.vision_positions_on_cpu: the Qwen vision towers get their position ids, attention boundaries and window
order made on the CPU once per image grid; the tower's outputs and the model's loss and gradients stay the same to
the bit, and a cached grid costs the tower one read of the grid instead of a host sync per image and per use."""

from __future__ import annotations

import traceback

import pytest
import torch
from speed_helpers import cpu_varlen, eager_then_installed, lora_model, varied_batch

from benchmarks.host_reads import counted_step

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]


def _tower(inner, family):
    from vlmtune.speed.vision_positions import vision_positions_on_cpu

    handle = vision_positions_on_cpu(inner, family.vision_prefixes)
    assert not isinstance(handle, str), handle
    assert len(handle.names) == 1
    return handle, inner.get_submodule(handle.names[0])


GRIDS = [(1, 12, 16), (1, 4, 6), (2, 8, 8)]
"""Images of three sizes and a two-frame clip in one call: Qwen2.5-VL's windows (4 x 4 merged patches at the tiny
model's widths) cut the first into padded windows."""


def _pixels(tower, grids):
    patch = tower.patch_embed.proj.weight[0].numel()
    torch.manual_seed(0)
    return torch.randn(sum(t * h * w for t, h, w in grids), patch)


@pytest.mark.parametrize("family_name", QWEN)
def test_the_tower_and_the_model_give_the_same_numbers(tiny_model_dir, varied_jsonl, family_name):
    from vlmtune.families import get_family
    from vlmtune.speed.loss_hook import unwrap_peft
    from vlmtune.speed.vision_positions import vision_positions_on_cpu

    family = get_family(family_name)
    model = lora_model(tiny_model_dir(family_name), family_name)
    inner = unwrap_peft(model)
    tower = inner.get_submodule(family.vision_prefixes[0])
    grids = torch.tensor(GRIDS)
    pixels = _pixels(tower, GRIDS)
    with torch.no_grad():
        plain = tower(pixels, grid_thw=grids)
        handle, hooked = _tower(inner, family)
        try:
            assert hooked is tower
            first = tower(pixels, grid_thw=grids)  # computed
            again = tower(pixels, grid_thw=grids)  # from the cache
            positional = tower(pixels, grids)
        finally:
            handle.remove()
    assert (handle.misses, handle.hits) == (1, 2)
    for out in (first, again, positional):
        assert torch.equal(out.last_hidden_state, plain.last_hidden_state)
        assert torch.equal(out.pooler_output, plain.pooler_output)
    # the whole model, loss and every gradient, on a batch of the data loader's
    batch = varied_batch(tiny_model_dir, varied_jsonl, family)
    reference, installed = eager_then_installed(
        model, batch, lambda: vision_positions_on_cpu(inner, family.vision_prefixes))
    assert torch.equal(reference[0], installed[0])
    assert reference[1].keys() == installed[1].keys()
    assert all(torch.equal(reference[1][n], installed[1][n]) for n in reference[1])


@pytest.mark.parametrize("family_name", ["qwen2_vl", "qwen2_5_vl"])
def test_a_cached_grid_reads_the_grid_once(tiny_model_dir, family_name, monkeypatch):
    """With the attention the GPU runs (speed.varlen_attention: cu_seqlens and max_seqlen, no split per image), the
    tower without this reads device values in its position, length and window code; with a cached grid it reads
    the grid once and nothing else."""
    from vlmtune.families import get_family
    from vlmtune.speed import varlen_attention as varlen
    from vlmtune.speed.frozen_vision import vision_without_grad
    from vlmtune.speed.loss_hook import unwrap_peft

    monkeypatch.setattr(varlen, "_usable", lambda query, dropout: dropout == 0.0)
    monkeypatch.setattr(varlen, "_varlen_fn", lambda: cpu_varlen)
    family = get_family(family_name)
    model = lora_model(tiny_model_dir(family_name), family_name)
    inner = unwrap_peft(model)
    attention = varlen.varlen_attention(inner, family, "cpu", packed=False, require_kernel=False)
    assert not isinstance(attention, str), attention
    no_grad = vision_without_grad(inner, family.vision_prefixes)
    tower = inner.get_submodule(family.vision_prefixes[0])
    grids = torch.tensor(GRIDS)
    pixels = _pixels(tower, GRIDS)
    out = {}
    try:
        without = counted_step(lambda: out.update(plain=tower(pixels, grid_thw=grids)))
        handle, tower = _tower(inner, family)
        try:
            tower(pixels, grid_thw=grids)  # the first time: computed on the CPU
            cached = counted_step(lambda: out.update(cached=tower(pixels, grid_thw=grids)))
        finally:
            handle.remove()
    finally:
        no_grad.remove()
        attention.remove()
    assert sum(cached.values()) == 1 and next(iter(cached)).startswith("tolist vision_positions.py"), cached
    # transformers 5.23 on the CPU: Qwen2-VL 3 (the grid for the positions, the merge size, max_seqlen), Qwen2.5-VL 8
    # (and on a GPU four copies of the CPU-made window order into the device at its uses)
    assert sum(without.values()) >= (6 if family_name == "qwen2_5_vl" else 3), without
    assert torch.equal(out["cached"].pooler_output, out["plain"].pooler_output)


def test_the_cache_is_bounded_and_keyed_by_the_grid(tiny_model_dir, monkeypatch):
    from vlmtune.families import get_family
    from vlmtune.speed import vision_positions
    from vlmtune.speed.loss_hook import unwrap_peft

    monkeypatch.setattr(vision_positions, "CACHE_SIZE", 2)
    family = get_family("qwen2_vl")
    inner = unwrap_peft(lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl"))
    handle, tower = _tower(inner, family)
    patch_dim = tower.patch_embed.proj.weight[0].numel()

    def run(*grid):
        grid_thw = torch.tensor([grid])
        pixels = torch.randn(int(grid_thw.prod()), patch_dim)
        with torch.no_grad():
            return tower(pixels, grid_thw=grid_thw)

    try:
        for grid in [(1, 4, 4), (1, 4, 6), (1, 4, 4), (1, 6, 6), (1, 4, 6)]:
            run(*grid)
        assert (handle.misses, handle.hits) == (4, 1)  # (1, 4, 6) had left the two-entry cache by its second call
        assert len(handle._cache) == 2
        # a caller's own precomputed value wins over the cache's
        own = torch.zeros(16, 2, dtype=torch.long)
        seen = {}
        hook = tower.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
        try:
            with torch.no_grad():
                tower(torch.randn(16, patch_dim), grid_thw=torch.tensor([[1, 4, 4]]), position_ids=own)
        finally:
            hook.remove()
        assert seen["position_ids"] is own and "cu_seqlens" in seen
    finally:
        handle.remove()
    assert len(handle._cache) == 0 and not tower._forward_pre_hooks


def test_a_grid_without_values_is_left_to_the_tower(tiny_model_dir):
    """Under FakeTensorMode (shape-only passes) there is no grid to read: the hook stands aside, nothing is cached."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vlmtune.families import get_family
    from vlmtune.speed.loss_hook import unwrap_peft

    inner = unwrap_peft(lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl"))
    handle, tower = _tower(inner, get_family("qwen2_vl"))
    grids = torch.tensor([[1, 4, 4]])
    pixels = _pixels(tower, [(1, 4, 4)])
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
            out = tower(mode.from_tensor(pixels), grid_thw=mode.from_tensor(grids))
    except Exception as exc:  # the tower's own code may not run on fake tensors; the hook must not be why
        frames = [f.filename for f in traceback.extract_tb(exc.__traceback__)]
        assert not any(f.endswith("speed/vision_positions.py") for f in frames), (exc, frames)
    else:
        assert out.pooler_output.shape[0] == 4
    finally:
        handle.remove()
    assert (handle.misses, handle.hits) == (0, 0)


def test_engine_installs_it_on_qwen_towers_and_says_why_not_elsewhere(tiny_model_dir):
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.families import get_family
    from vlmtune.speed import apply_speed

    def config(name: str, on: bool) -> VlmtuneConfig:
        return VlmtuneConfig.model_validate(
            {"model": {"name_or_path": str(tiny_model_dir(name))}, "hardware": {"use_cpu": True},
             "speed": {"vision_positions_on_cpu": on}})

    model = lora_model(tiny_model_dir("qwen2_5_vl"), "qwen2_5_vl")
    setup = apply_speed(model, config("qwen2_5_vl", True), get_family("qwen2_5_vl"))
    try:
        assert "vision_positions_on_cpu" in setup.active
        tower = model.base_model.model.model.visual
        assert len(tower._forward_pre_hooks) == 1
    finally:
        setup.remove()
    assert not tower._forward_pre_hooks
    gemma = lora_model(tiny_model_dir("gemma3"), "gemma3")
    setup = apply_speed(gemma, config("gemma3", True), get_family("gemma3"))
    setup.remove()
    assert "no grid indices" in setup.skipped["vision_positions_on_cpu"]
    assert VlmtuneConfig.model_validate({"model": {"name_or_path": "x"}}).speed.vision_positions_on_cpu is False
