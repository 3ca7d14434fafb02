"""FP8 matmuls for the frozen base weights of LoRA layers (`speed.fp8`), inside the fused LoRA function.

A frozen base layer `y = x W^T (+ b)` needs two matmuls per step: the forward and the input gradient `dx = g W`
(no weight gradient: W is frozen). Both run here as `torch._scaled_mm` on e4m3 operands with fp32 scales, writing
the compute dtype (bf16 on a GPU):

    forward         y  = (x_q s_x) (W_q s_w)^T         x_q: e4m3 per token row, s_x: (tokens, 1)
                                                       W_q: e4m3 per output row, s_w: (1, out)
    input gradient  dx = ((g s_w)_q s_g) W_q           g scaled by s_w per column first (the weight's per-row scale
                                                       lies on the contracted dimension there, where _scaled_mm
                                                       takes no scale), then e4m3 per token row, s_g: (tokens, 1)

Scales come from each row's absolute maximum (amax / 448, e4m3's largest finite value), so nothing saturates; the
per-tensor variant (one scale per operand) is used where the GPU's PyTorch has no row-wise kernel. Gradients use
e4m3 too (with a scale per row their range is that of the row; torchao's row-wise recipe does the same).

Memory: the e4m3 copy of W and its scales are computed once, at the layer's first call, and kept (1 byte per weight
plus 4 bytes per output row): the base is frozen. The bf16 weight is kept as well: PEFT's own forward (taken wherever
the fused function does not cover a call), merging, DDP's start-up broadcast and `remove()` read it, and getting it
back from e4m3 would be lossy. The input gradient needs the e4m3 weight in the other layout too (cuBLAS takes FP8
operands only with the contracted dimension contiguous); `keep_transposed` (what `speed.fp8` uses) makes it once
with the first copy and keeps it, another byte per weight: the e4m3 copies add the base weights' bf16 size in all
(2 of their 2 bytes per weight). Without it the transposed copy is made and dropped in every backward call (measured
on an H100 at 4,096 tokens: 0.09 ms of q_proj's 0.49, 0.53 ms of gate_proj's 2.07).

Activations and gradients are quantized by a `Quantizer`: on CUDA tensors, two small torch.compile'd functions (a
row-wise amax pass and one fused scale + cast pass, the weight's row scales folded into the gradient's columns in
the same pass) instead of eager's separate amax, clamp, divide, reciprocal, multiply, cast and fold kernels; the
same numbers (inductor is told to round as eager does: `emulate_precision_casts`). `SharedInput` quantizes an input
once for all the layers that take the same tensor one after another (q/k/v_proj, gate/up_proj).

The copy follows the weight: a new device, storage or in-place change (its version counter) rebuilds it.

Under speed.compile, which switches the fused LoRA layers off, the same quantization and scaled matmuls run from
speed/fp8_compiled.py: traced by torch.compile with the decoder layers, the weight's copies made once at install
(measured once on an H100, Qwen2.5-VL-7B, 4 x 1,023 tokens, 40 steps: 1.16x compiled bf16's tokens/s, loss +0.31%,
+12.3 GiB reserved; session 19).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn if hasattr(torch, "float8_e4m3fn") else None
E4M3_MAX = 448.0
"""The largest finite e4m3fn value."""
TINY_AMAX = 1e-12
"""An all-zero row gets this amax: its scale stays finite and its e4m3 values 0."""
FAST_ACCUM_FORWARD = True
"""Hopper's faster FP8 accumulation for the forward matmul only (torchao's default as well); the input gradient
accumulates at full precision."""


def quantize(t: torch.Tensor, rowwise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, fp32 scale) of a 2-D tensor with `t ≈ values * scale`: relative error at most 2^-4 per element
    for elements above e4m3's normal range of the row's scale (smaller ones keep an absolute error under
    scale * 2^-10). The scale maps `t`'s absolute maximum (per row, shape (rows, 1), or over the tensor, shape ())
    onto e4m3's largest value."""
    values, scale = (_rows if rowwise else _whole)(t)
    # contiguous: cuBLAS takes FP8 operands row-major, and an elementwise result keeps a strided input's layout
    return values.contiguous(), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (values.float() * scale).to(dtype)


def scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    fast_accum: bool = False,
) -> torch.Tensor:
    """`(a scale_a) @ (b scale_b)` in `out_dtype`; `a` row-major, `b` column-major (a transposed row-major tensor)."""
    return torch._scaled_mm(
        a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=fast_accum and a.is_cuda
    )


def _cast(t: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize`'s arithmetic after the amax, eager there and torch.compile'd by `Quantizer`. Scaled in t's own
    dtype: a bf16 rounding of the inverse leaves |value| < 450, which e4m3 rounds to 448."""
    scale = amax.float().clamp(min=TINY_AMAX) / E4M3_MAX
    return (t * scale.reciprocal().to(t.dtype)).to(torch.float8_e4m3fn), scale


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _cast(t, t.abs().amax(dim=-1, keepdim=True))


def _rows_folded(t: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = t * columns.to(t.dtype)
    return _cast(t, t.abs().amax(dim=-1, keepdim=True))


def _whole(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _cast(t, t.abs().amax())


class Quantizer:
    """e4m3 values and fp32 scales of an activation or gradient (2-D): fused by torch.compile or eager (`quantize`).

    `fused`: True compiles on any device (the CPU too: inductor's C++ backend, for tests), None only for CUDA tensors
    (where eager's seven small kernels per call cost more than the FP8 matmul saves; the default), False never. One
    code object per variant (rows, rows with the weight's scales folded in, whole tensor) keeps each under Dynamo's
    recompile limit; dynamic shapes: the token count changes every batch. A compile that fails logs why once and
    leaves this quantizer eager."""

    def __init__(self, fused: bool | None = None):
        self.fused = fused
        self.calls = 0
        self.compiled_calls = 0
        self.failed: str | None = None
        self._compiled: dict[str, Any] = {}

    def __call__(
        self, t: torch.Tensor, rowwise: bool = True, columns: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`quantize(t * columns, rowwise)`; `columns` (1, t's columns) fp32, row-wise only."""
        self.calls += 1
        fn, args = (_rows_folded, (t, columns)) if columns is not None else ((_rows if rowwise else _whole), (t,))
        if self._use_compiled(t):
            try:
                values, scale = self._compiled_fn(fn)(*args)
            except torch.OutOfMemoryError:
                raise  # not a compile problem: eager would need the memory as well
            except (RuntimeError, torch._dynamo.exc.FailOnRecompileLimitHit) as exc:
                self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                log.warning("speed.fp8: the fused quantization does not compile here, eager from now on (%s)",
                            self.failed)
            else:
                self.compiled_calls += 1
                return values.contiguous(), scale  # contiguous: a strided input can give a strided result
        if columns is not None:
            t = t * columns.to(t.dtype)
        return quantize(t, rowwise)

    def _use_compiled(self, t: torch.Tensor) -> bool:
        if self.failed is not None or self.fused is False:
            return False
        return self.fused is True or t.is_cuda

    def _compiled_fn(self, fn: Any) -> Any:
        if fn.__name__ not in self._compiled:
            self._compiled[fn.__name__] = torch.compile(
                fn, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True}
            )
        return self._compiled[fn.__name__]


class SharedInput:
    """The e4m3 copy of the last layer input quantized, reused by the next layers that take the same tensor
    (q/k/v_proj take one normed hidden state, gate/up_proj another): one quantization instead of three or two.

    The hit needs the very tensor object (a weak reference, never a strong one) with the same data pointer, shape,
    strides and version counter (an in-place change misses). At most one copy is held: it is dropped when another
    input comes, when the input tensor is freed, and by `clear()` (the fused layers call it when the model's forward
    returns, so the copy does not sit through the loss and backward). Gradient checkpointing's recomputation
    produces new tensors: they miss once and share again, with the same values as the first forward's."""

    def __init__(self, quantizer: Quantizer):
        self.quantizer = quantizer
        self.reuses = 0
        self._ref: weakref.ref | None = None
        self._key: tuple = ()
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, x: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, scale) of `x` as (tokens, features), quantized now or taken from the previous layer."""
        key = (x.data_ptr(), x._version, tuple(x.shape), x.stride(), x.dtype, x.device, rowwise)
        if self._value is not None and self._ref is not None and self._ref() is x and self._key == key:
            self.reuses += 1
            return self._value
        self.clear()
        with torch.no_grad():
            value = self.quantizer(x.detach().reshape(-1, x.shape[-1]), rowwise)
        self._ref, self._key, self._value = weakref.ref(x, self._freed), key, value
        return value

    def held(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._value

    def clear(self, *_: Any) -> None:
        self._ref, self._key, self._value = None, (), None

    def _freed(self, ref: weakref.ref) -> None:
        if ref is self._ref:
            self.clear()


@dataclass
class Fp8Weight:
    """The e4m3 copy of one frozen weight (out x in) and its scales, built at first use and rebuilt when the weight
    moves or changes."""

    rowwise: bool = True
    keep_transposed: bool = False
    values: torch.Tensor | None = None
    """(out, in) e4m3, row-major."""
    scale: torch.Tensor | None = None
    """(1, out) fp32 row-wise, () per tensor."""
    transposed: torch.Tensor | None = None
    """(out, in) e4m3 stored column-major (`values.t().contiguous().t()`), when kept."""
    ones: torch.Tensor | None = None
    """(1, in) fp32 ones: the input gradient's b scale when the weight's scales are folded into the gradient."""
    quantizer: Quantizer = field(default_factory=Quantizer)
    """Quantizes the activations and gradients (the weight itself: eager `quantize`, once)."""
    key: tuple = ()
    builds: int = field(default=0)

    def of(self, weight: torch.Tensor) -> Fp8Weight:
        key = (weight.device, weight.data_ptr(), weight._version, tuple(weight.shape))
        if key != self.key:
            self._build(weight)
            self.key = key
        return self

    @torch.no_grad()
    def _build(self, weight: torch.Tensor) -> None:
        self.values, scale = quantize(weight.detach(), self.rowwise)
        self.scale = scale.view(1, -1) if self.rowwise else scale
        self.ones = torch.ones(1, weight.shape[1], device=weight.device) if self.rowwise else None
        self.transposed = self._transposed() if self.keep_transposed else None
        self.builds += 1

    def _transposed(self) -> torch.Tensor:
        assert self.values is not None
        return self.values.t().contiguous().t()

    def nbytes(self) -> int:
        kept = [self.values, self.scale, self.transposed, self.ones]
        return sum(t.numel() * t.element_size() for t in kept if t is not None)

    def forward(
        self, x2: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x2 (tokens, in) -> x2 W^T (tokens, out) in x2's dtype; `quantized`: x2's (values, scale) when made already
        (`SharedInput`), with this weight's `rowwise`."""
        assert self.values is not None and self.scale is not None
        x_q, s_x = quantized if quantized is not None else self.quantizer(x2, self.rowwise)
        return scaled_mm(x_q, self.values.t(), s_x, self.scale, x2.dtype, fast_accum=FAST_ACCUM_FORWARD)

    def input_grad(self, g: torch.Tensor) -> torch.Tensor:
        """g (tokens, out) -> g W (tokens, in) in g's dtype."""
        assert self.values is not None and self.scale is not None
        w = self.transposed if self.transposed is not None else self._transposed()
        if self.rowwise:
            g_q, s_g = self.quantizer(g, rowwise=True, columns=self.scale)
            return scaled_mm(g_q, w, s_g, self.ones, g.dtype)
        g_q, s_g = self.quantizer(g, rowwise=False)
        return scaled_mm(g_q, w, s_g, self.scale, g.dtype)


def planned_bytes(out_features: int, in_features: int, rowwise: bool, keep_transposed: bool = False) -> int:
    """What `Fp8Weight` keeps for a weight of this shape (before it is built)."""
    values = out_features * in_features * (2 if keep_transposed else 1)
    return values + (4 * (out_features + in_features) if rowwise else 4)


def cuda_shape_ok(out_features: int, in_features: int) -> bool:
    """cuBLAS FP8 matmuls take inner and outer dimensions that are multiples of 16 (the token count may be any)."""
    return out_features % 16 == 0 and in_features % 16 == 0
