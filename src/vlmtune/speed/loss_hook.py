"""Route the model's training loss through `chunked_causal_lm_loss`, without changing how the model is called.

The Trainer keeps calling `model(**batch)` with labels, through whatever wraps the model (PEFT, DDP, DeepSpeed), and
the model keeps calling `self.lm_head(hidden)` and `self.loss_function(logits, labels, ...)`. Three hooks:
- a forward pre-hook on the outermost model sees the call's `labels` / `num_items_in_batch` (a call without labels,
  such as generation, changes nothing);
- lm_head's forward, during such a call, computes the chunked loss from its input and its own weight (inside the
  module's forward, so ZeRO-3's gather hooks have the weight in place) and returns an empty `(batch, seq, 0)` tensor
  computed from the loss instead of the logits;
- the model's `loss_function` (transformers' documented setter) returns that loss, plus the empty tensor's sum (0),
  when handed that empty tensor: the loss's backward runs after lm_head's output hooks (ZeRO-3 gathers the weight
  there again), as for a plain lm_head.
Everything is removed by `remove()`; nothing is patched at import time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from vlmtune.errors import VlmtuneError
from vlmtune.speed.chunked_ce import checkpointed_causal_lm_loss, chunked_causal_lm_loss

log = logging.getLogger(__name__)


@dataclass
class _Call:
    labels: Tensor
    num_items_in_batch: Any
    shift_labels: Tensor | None
    marker: Tensor | None = None
    loss: Tensor | None = None


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def find_head(hf_model: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for name in names:
        try:
            return name, hf_model.get_submodule(name)
        except AttributeError:
            continue
    return None


def head_unsupported(head: nn.Module) -> str | None:
    """Why the fused chunked loss cannot use this lm_head's weight directly (None when it can)."""
    if not isinstance(head, nn.Linear):
        return f"lm_head is a {type(head).__name__}, not a plain Linear (adapted or wrapped)"
    if not head.weight.is_floating_point():
        return f"lm_head's weight is {head.weight.dtype} (quantized)"
    return None


class ChunkedLossHook:
    """Installs the chunked loss on `outer` (the model the Trainer calls) whose transformers model is `hf_model`."""

    def __init__(self, outer: nn.Module, hf_model: nn.Module, head: nn.Module, chunk_tokens: int):
        self.outer, self.hf_model, self.head, self.chunk_tokens = outer, hf_model, head, chunk_tokens
        self.fused = head_unsupported(head) is None
        """A plain Linear head: gradients computed in the loss's forward. Otherwise (a 4-bit or wrapped head) each
        chunk calls the head's own forward under checkpointing."""
        self._call: _Call | None = None
        self._handles: list[Any] = []
        self._original_head_forward = head.forward
        self._had_loss_function = "_loss_function" in vars(hf_model)
        self._original_loss = hf_model.loss_function

    def install(self) -> ChunkedLossHook:
        self._handles = [
            self.outer.register_forward_pre_hook(self._arm, with_kwargs=True),
            self.outer.register_forward_hook(self._disarm, always_call=True),
        ]
        self.head.forward = self._head_forward  # type: ignore[method-assign]
        self.hf_model.loss_function = self._loss_function
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.head.forward = self._original_head_forward  # type: ignore[method-assign]
        if self._had_loss_function:
            self.hf_model.loss_function = self._original_loss
        else:
            vars(self.hf_model).pop("_loss_function", None)
        self._call = None

    # ---- hooks ----
    def _arm(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        labels = kwargs.get("labels")
        self._call = (
            None
            if labels is None
            else _Call(labels, kwargs.get("num_items_in_batch"), kwargs.get("shift_labels"))
        )

    def _disarm(self, *args: Any, **kwargs: Any) -> None:
        self._call = None

    def _head_forward(self, hidden: Tensor) -> Tensor:
        call = self._call
        if call is None or call.marker is not None:
            return self._original_head_forward(hidden)
        if hidden.shape[:-1] != call.labels.shape and call.shift_labels is None:
            raise VlmtuneError(
                f"chunked loss: lm_head got hidden states of shape {tuple(hidden.shape)} for labels of shape "
                f"{tuple(call.labels.shape)} (logits_to_keep set?); set speed.chunked_loss=false"
            )
        if self.fused:
            call.loss = chunked_causal_lm_loss(
                hidden,
                self.head.weight,
                call.labels,
                bias=self.head.bias,  # type: ignore[arg-type]
                num_items_in_batch=call.num_items_in_batch,
                shift_labels=call.shift_labels,
                chunk_tokens=self.chunk_tokens,
            )
        else:
            call.loss = checkpointed_causal_lm_loss(
                hidden,
                self._original_head_forward,
                call.labels,
                num_items_in_batch=call.num_items_in_batch,
                shift_labels=call.shift_labels,
                chunk_tokens=self.chunk_tokens,
            )
        # The empty `(batch, seq, 0)` stand-in for the logits is computed from the loss, and the loss handed back
        # is computed from the stand-in as it comes out of lm_head's forward (`_loss_function`): backward then
        # passes through whatever hooks lm_head's output carries before it reaches the loss's own backward.
        # ZeRO-3 re-gathers lm_head's weight in such a hook; without it, a trainable head's gradient arrives at
        # a released (0-element) weight on more than one GPU.
        call.marker = call.loss.reshape(1, 1, 1) * hidden.new_zeros((*hidden.shape[:-1], 0), dtype=call.loss.dtype)
        return call.marker

    def _loss_function(
        self, logits: Tensor, labels: Tensor | None = None, *args: Any, **kwargs: Any
    ) -> Tensor:
        call = self._call
        if call is not None and call.marker is not None:
            # ZeRO-3's module hooks hand lm_head's output on as a new tensor, so the marker is recognised by its
            # empty vocabulary axis, not by identity (models that soft-cap logits are refused at install).
            if logits.shape != call.marker.shape:
                raise VlmtuneError(
                    f"chunked loss: {type(self.hf_model).__name__} changed the lm_head output before its loss "
                    "(e.g. logit soft-capping); the chunked loss cannot reproduce that. Set speed.chunked_loss=false"
                )
            assert call.loss is not None
            return call.loss + logits.sum()  # + 0: through lm_head's output and its hooks (see _head_forward)
        return self._original_loss(logits, labels, *args, **kwargs)


def install_chunked_loss(
    outer: nn.Module, lm_head_names: tuple[str, ...], chunk_tokens: int
) -> ChunkedLossHook | str:
    """Install the chunked loss on `outer`; returns the hook, or the reason it cannot be used on this model."""
    hf_model = unwrap_peft(outer)
    if not hasattr(type(hf_model), "loss_function"):
        return f"{type(hf_model).__name__} has no loss_function to route"
    text_config = getattr(hf_model.config, "get_text_config", lambda: hf_model.config)()
    if getattr(text_config, "final_logit_softcapping", None):
        return f"{type(hf_model).__name__} soft-caps its logits, which the chunked loss does not reproduce"
    found = find_head(hf_model, lm_head_names)
    if found is None:
        return f"no lm_head among {lm_head_names}"
    name, head = found
    hook = ChunkedLossHook(outer, hf_model, head, chunk_tokens)
    log.debug(
        "chunked loss on %s (%s), %d tokens per chunk",
        name,
        "fused" if hook.fused else f"checkpointed: {head_unsupported(head)}",
        chunk_tokens,
    )
    return hook.install()
