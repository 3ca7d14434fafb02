"""speed.mlp_activation_recompute (speed/gated_mlp.py): the gated MLP keeps gate and up for backward, recomputes
act(gate) there; the same outputs and gradients, bit for bit, and 2 bytes per intermediate element less."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmtune.families import all_families, get_family
from vlmtune.speed.gated_mlp import gated_mlps, is_gated_mlp, recompute_mlp_activations

GATED = [f.name for f in all_families() if f.name not in ("qwen_vl", "qwen3_vl_moe")]
"""Families whose language layers hold transformers' gated MLP (Qwen-VL-Chat runs remote code with w1/w2/c_proj;
Qwen3-VL-MoE's tiny model has only expert layers)."""


def _language_layers(tiny_model_dir, family_name: str, dtype=torch.float32) -> tuple[nn.Module, nn.ModuleList]:
    """The tiny model with LoRA on every language linear layer (the MLP's three included), and its decoder layers."""
    from speed_helpers import lora_model

    from vlmtune.speed.loss_hook import unwrap_peft

    model = unwrap_peft(lora_model(tiny_model_dir(family_name), family_name, dtype))
    return model, model.get_submodule(get_family(family_name).language_layers_prefix)


def _run(mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Output, gradients (input, then every parameter) and the bytes autograd saved for backward."""
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size() if not isinstance(t, nn.Parameter) else 0)
        return t

    x = x.detach().requires_grad_(True)
    mlp.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mlp(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    grads = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters() if p.requires_grad]
    assert len(grads) > 1  # the adapters' gradients are compared too
    return out.detach(), grads, sum(saved)


@pytest.mark.parametrize("family_name", GATED)
def test_every_family_has_its_gated_mlps_found(tiny_model_dir, family_name):
    model, layers = _language_layers(tiny_model_dir, family_name)
    found = gated_mlps(list(layers))
    assert found, f"{family_name}: no gated MLP found"
    assert {name.split(".")[0] for name, _ in found} >= {str(i) for i in range(len(layers)) if i == 0}
    handle = recompute_mlp_activations(model, get_family(family_name).language_layers_prefix)
    assert not isinstance(handle, str)
    assert len(handle.names) == len(found)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "gemma3", "qwen3_5"])
def test_same_outputs_and_gradients_bit_for_bit_and_less_saved(tiny_model_dir, family_name, dtype):
    model, layers = _language_layers(tiny_model_dir, family_name, dtype)
    _, mlp = gated_mlps(list(layers))[0]
    inter = mlp.up_proj.out_features
    x = torch.randn(2, 7, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    out_ref, grads_ref, saved_ref = _run(mlp, x)
    handle = recompute_mlp_activations(model, get_family(family_name).language_layers_prefix)
    out, grads, saved = _run(mlp, x)
    assert torch.equal(out, out_ref)
    for got, want in zip(grads, grads_ref, strict=True):
        assert torch.equal(got, want)
    # act(gate) is the one tensor no longer kept: 14 tokens x the intermediate width x the element size
    assert saved_ref - saved == 14 * inter * x.element_size()
    handle.remove()
    assert "forward" not in vars(mlp)
    assert _run(mlp, x)[2] == saved_ref


def test_other_mlps_keep_their_forward():
    class TwoLayer(nn.Module):  # the attributes, another forward
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
            self.act_fn = nn.GELU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x))) + self.up_proj(x).sum()

    class Standard(TwoLayer):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    assert not is_gated_mlp(TwoLayer()) and is_gated_mlp(Standard())
    root = nn.Module()
    root.layers = nn.ModuleList([nn.Sequential(TwoLayer()), nn.Sequential(Standard()), nn.Sequential(Standard())])
    handle = recompute_mlp_activations(root, "layers", eager_layers=2)  # the first two layers only
    assert handle.names == ["1.0"]
    assert "forward" not in vars(root.layers[0][0]) and "forward" not in vars(root.layers[2][0])
    assert "no gated MLP" in recompute_mlp_activations(root, "layers", eager_layers=1)
    assert "no decoder layers" in recompute_mlp_activations(root, "missing")


def test_no_grad_calls_take_the_plain_product(tiny_model_dir):
    model, layers = _language_layers(tiny_model_dir, "qwen2_vl")
    recompute_mlp_activations(model, get_family("qwen2_vl").language_layers_prefix)
    _, mlp = gated_mlps(list(layers))[0]
    with torch.no_grad():
        out = mlp(torch.randn(1, 3, mlp.gate_proj.in_features))
    assert out.grad_fn is None


def test_apply_speed_installs_it_on_the_eager_layers_only(tiny_model_dir, monkeypatch):
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.speed import apply_speed
    from vlmtune.speed import compile_layers as compile_module

    family = get_family("qwen2_vl")
    model, layers = _language_layers(tiny_model_dir, "qwen2_vl")
    config = VlmtuneConfig.model_validate(
        {"model": {"name_or_path": str(tiny_model_dir("qwen2_vl"))}, "hardware": {"use_cpu": True},
         "speed": {"compile": False}})
    setup = apply_speed(model, config, family)
    assert "mlp_activation_recompute" in setup.active
    assert all("forward" in vars(m) for _, m in gated_mlps(list(layers)))
    setup.remove()
    assert not any("forward" in vars(m) for _, m in gated_mlps(list(layers)))

    # speed.compile=true: the compiled layers (all but the first) keep their forward for inductor
    monkeypatch.setattr(compile_module.CompiledLayers, "__init__", lambda self, layers, backend, mode=None: setattr(
        self, "layers", layers))
    compiled = config.model_copy(update={"speed": config.speed.model_copy(update={"compile": True})})
    setup = apply_speed(model, compiled, family)
    patched = [name for name, m in gated_mlps(list(layers)) if "forward" in vars(m)]
    assert patched == [name for name, _ in gated_mlps(list(layers)) if name.startswith("0.")]
    setup.remove()

    off = config.model_copy(update={"speed": config.speed.model_copy(update={"mlp_activation_recompute": False})})
    setup = apply_speed(model, off, family)
    assert "mlp_activation_recompute" not in setup.active
    assert not any("forward" in vars(m) for _, m in gated_mlps(list(layers)))
    setup.remove()


@pytest.mark.parametrize("family_name", [f.name for f in all_families() if f.name != "qwen_vl"])
def test_the_catalogue_says_which_architectures_have_it(tiny_model_dir, family_name):
    """memory/models.yaml `gated_mlp` (what the estimate counts) against what the installer finds in the tiny model."""
    from vlmtune.memory.catalogue import architectures

    _, layers = _language_layers(tiny_model_dir, family_name)
    model_type = get_family(family_name).model_types[0]
    assert bool(gated_mlps(list(layers))) == architectures()[model_type].gated_mlp


def test_qwen_vl_ports_mlp_is_not_rewritten():
    """Qwen-VL-Chat's port computes w1(x) * silu(w2(x)) with other names: the installer leaves it, the catalogue too."""
    from types import SimpleNamespace

    from vlmtune.families.qwen_vl_model.language import QwenMLP
    from vlmtune.memory.catalogue import architectures

    mlp = QwenMLP(SimpleNamespace(no_bias=True, hidden_size=8, mlp_width=16))
    root = nn.Module()
    root.layers = nn.ModuleList([nn.ModuleDict({"mlp": mlp})])
    assert not is_gated_mlp(mlp) and not architectures()["qwen"].gated_mlp
    assert "no gated MLP" in recompute_mlp_activations(root, "layers")
