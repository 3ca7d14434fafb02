"""The checkpointed decoder layers' gated MLP in chunks of tokens (`speed.mlp_chunk_tokens`).

With gradient checkpointing the peak of a LoRA step is a recomputed layer's backward: the layer's activations come
back at once, and its MLP holds most of them. Per token, transformers' gated MLP keeps the gate and up projections,
the product (down_proj's input) and, with LoRA dropout, a 16-bit dropout copy of each adapted input, on the
intermediate width (Qwen2.5-VL-7B: 18,944), and its backward adds gradients of that width. `TiledMLP` runs the MLP
of a checkpointed layer as one autograd function that keeps only its input, and in backward recomputes and
back-propagates the MLP one chunk of tokens at a time: the intermediate-width tensors alive at the peak shrink from
all the micro-batch's tokens to one chunk's.

What it costs: the MLP's forward runs once more in backward, per chunk. In the recomputation that gradient
checkpointing does anyway, the function does not compute the MLP at all where nothing needs its output there
(`skips_recompute`: the layer adds the output to the residual stream and returns; an addition's backward reads no
values), so such layers run the MLP forward twice per step as plain checkpointing does, just in smaller matmuls.
Where the output feeds something else (Gemma 3's norm after the MLP, Llama 3.2 Vision's gated cross-attention
layers), the recomputation computes it under no_grad in chunks: a third MLP forward.

The chunks' dropout masks are the forward's: the function keeps the random generators' state at its forward and
replays the same chunks from it in backward (as torch.utils.checkpoint does), and autocast as it was. Parameter
gradients (the adapters', or the weights' in full fine-tuning) accumulate from the nested backward of each chunk,
as in reentrant checkpointing; that is invisible to DDP's and DeepSpeed's gradient hooks, so it does not apply with
several processes or DeepSpeed. Layers without checkpointing, and calls without grad, run the MLP as before.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
from typing import Any

import torch
from torch import nn

from vlmtune.speed.gated_mlp import gated_mlps


def in_backward() -> bool:
    """True while autograd's engine runs a backward pass on this thread (where checkpointing recomputes layers)."""
    return torch._C._current_graph_task_id() != -1


class TiledMLP(torch.autograd.Function):
    """`forward(x)` of a gated MLP, keeping only x; backward recomputes it chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, run: Any, chunk: int, skip: bool) -> torch.Tensor:
        ctx.run, ctx.chunk = run, chunk
        ctx.device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.device_type), torch.get_autocast_dtype(ctx.device_type))
        ctx.rng = _rng_state(x.device)
        ctx.save_for_backward(x)
        if skip and in_backward():  # checkpointing's recomputation: the output's values are read by no backward
            return x.new_empty(x.shape)
        with torch.no_grad():
            return torch.cat([run(piece) for piece in _pieces(x, chunk)]).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (x,) = ctx.saved_tensors
        wants_input = ctx.needs_input_grad[0]
        grad_x = x.new_empty(x.shape) if wants_input else None  # contiguous: its pieces are views
        inputs = _pieces(x, ctx.chunk)
        outs = _pieces(grad_x, ctx.chunk) if grad_x is not None else [None] * len(inputs)
        pieces = list(zip(inputs, _pieces(grad, ctx.chunk), outs, strict=True))
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=_devices(x.device), device_type=ctx.device_type):
            _set_rng_state(ctx.rng, x.device)
            with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
                for piece, piece_grad, out in pieces:
                    leaf = piece.detach().requires_grad_(wants_input)
                    torch.autograd.backward(ctx.run(leaf), piece_grad)
                    if out is not None:
                        out.copy_(leaf.grad)
        return grad_x, None, None, None


def _pieces(x: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """x's tokens (every dimension but the last) as (tokens, width) pieces of `chunk` rows, views where x allows."""
    return list(x.reshape(-1, x.shape[-1]).split(chunk, dim=0))


