"""Each LoRA-adapted linear layer as one autograd function, instead of PEFT's chain of modules and small ops.

PEFT computes an adapted layer as `base(x) + lora_B(lora_A(dropout(x))) * scale`: four module calls, and under
16-bit autocast two casts of the fp32 adapters per call, a scale multiply and an add. That is about 8 kernels and 8
autograd nodes in the forward and 10 kernels in the backward per layer; Qwen2-VL-2B with all linear layers adapted
has 196 of them, and its step without checkpointing is bound by host work and kernel launches, not by the GPU
(benchmarks/RESULTS.md). Here one `torch.autograd.Function` per layer call does

    forward   y = x W^T + b;  h = drop(x) A^T;  y += scale * h B^T                       (dropout + 3 matmuls)
    backward  gh = g B;  dx = g W + scale * gh A (through dropout's mask);  dA = scale * gh^T drop(x);  dB = scale * g^T h
              (drop(x) and its mask drawn again from the forward's generator state)

with the 16-bit copies of all adapters refreshed together (one foreach copy) at the first adapted layer of each
model call, not cast per layer. With dropout it keeps less than PEFT: the input and the random generator's state
instead of the dropped input and its mask (PEFT), and draws the same mask again in backward, as gradient
checkpointing replays dropout. Layers that read one input (q/k/v_proj, gate/up_proj) then keep one tensor between
them instead of a dropped copy and a 1-byte mask each, and o_proj keeps SDPA's output, which attention keeps anyway:
with dropout the layer keeps what it keeps without dropout. Counted on the CPU (benchmarks/saved_activations.py
--fused-lora): Qwen2.5-VL-7B 280,408 -> 211,288 bytes per token per decoder layer, Qwen2-VL-2B 128,024 -> 97,560
(11h + 3q + i). PEFT's modules, parameters and state dict stay as they are: saving, loading and merging work as
before, and any call the function does not cover (adapters disabled or merged, several or non-default adapters, DoRA
and other variants, a bias on lora_B, extra arguments) runs PEFT's own forward. A base layer other than a plain
16-bit `nn.Linear` (a 4-bit QLoRA layer) runs as it is and only the adapter part is fused.

Not under DeepSpeed ZeRO-3: its hooks gather each module's parameters when that module is called, and the function
does not call `lora_A` / `lora_B`.

With `speed.fp8` (`enable_fp8`), the frozen base matmuls of plain `nn.Linear` base layers (forward and input
gradient) run in FP8 from cached e4m3 copies of the weight (both layouts), with activations and gradients quantized
by fused torch.compile'd functions on CUDA, and an input that several layers take in a row (q/k/v_proj, gate/up_proj)
quantized once for all of them (`fp8_linear.py`); the adapters stay as above. Under speed.compile these fused layers
are off and speed.fp8 runs in the compiled decoder layers instead (`fp8_compiled.py`).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from vlmtune.speed.fp8_linear import Fp8Weight, Quantizer, SharedInput, cuda_shape_ok, planned_bytes

ADAPTER = "default"


class _Copies:
    """Compute-dtype copies of the adapter weights of all fused layers, refreshed together.

    `stale` is set by a forward pre-hook on the model (each model call) and by an optimizer step seen through the
    first weight's version counter; the first adapted layer that runs afterwards refreshes every copy at once. A
    weight already in the compute dtype is used as it is."""

    def __init__(self, layers: list[nn.Module]):
        self.masters = [w for layer in layers for w in (_a(layer).weight, _b(layer).weight)]
        self.slot = {id(layer): 2 * i for i, layer in enumerate(layers)}
        self.copies: list[torch.Tensor] = []
        self.dtype: torch.dtype | None = None
        self.version = -1
        self.stale = True
        self.refreshes = 0

    def mark_stale(self, *_: Any) -> None:
        self.stale = True

    def pair(self, layer: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stale or dtype != self.dtype or self.masters[0]._version != self.version:
            self._refresh(dtype)
        i = self.slot[id(layer)]
        return self.copies[i], self.copies[i + 1]

    @torch.no_grad()
    def _refresh(self, dtype: torch.dtype) -> None:
        if dtype != self.dtype or len(self.copies) != len(self.masters):
            self.copies = [m if m.dtype == dtype else torch.empty_like(m, dtype=dtype) for m in self.masters]
            self.dtype = dtype
        pairs = [(c, m) for c, m in zip(self.copies, self.masters, strict=True) if c is not m]
        if pairs:
            torch._foreach_copy_([c for c, _ in pairs], [m for _, m in pairs])
        self.version = self.masters[0]._version
        self.stale = False
        self.refreshes += 1


def _a(layer: nn.Module) -> nn.Module:
    return layer.lora_A[ADAPTER]


def _b(layer: nn.Module) -> nn.Module:
    return layer.lora_B[ADAPTER]


_MM_OUT_DTYPE = [True]
"""Whether torch.mm takes out_dtype here (CUDA, PyTorch >= 2.8); set to False at the first call that says no."""


def _grad_f32(m1: torch.Tensor, m2: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale * m1 @ m2 in `dtype` (the adapter weight's): on CUDA one cuBLAS call writing fp32 from 16-bit inputs."""
    out = None
    if dtype != m1.dtype and m1.is_cuda and _MM_OUT_DTYPE[0]:
        try:
            out = torch.mm(m1, m2, out_dtype=dtype)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[0] = False
    if out is None:
        out = torch.mm(m1, m2).to(dtype)
    return out.mul_(scale) if scale != 1 else out


