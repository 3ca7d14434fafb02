"""Attention for packed rows without a `length x length` mask: causal SDPA over each sample's own span.

transformers isolates the samples of a packed row (positions restarting at 0, no attention_mask) with a dense
block-diagonal mask for SDPA: `rows x length^2` booleans, and kernels that compute every masked block anyway (the
flash kernels take no arbitrary mask). This attention function instead cuts query/key/value at the sample
boundaries and runs causal SDPA (flash kernels on recent GPUs) per span, so the work is the sum of the squared
sample lengths. Registered in transformers' AttentionInterface under its own name and set on the language model
only (the vision tower keeps its attention); its mask function builds no mask for packed rows, and batches with
padding or a KV cache fall back to plain SDPA. flash-attn stays optional.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

NAME = "vlmtune_packed_sdpa"


def _segments(position_ids: Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of every span whose positions restart at 0. Computed once per forward: the same
    position tensor reaches every layer (and the checkpointed recomputation), so the result is kept on it."""
    cached = getattr(position_ids, "_vlmtune_segments", None)
    if cached is not None:
        return cached
    length = position_ids.shape[-1]
    rows = []
    for row in position_ids.reshape(-1, length).tolist():
        starts = [i for i, p in enumerate(row) if p == 0 or i == 0]
        rows.append(list(zip(starts, starts[1:] + [length], strict=True)))
    position_ids._vlmtune_segments = rows  # type: ignore[attr-defined]
    return rows


def is_packed(query: Tensor, key: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None) -> bool:
    """A packed row: no mask, no KV cache, and position ids for every query (they restart at 0 per sample)."""
    return (
        attention_mask is None
        and position_ids is not None
        and query.shape[2] == key.shape[2]
        and position_ids.shape[-1] == query.shape[2]
    )


def packed_sdpa_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if not is_packed(query, key, attention_mask, position_ids):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rest = {k: v for k, v in kwargs.items() if k not in ("position_ids", "is_causal")}
    rows = []
    for b, spans in enumerate(_segments(position_ids)):
        if len(spans) == 1:
            out, _ = sdpa_attention_forward(
                module,
                query[b : b + 1],
                key[b : b + 1],
                value[b : b + 1],
                None,
                dropout=dropout,
                scaling=scaling,
                is_causal=True,
                **rest,
            )
        else:
            out = torch.cat(
                [
                    sdpa_attention_forward(
                        module,
                        query[b : b + 1, :, s:e],
                        key[b : b + 1, :, s:e],
                        value[b : b + 1, :, s:e],
                        None,
                        dropout=dropout,
                        scaling=scaling,
                        is_causal=True,
                        **rest,
                    )[0]
                    for s, e in spans
                ],
                dim=1,
            )
        rows.append(out)
    return torch.cat(rows, dim=0), None


def packed_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """No mask for packed rows (the attention cuts them itself); SDPA's mask when there is padding."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


class PackedAttention:
    """Routes `language_model`'s attention through `packed_sdpa_attention`; `remove()` restores the previous one."""

    def __init__(self, language_model: nn.Module):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(NAME, packed_sdpa_attention)
        AttentionMaskInterface.register(NAME, packed_mask)
        self.config = language_model.config
        self.previous = self.config._attn_implementation
        self.config._attn_implementation = NAME

    def remove(self) -> None:
        self.config._attn_implementation = self.previous


def packed_attention(hf_model: nn.Module, language_prefixes: tuple[str, ...]) -> PackedAttention | str:
    for prefix in language_prefixes:
        try:
            language_model = hf_model.get_submodule(prefix)
        except AttributeError:
            continue
        current = getattr(getattr(language_model, "config", None), "_attn_implementation", None)
        if current != "sdpa":
            return f"the language model uses attention {current!r}; per-sample spans replace sdpa only"
        return PackedAttention(language_model)
    return f"no language model among {language_prefixes}"
