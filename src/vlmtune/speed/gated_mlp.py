"""The gated MLP's activation recomputed in backward (`speed.mlp_activation_recompute`).

Every family vlmtune trains has transformers' gated MLP in its decoder layers: `down_proj(act_fn(gate_proj(x)) *
up_proj(x))`. Run by autograd, it keeps four tensors of the intermediate width per token for backward: the gate
projection (for the activation's backward), the activation's output and the up projection (for the product's), and
the product (down_proj's input). `act_times_up` computes the same product as one autograd function that keeps only the
gate and up projections and recomputes `act_fn(gate)` in backward: 2 bytes per intermediate-width element per token
less in every decoder layer that runs eagerly (Qwen2.5-VL-7B: 37.9 kB per token per layer, a quarter of what the MLP
keeps). The outputs and gradients are the same bits: the forward runs the same operations, and the backward
recomputes the activation from the same gate tensor and runs the product's and the activation's own backward on it.
The cost is the activation once more per layer in backward, one elementwise pass over the intermediate width.

Compiled layers (speed.compile) are left alone: inductor already recomputes the activation instead of keeping it
(memory/activations.py `compiled_saving`), and would have to trace this function's backward. With speed.compile the
first decoder layer stays eager (speed/compile_layers.py), and gets it.

Which MLPs: a module of a decoder layer with `gate_proj`, `up_proj`, `down_proj` and `act_fn` whose class forward
reads exactly those four attributes (transformers' LlamaMLP, Qwen2MLP, Qwen3VLTextMLP, Qwen3_5MLP, Gemma3MLP,
MllamaTextMLP and the other copies of that code). Anything else (a mixture of experts, remote code) keeps its forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

GATED_MLP_NAMES = frozenset({"gate_proj", "up_proj", "down_proj", "act_fn"})
"""The attributes transformers' gated MLP forward reads, and the only ones."""


class ActTimesUp(torch.autograd.Function):
    """`act(gate) * up`, keeping gate and up for backward (not act(gate))."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, act: Any) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            leaf = gate.detach().requires_grad_(ctx.needs_input_grad[0])
            activated = ctx.act(leaf)
        grad_up = grad * activated.detach() if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            (grad_gate,) = torch.autograd.grad(activated, leaf, grad * up)
        return grad_gate, grad_up, None


def act_times_up(gate: torch.Tensor, up: torch.Tensor, act: Any) -> torch.Tensor:
    """`act(gate) * up`; through `ActTimesUp` only where autograd will need it."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return ActTimesUp.apply(gate, up, act)
    return act(gate) * up


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(act_times_up(self.gate_proj(x), self.up_proj(x), self.act_fn))


def is_gated_mlp(module: nn.Module) -> bool:
    """transformers' gated MLP: the four attributes, and a class forward `(self, x)` that reads only them."""
    if not all(hasattr(module, name) for name in GATED_MLP_NAMES):
        return False
    code = getattr(type(module).forward, "__code__", None)
    return code is not None and code.co_argcount == 2 and set(code.co_names) == GATED_MLP_NAMES


def gated_mlps(layers: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    """(name within its layer list, module) of every gated MLP in `layers` (index-prefixed names)."""
    out: list[tuple[str, nn.Module]] = []
    for index, layer in enumerate(layers):
        out += [(f"{index}.{name}", m) for name, m in layer.named_modules() if name and is_gated_mlp(m)]
    return out


class RecomputedActivations:
    """The installed forwards, removable (instance attributes over the class forward)."""

    def __init__(self, modules: list[tuple[str, nn.Module]]):
        self.names = [name for name, _ in modules]
        self._modules = [m for _, m in modules]
        for module in self._modules:
            module.forward = types.MethodType(_forward, module)  # type: ignore[method-assign]

    def remove(self) -> None:
        for module in self._modules:
            vars(module).pop("forward", None)
        self._modules = []


def recompute_mlp_activations(
    hf_model: nn.Module, layers_prefix: str, eager_layers: int | None = None
) -> RecomputedActivations | str:
    """Install `act_times_up` in the gated MLPs of the decoder layers at `layers_prefix`; `eager_layers`: only the
    first n layers (the ones speed.compile leaves eager), None: all. Returns the handle, or why nothing applies."""
    try:
        layers = hf_model.get_submodule(layers_prefix)
    except AttributeError:
        return f"no decoder layers at {layers_prefix}"
    chosen = list(layers)[:eager_layers]  # None: all
    # a module whose forward another switch has replaced already keeps that forward
    found = [(n, m) for n, m in gated_mlps(chosen) if "forward" not in vars(m)]
    if not found:
        return f"no gated MLP (gate_proj, up_proj, down_proj, act_fn) in the eager layers of {layers_prefix}"
    return RecomputedActivations(found)
