"""speed.fp8 under speed.compile: the frozen LoRA base layers' FP8 matmuls as code dynamo traces, no graph break.

The eager path (fused_lora.enable_fp8) runs inside the fused LoRA function, which speed.compile switches off
(torch.compile fuses PEFT's adapter ops itself). Here the base layer itself changes: each eligible base (a plain,
frozen 16-bit `nn.Linear` inside a PEFT LoRA layer, dimensions cuBLAS's FP8 matmul takes on CUDA: enable_fp8's rules)
gets, for the run, a forward that calls `Fp8BaseMatmul`, an autograd function with the same arithmetic as
`fp8_linear.Fp8Weight` (`quantize`, `scaled_mm`; row-wise or per-tensor scales):

    forward         y  = scaled_mm(quantize(x), W_q^T)          fast accumulation: FAST_ACCUM_FORWARD
    input gradient  dx = scaled_mm(quantize(g * s_w), W_q^T^T)  the weight's row scales folded into g's columns

Dynamo traces autograd functions, forward and backward, so inductor sees the quantization (row amax, scale, e4m3
cast) beside the ops around it (RMSNorm before q/k/v, SwiGLU before down_proj, the adapters' adds) and can fuse it
with them, and can share one quantization of an input among the layers that take it (CSE), where the eager path
needs `SharedInput`. The weight gets no gradient (frozen).

The e4m3 weight in both layouts and its scales are made once, at install (the base is frozen): non-persistent
buffers on the base layer, so they move with the module (`.to(device)`) and stay out of checkpoints; 2 bytes per
weight plus the scales, `planned_bytes(..., keep_transposed=True)`, as the eager path keeps and the memory estimate
counts. DDP is told to leave them alone (`_ddp_params_and_buffers_to_ignore`): by default it broadcasts every buffer
at every forward. A call the copies do not cover (the LoRA layer merged, another compute dtype, a cast module) runs
nn.Linear's own forward. Measured by benchmarks/fp8_check.py --compile (gpu_next.sh fp8w3c): on the 7B, 1.16x compiled
bf16's tokens/s, loss +0.31% after 40 steps (benchmarks/RESULTS.md, session 19).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vlmtune.speed.fp8_linear import (
    E4M3,
    FAST_ACCUM_FORWARD,
    Fp8Weight,
    Quantizer,
    planned_bytes,
    quantize,
    scaled_mm,
)
from vlmtune.speed.fused_lora import ADAPTER, FP8_COMPUTE_DTYPES, _compute_dtype, fp8_base

BUFFERS = ("_vlmtune_fp8_values", "_vlmtune_fp8_transposed", "_vlmtune_fp8_scale", "_vlmtune_fp8_ones")
"""The base layer's buffers: e4m3 (out, in) row-major, the same stored column-major, the weight's scale ((1, out)
fp32 row-wise, () per tensor), and (1, in) fp32 ones (row-wise only: the input gradient's b scale once the weight's
scales are folded into the gradient; None per tensor)."""


class Fp8BaseMatmul(torch.autograd.Function):
    """x2 (tokens, in) -> x2 W^T (tokens, out) in x2's dtype, from W's e4m3 copies; the input gradient in FP8 too."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x2: torch.Tensor,
        values: torch.Tensor,
        transposed: torch.Tensor,
        scale: torch.Tensor,
        ones: torch.Tensor | None,
    ) -> torch.Tensor:
        rowwise = scale.dim() > 0
        x_q, s_x = quantize(x2, rowwise)
        ctx.save_for_backward(transposed, scale, ones)
        ctx.dtype = x2.dtype
        return scaled_mm(x_q, values.t(), s_x, scale, x2.dtype, fast_accum=FAST_ACCUM_FORWARD)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        transposed, scale, ones = ctx.saved_tensors
        if g.dtype != ctx.dtype:
            g = g.to(ctx.dtype)
        if scale.dim() > 0:
            g_q, s_g = quantize(g * scale.to(g.dtype), rowwise=True)
            dx = scaled_mm(g_q, transposed, s_g, ones, g.dtype)
        else:
            g_q, s_g = quantize(g, rowwise=False)
            dx = scaled_mm(g_q, transposed, s_g, scale, g.dtype)
        return dx, None, None, None, None


