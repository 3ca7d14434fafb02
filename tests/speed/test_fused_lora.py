"""speed.fused_lora: each PEFT LoRA Linear as one autograd function gives PEFT's loss and gradients (fp32 exactly,
bf16 under autocast within bf16 noise, dropout with the same random mask), follows the optimizer's updates, falls back
to PEFT wherever it does not cover a call, and leaves the PEFT modules and saved files as they were."""

from __future__ import annotations

import pytest
import torch
from speed_helpers import assert_same, lora_model, loss_and_grads

from vlmtune.data.collate import Collator
from vlmtune.speed.fused_lora import LoraLinearFunction, fuse_lora
from vlmtune.speed.loss_hook import unwrap_peft


@pytest.fixture()
def batch(encoded):
    processor, samples = encoded("qwen2_vl")
    return Collator(processor.tokenizer.pad_token_id)(samples)


def _count_adapter_calls(model: torch.nn.Module) -> tuple[list[int], list]:
    """How often PEFT's lora_A modules are called: zero when every adapted layer ran fused."""
    calls = [0]
    handles = [
        m.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        for name, m in model.named_modules()
        if name.endswith("lora_A.default")
    ]
    return calls, handles


@pytest.mark.parametrize("family_name", ["qwen2_vl", "qwen3_vl", "smolvlm", "gemma3", "qwen3_5", "internvl",
                                         "mllama", "qwen_vl"])
