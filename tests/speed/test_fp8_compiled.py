"""speed.fp8 with speed.compile (speed/fp8_compiled.py): the traced FP8 base matmuls equal the eager path's
(`Fp8Weight`, the fused layers with fp8 on) bit for bit, dynamo traces a tiny model's decoder layers with them and no
graph break, and apply_speed installs and removes them. PyTorch's CPU scaled matmul; dynamo's graphs run as traced
(a counting backend: no inductor, no C compiler)."""

from __future__ import annotations

import pytest
import torch
from speed_helpers import assert_same, lora_model, loss_and_grads
from torch import nn

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.data.collate import Collator
from vlmtune.families import get_family
from vlmtune.speed.fp8_compiled import BUFFERS, Fp8BaseMatmul, compiled_fp8
from vlmtune.speed.fp8_linear import Fp8Weight, Quantizer, planned_bytes
from vlmtune.speed.loss_hook import unwrap_peft

ROWWISE = [True, False]
DTYPES = [torch.float32, torch.bfloat16]


class _Counting:
    """A dynamo backend that keeps each graph and runs it as traced."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(gm)
        return gm.forward

    def scaled_mm_calls(self) -> int:
        """torch._scaled_mm calls in every graph and its subgraphs (autograd functions' forward and backward)."""
        return sum(
            node.target is torch._scaled_mm
            for gm in self.graphs
            for module in gm.modules()
            if isinstance(module, torch.fx.GraphModule)
            for node in module.graph.nodes
        )


def _peft_linear(weight: torch.Tensor, bias: torch.Tensor | None):
    """A PEFT LoRA layer around one nn.Linear holding `weight` (frozen), and the model that holds it."""
    from peft import LoraConfig, get_peft_model

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    one = One()
    with torch.no_grad():
        one.proj.weight.copy_(weight)
        if bias is not None:
            one.proj.bias.copy_(bias)
    return get_peft_model(one, LoraConfig(r=4, target_modules=["proj"]))


@pytest.mark.parametrize("rowwise", ROWWISE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_input_gradient_equal_the_eager_fp8_path(rowwise, dtype):
    """The function on the installed buffers, called eagerly and traced (fullgraph), gives Fp8Weight's forward and
    input gradient exactly (the same quantization and scaled matmuls), and not the unquantized product."""
    torch.manual_seed(1)
    weight = (torch.randn(48, 64) * 0.05).to(dtype)
    bias = torch.randn(48).to(dtype)
    x, g = torch.randn(2, 37, 64, dtype=dtype), torch.randn(2, 37, 48, dtype=dtype)
    eager = Fp8Weight(rowwise=rowwise, keep_transposed=True, quantizer=Quantizer(fused=False)).of(weight)
    want_y = eager.forward(x.reshape(-1, 64)).view(2, 37, 48) + bias
    want_dx = eager.input_grad(g.reshape(-1, 48)).view(2, 37, 64)

    model = _peft_linear(weight, bias)
    handle = compiled_fp8(model.get_base_model(), rowwise=rowwise, root=model)
    assert not isinstance(handle, str) and handle.names == ["base_model.model.proj.base_layer"]
    base = handle.layers[0]
    assert torch.equal(base._vlmtune_fp8_values.view(torch.uint8), eager.values.view(torch.uint8))
    assert torch.equal(base._vlmtune_fp8_scale, eager.scale)
    assert base._vlmtune_fp8_transposed.stride() == (1, 48)
    assert handle.kept_bytes() == handle.planned == planned_bytes(48, 64, rowwise, keep_transposed=True)
    backend = _Counting()
    traced = torch.compile(base, backend=backend, fullgraph=True)
    for run in (base, traced):
        xi = x.clone().requires_grad_()
        y = run(xi)
        y.backward(g)
        assert y.dtype == xi.grad.dtype == dtype
        assert torch.equal(y, want_y) and torch.equal(xi.grad, want_dx)
        assert base.weight.grad is None
    assert backend.scaled_mm_calls() == 2  # forward and input gradient, inside the one graph
    exact = x.float() @ weight.float().t() + bias.float()
    assert 0 < ((want_y.float() - exact).norm() / exact.norm()).item() < 0.06
    handle.remove()
    torch._dynamo.reset()


def test_the_function_alone_takes_2d_inputs_and_gives_no_weight_gradient():
    torch.manual_seed(2)
    weight = torch.randn(32, 16) * 0.1
    eager = Fp8Weight(keep_transposed=True, quantizer=Quantizer(fused=False)).of(weight)
    x = torch.randn(5, 16, requires_grad=True)
    values = eager.values.clone().requires_grad_(False)
    y = Fp8BaseMatmul.apply(x, values, eager.transposed, eager.scale, eager.ones)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(y, eager.forward(x.detach())) and torch.equal(x.grad, eager.input_grad(g))


def test_merged_cast_and_trained_bases_run_their_own_forward():
    """A call the copies do not cover runs nn.Linear's forward (exact); a trained base is not installed at all."""
    torch.manual_seed(3)
    weight, x = torch.randn(32, 16) * 0.1, torch.randn(4, 16)
    model = _peft_linear(weight, None)
    handle = compiled_fp8(model.get_base_model(), root=model)
    base = handle.layers[0]
    assert not torch.equal(base(x), x @ weight.t())  # FP8
    model.merge_adapter()
    torch.testing.assert_close(base(x), x @ base.weight.t(), rtol=0, atol=0)
    model.unmerge_adapter()
    handle.remove()
    base.weight.requires_grad_(True)
    assert "no LoRA layer" in compiled_fp8(model.get_base_model(), root=model)
    assert "ZeRO-3" in compiled_fp8(model.get_base_model(), zero_stage=3)


def _batch(encoded):
    processor, samples = encoded("qwen2_vl")
    return {**Collator(processor.tokenizer.pad_token_id)(samples), "use_cache": False}


@pytest.mark.parametrize("rowwise", ROWWISE)
def test_compiled_layers_trace_fp8_and_train_as_the_eager_fp8_path(tiny_model_dir, encoded, rowwise):
    """The tiny Qwen2-VL with LoRA on every language linear layer, its decoder layers compiled after the install:
    no graph break, the graphs hold the scaled matmuls, loss and LoRA gradients as the fused layers with fp8 on,
    and within FP8's error of the run without FP8."""
    from vlmtune.speed.compile_layers import compile_layers
    from vlmtune.speed.fused_lora import enable_fp8, fuse_lora

    family = get_family("qwen2_vl")
    batch = _batch(encoded)
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")
    plain = loss_and_grads(model, batch)
    fused = fuse_lora(unwrap_peft(model), zero_stage=0)
    fp8 = enable_fp8(fused, rowwise=rowwise, fused_quant=False)
    assert not isinstance(fused, str) and not isinstance(fp8, str)
    eager_fp8 = loss_and_grads(model, batch)
    in_fp8 = len(fp8.layers)
    fp8.remove()
    fused.remove()

    handle = compiled_fp8(unwrap_peft(model), rowwise=rowwise, root=model)
    assert not isinstance(handle, str) and len(handle.layers) == in_fp8 > 0
    backend = _Counting()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = compile_layers(unwrap_peft(model), family.language_layers_prefix, backend=backend)
    assert not isinstance(compiled, str)
    try:
        traced = loss_and_grads(model, batch)
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
    finally:
        compiled.remove()
        handle.remove()
        torch._dynamo.reset()
    assert backend.graphs and breaks == {}, breaks
    assert (
        backend.scaled_mm_calls() >= 2 * 7
    )  # forward + input gradient of the 7 projections of a compiled layer
    assert_same(eager_fp8, traced, rel=1e-3, cosine=0.999)
    assert traced[0].item() != plain[0].item()
    assert_same(plain, traced, rel=0.02, cosine=0.95)
    assert all("lora_" in name for name in traced[1])


def _config(tiny_model_dir, **speed) -> VlmtuneConfig:
    return VlmtuneConfig.model_validate(
        {
            "model": {"name_or_path": str(tiny_model_dir("qwen2_vl"))},
            "hardware": {"use_cpu": True},
            "speed": speed,
        }
    )


@pytest.mark.parametrize(("scales", "rowwise"), [("row", True), ("tensor", False)])
def test_apply_speed_installs_it_under_compile_and_removes_it(tiny_model_dir, caplog, scales, rowwise):
    """speed.fp8=true with speed.compile=true (the config takes it now): the base layers get the traced FP8 forward
    and their buffers (not in the state dict; DDP told to skip them), the log names the path, and remove() gives
    every base layer nn.Linear's forward back and drops the buffers."""
    import logging

    from peft.tuners.lora.layer import Linear as LoraLinear

    from vlmtune.speed import apply_speed

    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")
    keys = set(model.state_dict())
    config = _config(tiny_model_dir, fp8=True, compile=True, fp8_scales=scales)
    with caplog.at_level(logging.INFO, logger="vlmtune.speed"):
        setup = apply_speed(model, config, get_family("qwen2_vl"))
    bases = [m.base_layer for m in model.modules() if isinstance(m, LoraLinear)]
    try:
        assert {"fp8", "compile", "fused_lora"} <= set(setup.active)  # fused: the eager first layer only
        assert any("inside the compiled decoder layers" in r.getMessage() for r in caplog.records)
        assert bases and all("forward" in b.__dict__ for b in bases)
        assert all(b._vlmtune_fp8_scale.dim() == (2 if rowwise else 0) for b in bases)
        assert set(model.state_dict()) == keys
        ignored = model._ddp_params_and_buffers_to_ignore
        assert len(ignored) == (len(BUFFERS) - (not rowwise)) * len(bases)  # per tensor: no ones
        assert {n for n, _ in model.named_buffers()} >= set(ignored)
    finally:
        setup.remove()
    assert all("forward" not in b.__dict__ for b in bases)
    assert not [n for n, _ in model.named_buffers() if "_vlmtune_fp8" in n]
    assert model._ddp_params_and_buffers_to_ignore == []


def test_compile_auto_stays_on_with_fp8(tiny_model_dir, monkeypatch):
    """compile=auto's own decision stands with speed.fp8 on (it used to stay eager): where auto compiles, the FP8
    matmuls go inside the compiled layers."""
    from vlmtune.speed import apply_speed, compile_policy

    monkeypatch.setattr(compile_policy, "_auto_refusal", lambda *args: None)
    monkeypatch.setattr(compile_policy, "_gpu_name", lambda device: "a GPU")
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")
    setup = apply_speed(model, _config(tiny_model_dir, fp8=True), get_family("qwen2_vl"), steps=5000)
    try:
        assert {"fp8", "compile"} <= set(setup.active) and "compile" not in setup.skipped
    finally:
        setup.remove()
