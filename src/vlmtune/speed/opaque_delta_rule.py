"""The PyTorch reference of the gated delta rule as one opaque operator, so that `speed.compile` can compile the
linear-attention layers around it (Qwen3.5's gated DeltaNet on transformers' `torch_chunk_gated_delta_rule`).

Why: the reference runs a Python loop over the sequence's 64-token chunks. torch.compile unrolls that loop, so every
new chunk count (a new sequence length, i.e. nearly every batch) compiles the layer again: on an H100 (Qwen3.5-9B
LoRA) the first compiled step took 87 s and the second had not finished 200 s later (benchmarks/RESULTS.md, session
14). Here the whole function is one `torch.library` custom operator: dynamo puts a single node in the layer's graph
(no graph break, so the layer still compiles whole, through its checkpointing wrapper), the loop runs eagerly inside
it exactly as in an eager run, and the projections, convolution, norms, gates, MLP and LoRA around it compile as in
any other family.

Its backward is a second opaque operator that runs the delta rule again under `torch.func.vjp` and takes the
gradients of its five inputs (query, key, value, g, beta). Outside compiled code the same forward and backward run as
a plain autograd function (`Recomputed`), whose backward re-runs it with autograd: less host time per op.
Either way only those inputs are saved, not the reference's fp32 intermediates, and the delta rule's forward runs
once more per backward (with checkpointing, three times per step instead of two).

The operator computes what the reference computes with vlmtune's own implementation (speed/delta_rule.py: the same
matmuls, fewer operators around them) in 128-token chunks instead of 64 (`CHUNK`): the same result up to rounding,
in a third of the reference's operators per forward and backward.

Only the training call is routed through the operator: no initial state, no final state asked for, no `cu_seqlens`
(packed rows reach these layers one sample at a time through `packed_span_modules`). Any other call (generation with a
cache) runs the reference as it is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from vlmtune.families.linear_attention import packed_sequences_error
from vlmtune.speed.delta_rule import chunk_gated_delta_rule

CHUNK = 128
"""Tokens per chunk the operator runs the delta rule with (transformers' default: 64). The chunked algorithm is exact
for any chunk size: in fp32 the results differ by rounding (1e-6 relative at 128 against 64, 2e-6 at 256, on
random Qwen3.5-like inputs), and under bf16 autocast all sizes are 3.8e-3 from fp32 alike. The sequential loop over
chunks is most of the operators: at Qwen3.5-9B's widths, 2 x 708 tokens, transformers' reference calls 1,329 aten
operators in forward and backward at 64 and 783 at 128; speed/delta_rule.py at 128 calls 450 (CPU count,
TorchDispatchMode). Whether that speeds a GPU step up is not measured yet (benchmarks/RESULTS.md, session 16)."""


def _run(autocast: str, query, key, value, g, beta, use_qk_l2norm: bool) -> torch.Tensor:
    """The delta rule's output (speed/delta_rule.py, the reference's computation in fewer operators), under the
    caller's autocast (a custom operator's body runs with autocast off): `autocast` is "" or the autocast dtype's
    name, e.g. "bfloat16"."""
    with torch.autocast(query.device.type, dtype=getattr(torch, autocast or "float32"), enabled=bool(autocast)):
        return chunk_gated_delta_rule(query, key, value, g, beta, CHUNK, use_qk_l2norm)


@torch.library.custom_op("vlmtune::gated_delta_rule", mutates_args=())
def gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, use_qk_l2norm: bool, autocast: str) -> torch.Tensor:
    with torch.no_grad():
        return _run(autocast, query, key, value, g, beta, use_qk_l2norm)


@gated_delta_rule.register_fake
def _(query, key, value, g, beta, use_qk_l2norm, autocast):
    return value.new_empty(value.shape, dtype=query.dtype)


@torch.library.custom_op("vlmtune::gated_delta_rule_backward", mutates_args=())
def gated_delta_rule_backward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    grad_out: torch.Tensor, use_qk_l2norm: bool, autocast: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # torch.func.vjp: autograd does not record inside a custom operator's body, the functional transform does
    _, pullback = torch.func.vjp(
        lambda *inputs: _run(autocast, *inputs, use_qk_l2norm), query, key, value, g, beta
    )
    return tuple(grad.contiguous() for grad in pullback(grad_out))


@gated_delta_rule_backward.register_fake
def _(query, key, value, g, beta, grad_out, use_qk_l2norm, autocast):
    return tuple(torch.empty_like(t) for t in (query, key, value, g, beta))


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, g, beta, use_qk_l2norm, autocast = inputs
    ctx.save_for_backward(query, key, value, g, beta)
    ctx.use_qk_l2norm, ctx.autocast = use_qk_l2norm, autocast


def _backward(ctx, grad_out):
    grads = gated_delta_rule_backward(*ctx.saved_tensors, grad_out.contiguous(), ctx.use_qk_l2norm, ctx.autocast)
    return (*grads, None, None)


gated_delta_rule.register_autograd(_backward, setup_context=_setup_context)


class Recomputed(torch.autograd.Function):
    """The eager form of the operator: the same forward and saved inputs, and a backward that re-runs the delta rule
    with plain autograd. Dynamo needs the custom operator; outside compiled code this is what runs, because
    `torch.func.vjp` (which the operator's body needs) costs more host time per op: on the CPU at small widths, the
    reference's forward + backward took 11-12 ms under vjp against 8-9 ms under autograd."""

    @staticmethod
    def forward(ctx, query, key, value, g, beta, use_qk_l2norm: bool, autocast: str):  # type: ignore[override]
        ctx.save_for_backward(query, key, value, g, beta)
        ctx.use_qk_l2norm, ctx.autocast = use_qk_l2norm, autocast
        return _run(autocast, query, key, value, g, beta, use_qk_l2norm)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        needs = ctx.needs_input_grad[:5]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs, strict=True)]
        wanted = [t for t in inputs if t.requires_grad]
        with torch.enable_grad():
            out = _run(ctx.autocast, *inputs, ctx.use_qk_l2norm)
            grads = iter(torch.autograd.grad(out, wanted, grad_out)) if wanted else iter(())
        return (*(next(grads) if need else None for need in needs), None, None)


def opaque(reference: Callable[..., Any]) -> Callable[..., Any]:
    """`reference` (transformers' `torch_chunk_gated_delta_rule`) with its training calls run as the operator."""

    @functools.wraps(reference)
    def delta_rule(query, key, value, g=None, beta=None, initial_state=None, output_final_state=False,
                   use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):
        if cu_seqlens is not None:
            raise packed_sequences_error(reference)
        if initial_state is not None or output_final_state or kwargs.get("chunk_size", 64) != 64:
            return reference(query, key, value, g=g, beta=beta, initial_state=initial_state,
                             output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                             **kwargs)
        device = query.device.type
        autocast = str(torch.get_autocast_dtype(device)).removeprefix("torch.") \
            if torch.is_autocast_enabled(device) else ""
        run = gated_delta_rule if torch.compiler.is_compiling() else Recomputed.apply
        out = run(query.contiguous(), key.contiguous(), value.contiguous(), g.contiguous(), beta.contiguous(),
                  bool(use_qk_l2norm_in_kernel), autocast)
        return out, None

    delta_rule.operator = gated_delta_rule  # type: ignore[attr-defined]
    return delta_rule