class LoraLinearFunction(torch.autograd.Function):
    """y = base + scale * drop(x) A^T B^T, base = x W^T + b (W frozen; in FP8 from `fp8`, the weight's e4m3 copy,
    when given, with `x_quant` x's e4m3 values and scales when another layer made them) or the base layer's own
    output."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        base_out: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        a_master: torch.Tensor,
        b_master: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
        p: float,
        fp8: Fp8Weight | None = None,
        x_quant: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        rng = None
        if p > 0:
            rng = _rng_state(x2.device)  # backward draws the same mask again from here
            dropped, _ = torch.native_dropout(x2, p, True)
        else:
            dropped = x2
        h = torch.mm(dropped, a.t())
        if fp8 is not None:
            y = fp8.forward(x2, x_quant)
            if bias is not None:
                y.add_(bias)
            y.addmm_(h, b.t(), alpha=scale)
        elif base_out is None:
            y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
            y.addmm_(h, b.t(), alpha=scale)
        else:
            y = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h, b.t(), alpha=scale)
        ctx.save_for_backward(x2, h, weight, a, b)  # x2, not the dropped copy: layers reading one input share it
        ctx.scale, ctx.p, ctx.shape, ctx.fp8, ctx.rng = scale, p, x.shape, fp8, rng
        ctx.dtypes = (a_master.dtype, b_master.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x2, h, weight, a, b = ctx.saved_tensors
        scale, p, fp8 = ctx.scale, ctx.p, ctx.fp8
        dropped, mask = _dropout_again(x2, p, ctx.rng) if ctx.rng is not None else (x2, None)
        g = grad.reshape(-1, grad.shape[-1])
        if g.dtype != a.dtype:
            g = g.to(a.dtype)
        gh = torch.mm(g, b)
        dx = d_base = da = db = None
        if ctx.needs_input_grad[0]:
            base_dx = fp8.input_grad if fp8 is not None else (lambda g: torch.mm(g, weight))
            has_base = fp8 is not None or weight is not None
            if mask is not None:
                lora_dx = torch.ops.aten.native_dropout_backward(torch.mm(gh, a), mask, scale / (1.0 - p))
                dx = base_dx(g).add_(lora_dx) if has_base else lora_dx
            elif has_base:
                dx = base_dx(g).addmm_(gh, a, alpha=scale)
            else:
                dx = torch.mm(gh, a)
                dx = dx.mul_(scale) if scale != 1 else dx
            dx = dx.view(ctx.shape)
        if ctx.needs_input_grad[1]:
            d_base = grad
        if ctx.needs_input_grad[4]:
            da = _grad_f32(gh.t(), dropped, scale, ctx.dtypes[0])
        if ctx.needs_input_grad[5]:
            db = _grad_f32(g.t(), h, scale, ctx.dtypes[1])
        return dx, d_base, None, None, da, db, None, None, None, None, None, None


def _rng_state(device: torch.device) -> torch.Tensor:
    """The state of the random generator dropout draws from on `device` (CUDA: seed and Philox offset)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _dropout_again(x: torch.Tensor, p: float, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's `native_dropout(x, p)` output and mask, drawn again from the generator state it started from
    (as torch.utils.checkpoint replays dropout in a recomputation); the generator is left where it was."""
    cuda = x.device.type == "cuda"
    now = _rng_state(x.device)
    set_state = (lambda s: torch.cuda.set_rng_state(s, x.device)) if cuda else torch.set_rng_state
    set_state(state)
    try:
        return torch.native_dropout(x, p, True)
    finally:
        set_state(now)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _fused_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The patched forward of one PEFT LoRA Linear: the fused function when it covers the call, PEFT's otherwise."""
    copies: _Copies = self._vlmtune_copies
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or self.active_adapters != [ADAPTER]
        or ADAPTER in getattr(self, "lora_variant", {})
        or _b(self).bias is not None
    ):
        return self._vlmtune_peft_forward(x, *args, **kwargs)
    dtype = _compute_dtype(x)
    if x.dtype != dtype:
        return self._vlmtune_peft_forward(x)
    dropout = self.lora_dropout[ADAPTER]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    a, b = copies.pair(self, dtype)
    base = self.base_layer
    a_master, b_master = _a(self).weight, _b(self).weight
    scale = float(self.scaling[ADAPTER])
    if type(base) is nn.Linear and base.weight.dtype == dtype and not base.weight.requires_grad and not (
        base._forward_hooks or base._forward_pre_hooks or "forward" in vars(base)  # a patched forward (FP8) runs
    ):
        bias = base.bias
        if bias is not None and (bias.requires_grad or bias.dtype != dtype):
            return self._vlmtune_peft_forward(x)
        fp8: Fp8Weight | None = self.__dict__.get("_vlmtune_fp8")
        if fp8 is not None and dtype in FP8_COMPUTE_DTYPES:
            fp8 = fp8.of(base.weight)
            shared: SharedInput | None = self.__dict__.get("_vlmtune_fp8_shared")
            x_quant = shared.get(x, fp8.rowwise) if shared is not None else None
            return LoraLinearFunction.apply(x, None, None, bias, a_master, b_master, a, b, scale, p, fp8, x_quant)
        return LoraLinearFunction.apply(x, None, base.weight, bias, a_master, b_master, a, b, scale, p)
    base_out = base(x)
    if base_out.dtype != dtype:
        return self._vlmtune_peft_forward(x)
    return LoraLinearFunction.apply(x, base_out, None, None, a_master, b_master, a, b, scale, p)


