"""Causal-LM cross-entropy straight from the last hidden states and the lm_head weight, in chunks of tokens.

HF's `ForCausalLMLoss` needs the full `batch x seq x vocab` logits, upcasts them to fp32 and keeps a log-softmax
for backward: about 12 bytes per token per vocabulary entry at the start of backward (1.7 MiB per token for Qwen's
152k vocabulary; memory_anchors.md §6.4). Here only labelled positions (label != -100 after the shift) are projected,
a chunk of tokens at a time, and the gradients with respect to the hidden states (and the weight, when it trains)
are computed in the same pass, as Liger's fused linear cross-entropy does: the live memory is one chunk's logits,
and no logits are recomputed in backward. The loss only ever reaches the optimizer multiplied by a scalar (gradient
accumulation, loss scaling), so backward just scales the stored gradients.

Numerics follow HF: the matmul runs in the autocast dtype (or the weight's dtype without autocast), the logits are
upcast to fp32 for the log-sum-exp, and the result is `sum / num_items_in_batch` (or the mean over labelled tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ weight.T + bias, targets) * scale, with the gradients computed in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        scale: Tensor,
        chunk: int,
        dtype: torch.dtype,
    ) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        h, w = hidden.to(dtype), weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk):
                hc, tc = h[start : start + chunk], targets[start : start + chunk]
                logits = (hc @ w.t() if b is None else torch.addmm(b, hc, w.t())).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(tc.shape[0], device=tc.device), tc] -= 1.0
                d = probs.mul_(scale).to(dtype)  # d loss / d logits of this chunk
                del logits, probs
                if grad_h is not None:
                    grad_h[start : start + chunk] = (d @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w += (d.t() @ hc).float()
                if grad_b is not None:
                    grad_b += d.float().sum(0)
        ctx.grads = (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )  # type: ignore[union-attr]
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grads = tuple(None if g is None else g * grad_out.to(g.dtype) for g in ctx.grads)
        ctx.grads = None
        return (*grads, None, None, None, None)


def labelled_rows(
    hidden: Tensor,
    labels: Tensor | None,
    shift_labels: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """(hidden states at positions that predict a label, those labels): HF's shift (position t predicts t+1).

    One nonzero finds the rows for both (a host sync on a GPU: their count sets the shapes); index_select's backward
    scatters without another. Boolean indexing (`hidden[keep]`, `labels[keep]`) synced three times per step."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("chunked loss needs labels or shift_labels")
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat_labels = shift_labels.to(hidden.device).reshape(-1)
    rows = (flat_labels != ignore_index).nonzero().squeeze(1)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), flat_labels.index_select(0, rows)


def chunked_causal_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor | None,
    *,
    bias: Tensor | None = None,
    num_items_in_batch: Tensor | int | None = None,
    shift_labels: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int = 1024,
) -> Tensor:
    """The loss `ForCausalLMLoss(hidden @ weight.T + bias, labels, num_items_in_batch)` would give, without the logits.

    hidden: (batch, seq, hidden) last hidden states (after the final norm); labels: (batch, seq) with -100 where no
    loss is taken. With `num_items_in_batch` the sum is divided by it (the Trainer's count over the whole accumulated
    batch), otherwise by the number of labelled tokens here.
    """
    rows, targets = labelled_rows(hidden, labels, shift_labels, ignore_index)
    count = targets.shape[0]
    divisor = num_items_in_batch if num_items_in_batch is not None else count
    scale = 1.0 / torch.as_tensor(divisor, dtype=torch.float32, device=hidden.device).clamp_min(1)
    dtype = _compute_dtype(hidden, weight)
    if (
        count == 0
    ):  # nothing to learn here; a zero that keeps hidden and weight in the graph (DDP expects them)
        return hidden.sum() * 0.0 + (weight.sum() * 0.0 if weight.requires_grad else 0.0)
    if (
        not torch.is_grad_enabled()
    ):  # evaluation: no gradients to precompute (a full-FT head's would be V x H fp32)
        rows, weight = rows.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
    return _LinearCrossEntropy.apply(rows, weight, bias, targets, scale, chunk_tokens, dtype)


def _ce_sum(head: Any, rows: Tensor, targets: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(head(rows).float(), targets, reduction="sum")


def checkpointed_causal_lm_loss(
    hidden: Tensor,
    head: Any,
    labels: Tensor | None,
    *,
    num_items_in_batch: Tensor | int | None = None,
    shift_labels: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int = 1024,
) -> Tensor:
    """`chunked_causal_lm_loss` for any head module (a 4-bit lm_head, a wrapped one): each chunk's logits come from
    calling `head` under activation checkpointing, so they are recomputed in backward instead of kept."""
    from torch.utils.checkpoint import checkpoint

    rows, targets = labelled_rows(hidden, labels, shift_labels, ignore_index)
    divisor = num_items_in_batch if num_items_in_batch is not None else targets.shape[0]
    scale = 1.0 / torch.as_tensor(divisor, dtype=torch.float32, device=hidden.device).clamp_min(1)
    if targets.shape[0] == 0:
        return hidden.sum() * 0.0
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_tokens):
        piece = (rows[start : start + chunk_tokens], targets[start : start + chunk_tokens])
        total = total + checkpoint(_ce_sum, head, *piece, use_reentrant=False)
    return total * scale