def test_fp32_same_loss_and_gradients(tiny_model_dir, encoded, family_name):
    processor, samples = encoded(family_name)
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    model = lora_model(tiny_model_dir(family_name), family_name)
    reference = loss_and_grads(model, batch)
    handle = fuse_lora(unwrap_peft(model), zero_stage=0)
    assert not isinstance(handle, str) and handle.layers
    calls, hooks = _count_adapter_calls(model)
    fused = loss_and_grads(model, batch)
    assert calls[0] == 0, "some adapted layer still ran PEFT's modules"
    for h in hooks:
        h.remove()
    assert_same(reference, fused, rel=1e-6, cosine=0.99999)
    for name, grad in reference[1].items():
        torch.testing.assert_close(fused[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    handle.remove()
    assert all("forward" not in layer.__dict__ for layer in model.modules())
    assert_same(reference, loss_and_grads(model, batch), rel=1e-6, cosine=0.99999)


def test_dropout_uses_the_same_mask_as_peft(tiny_model_dir, batch):
    """With lora_dropout > 0 both paths draw their masks in the same order from the same generator."""
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl", lora_dropout=0.3)
    torch.manual_seed(7)
    reference = loss_and_grads(model, batch)
    handle = fuse_lora(unwrap_peft(model), zero_stage=0)
    torch.manual_seed(7)
    fused = loss_and_grads(model, batch)
    torch.manual_seed(8)
    other_mask = loss_and_grads(model, batch)
    handle.remove()
    assert_same(reference, fused, rel=1e-5, cosine=0.9999)
    assert abs(other_mask[0].item() - reference[0].item()) > 1e-6, "dropout did not act: the test cannot tell"


def test_function_gradients_in_double():
    """The hand-written backward against autograd's numerical gradients, with and without a base output given."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.double, requires_grad=True)
    weight, bias = torch.randn(5, 6, dtype=torch.double), torch.randn(5, dtype=torch.double)
    a = torch.randn(2, 6, dtype=torch.double, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.double, requires_grad=True)
    base_out = torch.randn(2, 3, 5, dtype=torch.double, requires_grad=True)

    def fused(x, a, b):
        return LoraLinearFunction.apply(x, None, weight, bias, a, b, a, b, 1.5, 0.0)

    def delta(x, base_out, a, b):
        return LoraLinearFunction.apply(x, base_out, None, None, a, b, a, b, 0.5, 0.0)

    assert torch.autograd.gradcheck(fused, (x, a, b))
    assert torch.autograd.gradcheck(delta, (x, base_out, a, b))
    expected = torch.nn.functional.linear(x, weight, bias) + 1.5 * (x @ a.T) @ b.T
    torch.testing.assert_close(fused(x, a, b), expected)


def test_bf16_autocast_copies_follow_the_optimizer(tiny_model_dir, batch):
    """fp32 adapters, bf16 compute: one refresh of the 16-bit copies per model call, and after an optimizer step the
    fused model gives what PEFT gives with the updated adapters."""
    reference_model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl", dtype=torch.bfloat16)
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl", dtype=torch.bfloat16)
    for param in [*model.parameters(), *reference_model.parameters()]:
        if param.requires_grad:
            param.data = param.data.float()
    handle = fuse_lora(unwrap_peft(model), zero_stage=0)
    assert not isinstance(handle, str)
    results = []
    for m in (reference_model, model):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # one context per step, as the Trainer does: autocast
            first = loss_and_grads(m, batch)  # caches its casts of the fp32 adapters until the context exits
        opt.step()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            second = loss_and_grads(m, batch)
        results.append((first, second))
    assert handle.copies.refreshes == 2 and handle.copies.dtype == torch.bfloat16
    assert all(c.dtype == torch.bfloat16 for c in handle.copies.copies)
    (ref_first, ref_second), (first, second) = results
    # bf16 compute: the two paths round in different places, and how much that moves one small gradient depends on
    # the CPU's bf16 kernels (an AMD EPYC without AVX512-BF16 gives 0.9976 on one tiny lora_A where the CI machine of
    # session 8 gave > 0.999): each tensor at 0.99, all LoRA gradients together at the 0.999
    assert_same(ref_first, first, rel=1e-2, cosine=0.99, total_cosine=0.999)
    assert_same(ref_second, second, rel=1e-2, cosine=0.99, total_cosine=0.999)
    assert abs(ref_second[0].item() - ref_first[0].item()) > 1e-3, "the step changed nothing: the test cannot tell"


def test_falls_back_where_it_does_not_apply(tiny_model_dir, batch):
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")
    with torch.no_grad():
        plain_loss = model.get_base_model()(**batch).loss
        with model.disable_adapter():
            base_loss = model(**batch).loss
    handle = fuse_lora(unwrap_peft(model), zero_stage=0)
    calls, hooks = _count_adapter_calls(model)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(**batch).loss, base_loss)
    assert calls[0] == 0
    # a hook on the base layer: the base layer is called as it is and only the adapter part is fused
    layer = handle.layers[0]
    seen = []
    hook = layer.base_layer.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).loss, plain_loss)
    assert seen and calls[0] == 0
    hook.remove()
    for h in hooks:
        h.remove()
    handle.remove()


def test_lora_bias_runs_peft(tiny_model_dir, batch):
    """A bias on lora_B (PEFT's lora_bias=True) is not in the fused function: those layers run PEFT's forward."""
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl", lora_bias=True)
    reference = loss_and_grads(model, batch)
    handle = fuse_lora(unwrap_peft(model), zero_stage=0)
    calls, hooks = _count_adapter_calls(model)
    got = loss_and_grads(model, batch)
    assert calls[0] == len(handle.layers)
    for h in hooks:
        h.remove()
    handle.remove()
    assert_same(reference, got, rel=1e-6, cosine=0.99999)


def test_files_unchanged_and_not_under_zero3(tiny_model_dir, tmp_path):
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")
    keys = set(model.state_dict())
    handle = fuse_lora(unwrap_peft(model), zero_stage=2)
    assert not isinstance(handle, str)
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    handle.remove()
    assert "ZeRO-3" in fuse_lora(unwrap_peft(model), zero_stage=3)
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen2_vl"))
    assert "no LoRA" in fuse_lora(base, zero_stage=0)


def test_apply_speed_switch(tiny_model_dir):
    """On by default for LoRA; with speed.compile only on the layers that stay eager (the first decoder layer): the
    compiled ones keep PEFT's modules, which inductor fuses itself."""
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.families import get_family
    from vlmtune.speed import apply_speed

    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")
    family = get_family("qwen2_vl")
    base = {"model": {"name_or_path": str(tiny_model_dir("qwen2_vl"))}, "hardware": {"precision": "fp32"}}
    setup = apply_speed(model, VlmtuneConfig.model_validate(base), family)
    assert "fused_lora" in setup.active
    setup.remove()
    assert all("forward" not in m.__dict__ for m in model.modules() if hasattr(m, "lora_A"))
    setup = apply_speed(model, VlmtuneConfig.model_validate({**base, "speed": {"compile": True}}), family)
    try:
        assert "fused_lora" in setup.active
        layers = list(model.base_model.model.get_submodule(family.language_layers_prefix))
        fused = lambda layer: [m for m in layer.modules() if hasattr(m, "lora_A") and "forward" in m.__dict__]  # noqa: E731
        assert len(fused(layers[0])) == 7 and not any(fused(layer) for layer in layers[1:])
    finally:
        setup.remove()
        torch._dynamo.reset()


def test_cuda_graphs_with_checkpointing_refused():
    from vlmtune.config.schema import VlmtuneConfig

    with pytest.raises(ValueError, match="reduce-overhead cannot run with hardware.gradient_checkpointing"):
        VlmtuneConfig.model_validate(
            {
                "speed": {"compile": True, "compile_mode": "reduce-overhead"},
                "hardware": {"gradient_checkpointing": True},
            }
        )


def test_dropout_mask_drawn_again_in_backward_keeps_the_input_not_a_copy():
    """With dropout the function keeps its input and the generator's state, not the dropped copy and its mask: the
    gradients are those of the forward's mask, the generator ends where the forward left it, and three layers reading
    one input keep that one tensor between them (q/k/v_proj)."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, 16, requires_grad=True)
    weights = [torch.randn(8, 16) for _ in range(3)]
    adapters = [(torch.randn(2, 16, requires_grad=True), torch.randn(8, 2, requires_grad=True)) for _ in range(3)]
    grads = [torch.randn(4, 5, 8) for _ in range(3)]

    saved: list[torch.Tensor] = []
    torch.manual_seed(21)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = [LoraLinearFunction.apply(x, None, w, None, a, b, a, b, 0.5, 0.4) for w, (a, b) in zip(
            weights, adapters, strict=True)]
    after_forward = torch.get_rng_state()
    torch.autograd.backward(outs, grads)
    assert torch.equal(torch.get_rng_state(), after_forward)
    got = [x.grad.clone()] + [t.grad.clone() for pair in adapters for t in pair]

    # the same three layers written out with the masks of the same draws
    x.grad = None
    for pair in adapters:
        for t in pair:
            t.grad = None
    torch.manual_seed(21)
    ref = []
    for w, (a, b) in zip(weights, adapters, strict=True):
        dropped = torch.nn.functional.dropout(x, 0.4, training=True)
        ref.append(x @ w.t() + 0.5 * (dropped @ a.t()) @ b.t())
    for o, r in zip(outs, ref, strict=True):
        torch.testing.assert_close(o, r)
    torch.autograd.backward(ref, grads)
    want = [x.grad] + [t.grad for pair in adapters for t in pair]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)

    # kept: the input (once, a view shared by the three), each rank-r intermediate, the weights; no mask, no copy
    storages = {t.untyped_storage().data_ptr() for t in saved if t.dtype != torch.bool}
    assert not any(t.dtype == torch.bool for t in saved)
    inputs = [t for t in saved if t.shape == (20, 16)]
    assert len(inputs) == 3 and len({t.untyped_storage().data_ptr() for t in inputs}) == 1
    assert inputs[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert len(storages) == 1 + 3 + 3 + 3 * 2  # x, three h, three weights, three (a, b)


def test_a_base_layer_with_its_own_forward_is_called(tiny_model_dir):
    """A base linear whose forward was patched (speed.fp8 under speed.compile patches every base layer's forward; the
    eager first layer's stay fused) runs that forward instead of the fused function's own base matmul."""
    from vlmtune.speed.fused_lora import fuse_lora

    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")
    layer = next(m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    base = layer.base_layer
    calls = []
    original = base.forward

    def patched(x):
        calls.append(1)
        return original(x)

    base.forward = patched
    handle = fuse_lora(model.base_model.model, zero_stage=0)
    try:
        x = torch.randn(2, 3, base.in_features, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert calls == [1] and x.grad is not None
        assert layer.lora_A["default"].weight.grad is not None
    finally:
        handle.remove()