FP8_COMPUTE_DTYPES = (torch.bfloat16, torch.float32)
"""Output dtypes of the FP8 base matmul (row-wise scaled FP8 on CUDA writes bf16 only; the engine trains LoRA in
bf16 there, fp32 on the CPU)."""


class FusedLora:
    """Handle of the patched layers; `remove()` gives each its PEFT forward back."""

    def __init__(self, layers: list[nn.Module], hook: Any, copies: _Copies, model: nn.Module | None = None):
        self.layers, self.hook, self.copies, self.model = layers, hook, copies, model

    def remove(self) -> None:
        for layer in self.layers:
            for attr in ("forward", "_vlmtune_peft_forward", "_vlmtune_copies"):
                layer.__dict__.pop(attr, None)
        self.hook.remove()
        self.layers = []


def fuse_lora(model: nn.Module, zero_stage: int, leave: tuple[nn.Module, ...] = ()) -> FusedLora | str:
    """Patch every PEFT LoRA Linear of `model` (the inner model the PEFT wrapper holds) but those inside `leave` (the
    decoder layers speed.compile compiles: dynamo does not trace the function's shared copies); the handle or why
    not."""
    if zero_stage >= 3:
        return "DeepSpeed ZeRO-3 gathers each module's parameters when it is called; the fused layer calls none"
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a core dependency
        return "peft is not installed"
    left = {id(m) for block in leave for m in block.modules()}
    layers = [
        m for m in model.modules()
        if isinstance(m, LoraLinear) and ADAPTER in getattr(m, "lora_A", {}) and id(m) not in left
    ]
    if not layers:
        return "the model has no LoRA linear layers" + (" outside the compiled layers" if leave else "")
    copies = _Copies(layers)
    for layer in layers:
        layer._vlmtune_peft_forward = layer.forward
        layer._vlmtune_copies = copies
        layer.forward = types.MethodType(_fused_forward, layer)
    hook = model.register_forward_pre_hook(copies.mark_stale)
    return FusedLora(layers, hook, copies, model)