def _fp8_forward(base: nn.Linear, owner: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base layer's forward for the run: FP8 where its copies cover the call, nn.Linear's own otherwise."""
    values = base._vlmtune_fp8_values
    dtype = _compute_dtype(x)
    if (
        owner.merged  # PEFT merged the adapter into the weight: the copies are of the unmerged one
        or x.dtype != dtype
        or base.weight.dtype != dtype
        or values.dtype != E4M3  # the module was cast (model.to(dtype)) after the install
        or (base.bias is not None and base.bias.dtype != dtype)
    ):
        return F.linear(x, base.weight, base.bias)
    x2 = x.reshape(-1, x.shape[-1])
    y = Fp8BaseMatmul.apply(
        x2, values, base._vlmtune_fp8_transposed, base._vlmtune_fp8_scale, base._vlmtune_fp8_ones
    )
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y + base.bias if base.bias is not None else y


class CompiledFp8:
    """The base layers whose forward runs `Fp8BaseMatmul`; `remove()` gives them nn.Linear's forward back and drops
    their buffers. `planned` / `left_bf16` as `fused_lora.Fp8Layers` has them (apply_speed logs both)."""

    def __init__(
        self,
        layers: list[nn.Linear],
        names: list[str],
        planned: int,
        left_bf16: list[str],
        root: nn.Module | None,
        ignored: list[str],
    ):
        self.layers, self.names, self.planned, self.left_bf16 = layers, names, planned, left_bf16
        self.root, self.ignored = root, ignored

    def kept_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for layer in self.layers
            for t in (layer._buffers.get(name) for name in BUFFERS)
            if t is not None
        )

    def remove(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
            for name in BUFFERS:
                layer._buffers.pop(name, None)
        if self.root is not None and self.ignored:
            left = [
                n
                for n in getattr(self.root, "_ddp_params_and_buffers_to_ignore", [])
                if n not in self.ignored
            ]
            self.root._ddp_params_and_buffers_to_ignore = left
        self.layers, self.names, self.ignored = [], [], []


def compiled_fp8(
    model: nn.Module, zero_stage: int = 0, rowwise: bool = True, root: nn.Module | None = None
) -> CompiledFp8 | str:
    """Give every eligible LoRA base layer of `model` FP8 matmuls that torch.compile traces; the handle or why not.
    `root`: the module DDP will wrap (the PEFT model; default `model`), whose buffer names DDP is told to skip."""
    if zero_stage >= 3:
        return (
            "DeepSpeed ZeRO-3 partitions the base weights; their e4m3 copies are made once from whole weights"
        )
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a core dependency
        return "peft is not installed"
    root = model if root is None else root
    qualified = {id(m): n for n, m in root.named_modules()}
    layers, names, planned, left = [], [], 0, []
    for owner in model.modules():
        if not isinstance(owner, LoraLinear) or ADAPTER not in getattr(owner, "lora_A", {}):
            continue
        base = owner.base_layer
        eligible = fp8_base(owner)
        if eligible is not True or base.weight.dtype not in FP8_COMPUTE_DTYPES:
            if isinstance(eligible, str):
                left.append(eligible)
            continue
        out_features, in_features = base.weight.shape
        _install(base, owner, rowwise)
        layers.append(base)
        names.append(qualified.get(id(base), ""))
        planned += planned_bytes(out_features, in_features, rowwise, keep_transposed=True)
    if not layers:
        return "no LoRA layer has a frozen 16-bit nn.Linear base whose dimensions FP8 matmuls take"
    ignored = [
        f"{name}.{buffer}"
        for name, layer in zip(names, layers, strict=True)
        if name
        for buffer in BUFFERS
        if layer._buffers.get(buffer) is not None
    ]
    root._ddp_params_and_buffers_to_ignore = [
        *getattr(root, "_ddp_params_and_buffers_to_ignore", []),
        *ignored,
    ]
    return CompiledFp8(layers, names, planned, left, root, ignored)


def _install(base: nn.Linear, owner: nn.Module, rowwise: bool) -> None:
    copy = Fp8Weight(rowwise=rowwise, keep_transposed=True, quantizer=Quantizer(fused=False)).of(base.weight)
    for name, tensor in zip(BUFFERS, (copy.values, copy.transposed, copy.scale, copy.ones), strict=True):
        base.register_buffer(name, tensor, persistent=False)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _fp8_forward(base, owner, x)

    base.forward = forward