def _devices(device: torch.device) -> list[Any]:
    return [device] if device.type == "cuda" else []


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def skips_recompute(layer: nn.Module, attribute: str) -> bool:
    """Whether `layer`'s class forward only adds the output of `self.<attribute>(...)` to the residual stream and
    returns: `h = self.mlp(...)`, then `h = residual + h` (or `h + residual`), then `return h`. Read from the source;
    anything else (a norm or a gate on the output, source that cannot be read) is False."""
    try:
        source = textwrap.dedent(inspect.getsource(type(layer).forward))
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    except (OSError, TypeError, SyntaxError, IndexError, AttributeError):
        return False
    for at, statement in enumerate(body):
        target = _assigned_call(statement, attribute)
        if target is None:
            continue
        rest = [s for s in body[at + 1:] if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        return len(rest) >= 2 and _is_residual_add(rest[0], target) and _returns(rest[1], target)
    return False


def _assigned_call(statement: ast.stmt, attribute: str) -> str | None:
    """`name` of a statement `name = self.<attribute>(...)`."""
    if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1):
        return None
    target, value = statement.targets[0], statement.value
    called = value.func if isinstance(value, ast.Call) else None
    if (isinstance(target, ast.Name) and isinstance(called, ast.Attribute) and called.attr == attribute
            and isinstance(called.value, ast.Name) and called.value.id == "self"):
        return target.id
    return None


def _is_residual_add(statement: ast.stmt, name: str) -> bool:
    if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1):
        return False
    target, value = statement.targets[0], statement.value
    if not (isinstance(target, ast.Name) and target.id == name and isinstance(value, ast.BinOp)
            and isinstance(value.op, ast.Add)):
        return False
    sides = [value.left, value.right]
    return all(isinstance(s, ast.Name) for s in sides) and sum(s.id == name for s in sides) == 1  # type: ignore


def _returns(statement: ast.stmt, name: str) -> bool:
    if not isinstance(statement, ast.Return) or statement.value is None:
        return False
    value = statement.value
    items = value.elts if isinstance(value, ast.Tuple) else [value]
    return any(isinstance(v, ast.Name) and v.id == name for v in items)


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    tiling = self._vlmtune_tiling
    layer = tiling.layer
    if (torch.is_grad_enabled() and x.requires_grad and layer.training
            and getattr(layer, "gradient_checkpointing", False)):
        return TiledMLP.apply(x, tiling.inner, tiling.chunk, tiling.skip)
    return tiling.inner(x)


class _Tiling:
    def __init__(self, layer: nn.Module, inner: Any, chunk: int, skip: bool):
        self.layer, self.inner, self.chunk, self.skip = layer, inner, chunk, skip


class TiledMLPs:
    """The installed forwards, removable; `names` (index.path within the decoder layers) and `recomputing` (those
    whose output checkpointing's recomputation still computes, and why)."""

    def __init__(self, found: list[tuple[str, nn.Module, nn.Module, bool]], chunk: int):
        self.names = [name for name, *_ in found]
        self.recomputing = [name for name, _, _, skip in found if not skip]
        self._modules: list[tuple[nn.Module, Any]] = []
        for _, module, layer, skip in found:
            previous = vars(module).get("forward")
            module._vlmtune_tiling = _Tiling(layer, module.forward, chunk, skip)
            module.forward = types.MethodType(_forward, module)  # type: ignore[method-assign]
            self._modules.append((module, previous))

    def remove(self) -> None:
        for module, previous in reversed(self._modules):
            vars(module).pop("_vlmtune_tiling", None)
            if previous is None:
                vars(module).pop("forward", None)
            else:
                module.forward = previous  # type: ignore[method-assign]
        self._modules = []


def tile_mlps(hf_model: nn.Module, layers_prefix: str, chunk: int, eager_layers: int | None = None) -> TiledMLPs | str:
    """Run the gated MLPs of the checkpointed decoder layers at `layers_prefix` in chunks of `chunk` tokens;
    `eager_layers`: only the first n layers (those speed.compile leaves eager), None: all. Returns the handle, or
    why nothing applies. Which layers are checkpointed is read at each call (the layer's `gradient_checkpointing`)."""
    try:
        layers = list(hf_model.get_submodule(layers_prefix))
    except (AttributeError, TypeError):
        return f"no decoder layers at {layers_prefix}"
    found: list[tuple[str, nn.Module, nn.Module, bool]] = []
    for index, layer in enumerate(layers[:eager_layers]):
        children = {id(m): name for name, m in layer.named_children()}
        for name, module in gated_mlps([layer]):
            attribute = children.get(id(module))
            skip = attribute is not None and skips_recompute(layer, attribute)
            found.append((f"{index}.{name.split('.', 1)[1]}", module, layer, skip))
    if not found:
        return f"no gated MLP (gate_proj, up_proj, down_proj, act_fn) in the eager layers of {layers_prefix}"
    return TiledMLPs(found, chunk)
