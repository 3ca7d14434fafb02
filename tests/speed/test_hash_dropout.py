"""speed.hash_dropout: the hashed dropout mask drops at rate p, independently between neighbours and between calls,
backward uses the forward's mask (recomputed, not kept), and compiled decoder layers trained with it give the eager
layers' loss and gradients; the engine installs it on the compiled layers only."""

from __future__ import annotations

import pytest
import torch
from speed_helpers import assert_same, eager_then_installed, lora_model, loss_and_grads
from torch import nn

from vlmtune.speed.hash_dropout import HashDropout, hash_dropout, hash_lora_dropout, keep_mask


def test_the_mask_keeps_one_minus_p_independently():
    shape = torch.Size([512, 2048])
    for p in (0.05, 0.1, 0.5):
        keep = keep_mask(shape, torch.tensor(12345), p, torch.device("cpu"))
        assert keep.shape == shape and keep.dtype == torch.bool
        rate = keep.float().mean().item()
        assert abs(rate - (1 - p)) < 0.003, (p, rate)
        k = keep.float() - (1 - p)
        # neighbours along a row and down a column are uncorrelated (|r| < 0.01 over a million pairs)
        for a, b in ((k[:, 1:], k[:, :-1]), (k[1:], k[:-1])):
            r = (a * b).mean() / (k * k).mean()
            assert abs(r.item()) < 0.01, (p, r.item())
    one = keep_mask(shape, torch.tensor(1), 0.05, torch.device("cpu"))
    again = keep_mask(shape, torch.tensor(1), 0.05, torch.device("cpu"))
    other = keep_mask(shape, torch.tensor(2), 0.05, torch.device("cpu"))
    assert torch.equal(one, again)
    # two seeds agree where two independent masks would: 0.95^2 + 0.05^2 of the elements
    agree = (one == other).float().mean().item()
    assert abs(agree - (0.95**2 + 0.05**2)) < 0.003, agree
    # a mask over a 3-D shape is the 2-D mask of its flattened rows
    three = keep_mask(torch.Size([4, 128, 2048]), torch.tensor(1), 0.05, torch.device("cpu"))
    assert torch.equal(three.reshape(512, 2048), one)


def test_backward_uses_the_forwards_mask_and_keeps_none():
    torch.manual_seed(0)
    drop = nn.Dropout(0.1)
    handle = HashDropout([drop])
    x = torch.randn(64, 96, requires_grad=True)
    lin = nn.Linear(96, 8, bias=False)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = drop(x)
        out = lin(y)
    g = torch.randn_like(out)
    out.backward(g)
    keep = y.detach() != 0
    assert 0.8 < keep.float().mean().item() < 0.97
    assert torch.allclose(y, x.detach() * keep / 0.9)
    assert torch.allclose(x.grad, (g @ lin.weight.detach()) * keep / 0.9, atol=1e-6)
    assert torch.allclose(lin.weight.grad, g.t() @ y.detach(), atol=1e-5)
    # no mask is kept; eagerly the linear after it still keeps its input, the dropped copy (under torch.compile the
    # partitioner computes that again too: benchmarks/saved_activations.py --compile --hash-dropout)
    big = [t for t in saved if t.numel() == x.numel()]
    assert all(t.dtype != torch.bool for t in big)
    assert [t.data_ptr() for t in big if t.data_ptr() != x.data_ptr()] == [y.data_ptr()]
    handle.remove()
    assert "forward" not in vars(drop)
    x.grad = None
    assert drop(x).eq(0).any()  # nn.Dropout's own forward again


def test_eval_and_no_grad_draw_or_skip_as_dropout_does():
    drop = nn.Dropout(0.2)
    HashDropout([drop])
    x = torch.randn(32, 32)
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    with torch.no_grad():
        y = drop(x)
    assert 0 < (y == 0).float().mean().item() < 0.5
    assert torch.equal(hash_dropout(x, 0.2, torch.tensor(7)), hash_dropout(x, 0.2, torch.tensor(7)))


def test_only_lora_dropout_modules_with_p_are_patched(tiny_model_dir):
    from vlmtune.families import get_family
    from vlmtune.speed.loss_hook import unwrap_peft

    layers = list(unwrap_peft(lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl", lora_dropout=0.05)).get_submodule(
        get_family("qwen2_vl").language_layers_prefix))
    handle = hash_lora_dropout(layers[1:])
    assert isinstance(handle, HashDropout) and len(handle.modules) == 7 * (len(layers) - 1)
    assert not any("forward" in vars(m) for m in layers[0].modules())
    handle.remove()
    none = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")  # lora_dropout 0: PEFT puts Identity there
    why = hash_lora_dropout(list(unwrap_peft(none).get_submodule(get_family("qwen2_vl").language_layers_prefix)))
    assert isinstance(why, str) and "no LoRA dropout" in why


