"""Layers that run once per sample span of a packed row (`FamilyDescriptor.packed_span_modules`).

A layer that carries state along the sequence (Qwen3.5's gated DeltaNet: a recurrent state and a causal conv
window) cannot be kept apart by attention masks: in a packed row each sample would start from the state the sample
before it left. Here such a layer's forward is cut at the row's sample boundaries (positions restarting at 0, as
packed_attention.py reads them) and the layer's own forward runs on each span with no cache, the outputs
concatenated: its state and its conv window restart per sample exactly as in an unpacked batch, on whichever path
the layer takes (transformers' PyTorch reference or the fla / causal-conv1d kernels: each call sees one sequence).

The boundaries reach the layer through its parent (the decoder layer), which takes `position_ids` but does not hand
them to the layer: a forward pre-hook on the parent adds the spans to its keyword arguments, which the parent passes
on (`**kwargs`). Being arguments, not state, they are the same in gradient checkpointing's recomputation (which
replays the parent's forward with the arguments it was first called with, hooks left outside).

Cost: a Python loop over the row's samples in each such layer, with one set of kernel launches per sample; rows of
many short samples are slower than their padded batch would be there. Padded batches (an attention_mask), a KV
cache and rows of one sample run the layer as it is.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from vlmtune.speed.packed_attention import _segments

SPANS_KEY = "vlmtune_sample_spans"
_WHOLE_ROW = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
"""Sequence boundaries of the whole row (transformers' flash packing); each span is one sequence, so they go."""


def _parent_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    position_ids = kwargs.get("position_ids")
    if (position_ids is None or kwargs.get("attention_mask") is not None
            or kwargs.get("past_key_values") is not None):
        return None
    if position_ids.ndim == 3:  # M-RoPE rows reaching the layer: the first is the text row
        position_ids = position_ids[0]
    spans = _segments(position_ids)
    if all(len(row) == 1 for row in spans):
        return None
    return args, {**kwargs, SPANS_KEY: spans}


def _per_span_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    spans = kwargs.pop(SPANS_KEY, None)
    forward = type(self).forward
    if spans is None:
        return forward(self, hidden_states, *args, **kwargs)
    if args or kwargs.get("cache_params") is not None or kwargs.get("attention_mask") is not None:
        raise RuntimeError(f"{type(self).__name__} got sample spans with a cache, a mask or positional arguments")
    rest = {k: v for k, v in kwargs.items() if k not in _WHOLE_ROW}
    rows = [torch.cat([forward(self, hidden_states[b : b + 1, s:e], **rest) for s, e in row], dim=1)
            for b, row in enumerate(spans)]
    return torch.cat(rows, dim=0)


class SpanLayers:
    """The installed per-span forwards and parent hooks; `remove()` restores the layers."""

    def __init__(self, pairs: list[tuple[nn.Module, nn.Module]]):
        self.layers = [layer for _, layer in pairs]
        self.handles = [parent.register_forward_pre_hook(_parent_hook, with_kwargs=True) for parent, _ in pairs]
        for layer in self.layers:
            layer.forward = types.MethodType(_per_span_forward, layer)  # type: ignore[method-assign]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for layer in self.layers:
            del layer.forward
        self.handles, self.layers = [], []


def span_layers(
    hf_model: nn.Module, leaf_names: tuple[str, ...], language_prefixes: tuple[str, ...]
) -> SpanLayers | str:
    """Run the language model's modules named `leaf_names` once per packed sample span, or say why not."""
    for prefix in language_prefixes:
        try:
            language_model = hf_model.get_submodule(prefix)
        except AttributeError:
            continue
        pairs = [(parent, child) for parent in language_model.modules()
                 for name, child in parent.named_children() if name in leaf_names]
        if not pairs:
            return f"no module named {' / '.join(leaf_names)} in the language model {prefix!r}"
        if any("forward" in vars(child) for _, child in pairs):
            return f"the {' / '.join(leaf_names)} layers' forward is already replaced on the instance"
        return SpanLayers(pairs)
    return f"no language model among {language_prefixes}"