class Fp8Layers:
    """The fused layers whose base matmuls run in FP8; `remove()` takes their e4m3 copies away."""

    def __init__(
        self,
        layers: list[nn.Module],
        planned: int,
        left_bf16: list[str],
        quantizer: Quantizer,
        shared: SharedInput | None = None,
        hook: Any = None,
    ):
        self.layers, self.planned, self.left_bf16 = layers, planned, left_bf16
        self.quantizer, self.shared, self.hook = quantizer, shared, hook

    def kept_bytes(self) -> int:
        """Bytes of e4m3 copies and scales built so far (each layer builds its own at its first call)."""
        return sum(layer._vlmtune_fp8.nbytes() for layer in self.layers if "_vlmtune_fp8" in layer.__dict__)

    def remove(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("_vlmtune_fp8", None)
            layer.__dict__.pop("_vlmtune_fp8_shared", None)
        if self.hook is not None:
            self.hook.remove()
        if self.shared is not None:
            self.shared.clear()
        self.layers = []


def fp8_base(layer: nn.Module) -> bool | str:
    """Whether a LoRA layer's base can run its matmuls in FP8 (`speed.fp8`, eager and compiled): True for a plain,
    frozen `nn.Linear` (not a 4-bit one, not a trained one) of a layer without a LoRA variant (DoRA ...); False for
    any other; "out x in" for a CUDA base whose dimensions cuBLAS's FP8 matmul does not take (left in 16-bit)."""
    base = layer.base_layer
    if type(base) is not nn.Linear or base.weight.requires_grad or ADAPTER in getattr(layer, "lora_variant", {}):
        return False
    out_features, in_features = base.weight.shape
    if base.weight.is_cuda and not cuda_shape_ok(out_features, in_features):
        return f"{out_features}x{in_features}"
    return True


def enable_fp8(
    fused: FusedLora,
    rowwise: bool = True,
    keep_transposed: bool = True,
    fused_quant: bool | None = None,
    share_inputs: bool = True,
) -> Fp8Layers | str:
    """Run the frozen base matmuls of the fused layers in FP8 (`speed.fp8`): every layer whose base is a plain, frozen
    `nn.Linear` (not a 4-bit one, not a trained one) and, on CUDA, has dimensions cuBLAS's FP8 matmul takes.

    `keep_transposed`: keep the weight's second e4m3 layout (input gradient) instead of making it per backward;
    `fused_quant`: `Quantizer`'s `fused` (None: torch.compile on CUDA, eager on the CPU); `share_inputs`: quantize an
    input once for the layers that take it in a row (`SharedInput`). speed.fp8 runs the defaults; the others are
    there for benchmarks/fp8_check.py, which times each change alone."""
    quantizer = Quantizer(fused_quant)
    shared = SharedInput(quantizer) if share_inputs else None
    layers, planned, left = [], 0, []
    for layer in fused.layers:
        eligible = fp8_base(layer)
        if eligible is not True:
            if eligible:
                left.append(eligible)
            continue
        out_features, in_features = layer.base_layer.weight.shape
        layer._vlmtune_fp8 = Fp8Weight(rowwise=rowwise, keep_transposed=keep_transposed, quantizer=quantizer)
        if shared is not None:
            layer._vlmtune_fp8_shared = shared
        layers.append(layer)
        planned += planned_bytes(out_features, in_features, rowwise, keep_transposed)
    if not layers:
        return "no LoRA layer has a frozen 16-bit nn.Linear base whose dimensions FP8 matmuls take"
    # the held copy is dropped when the model's forward returns, not kept through the loss and the backward
    hook = fused.model.register_forward_hook(shared.clear) if shared is not None and fused.model is not None else None
    return Fp8Layers(layers, planned, left, quantizer, shared, hook)