@pytest.mark.parametrize("family_name", ["qwen2_vl", "gemma3"])
def test_compiled_layers_with_hashed_dropout_train_as_eager_ones(tiny_model_dir, varied_jsonl, family_name):
    """dynamo traces the checkpointed dropout region inside each compiled layer (aot_eager: AOTAutograd's joint graph
    and partition, run without inductor); with the same seed it draws the same masks as eager."""
    from speed_helpers import varied_batch as _batch

    from vlmtune.families import get_family
    from vlmtune.speed.compile_layers import compile_layers
    from vlmtune.speed.loss_hook import unwrap_peft

    family = get_family(family_name)
    batch = _batch(tiny_model_dir, varied_jsonl, family)
    model = lora_model(tiny_model_dir(family_name), family_name, lora_dropout=0.1)
    inner = unwrap_peft(model)
    layers = list(inner.get_submodule(family.language_layers_prefix))
    hashed = hash_lora_dropout(layers[1:])
    assert isinstance(hashed, HashDropout)
    torch._dynamo.reset()
    try:
        torch.manual_seed(1)
        other_seed = loss_and_grads(model, batch)
        reference, result = eager_then_installed(
            model, batch, lambda: compile_layers(inner, family.language_layers_prefix, backend="aot_eager"))
    finally:
        hashed.remove()
        torch._dynamo.reset()
    assert abs(reference[0].item() - other_seed[0].item()) > 1e-6  # the masks do depend on the draw
    assert_same(reference, result, rel=1e-5, cosine=0.9999)


def test_engine_installs_it_on_the_compiled_layers_only(tiny_model_dir):
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.families import get_family
    from vlmtune.speed import apply_speed

    family = get_family("qwen2_vl")
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl", lora_dropout=0.05)

    def config(compile_on: bool) -> VlmtuneConfig:
        return VlmtuneConfig.model_validate(
            {"model": {"name_or_path": str(tiny_model_dir("qwen2_vl"))}, "hardware": {"use_cpu": True},
             "speed": {"compile": compile_on, "hash_dropout": True}})

    setup = apply_speed(model, config(False), family)
    assert "speed.compile is off" in setup.skipped["hash_dropout"]
    setup.remove()
    layers = list(model.base_model.model.get_submodule(family.language_layers_prefix))
    try:
        setup = apply_speed(model, config(True), family)
        assert "hash_dropout" in setup.active
        patched = [m for m in model.modules() if isinstance(m, nn.Dropout) and "forward" in vars(m)]
        assert len(patched) == 7 * (len(layers) - 1)
        assert not any("forward" in vars(m) for m in layers[0].modules() if isinstance(m, nn.Dropout))
        setup.remove()
        assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, nn.Dropout))
    finally:
        torch._dynamo.reset()
    assert VlmtuneConfig.model_validate({"model": {"name_or_path": "x"}}).speed.hash_dropout is False


def test_checkpointed_layers_recompute_the_same_masks(tiny_model_dir, varied_jsonl):
    """With gradient checkpointing (vlmtune_min checkpoints every layer) the recomputation draws the seeds again from
    the generator state checkpointing restores: the same masks, so the loss and gradients of the same layers without
    checkpointing, eager and compiled."""
    from speed_helpers import varied_batch as _batch

    from vlmtune.families import get_family
    from vlmtune.speed.compile_layers import compile_layers
    from vlmtune.speed.loss_hook import unwrap_peft

    family = get_family("qwen2_vl")
    batch = _batch(tiny_model_dir, varied_jsonl, family)
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl", lora_dropout=0.2)
    inner = unwrap_peft(model)
    hashed = hash_lora_dropout(list(inner.get_submodule(family.language_layers_prefix))[1:])
    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        plain = loss_and_grads(model, batch)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        reference, compiled = eager_then_installed(
            model, batch, lambda: compile_layers(inner, family.language_layers_prefix, backend="aot_eager"))
    finally:
        model.gradient_checkpointing_disable()
        hashed.remove()
        torch._dynamo.reset()
    assert_same(plain, reference, rel=1e-5, cosine=0.9999)
    assert_same(plain, compiled, rel=1e-5, cosine=0.9999)
