"""One attention call for many independent sequences: PyTorch's variable-length flash kernel (`varlen_attn`).

Two places attend over several sequences that must not see each other:
- the Qwen vision towers: each image (Qwen2.5-VL: each window too) is its own sequence. With SDPA, transformers
  splits query/key/value per image in every block (`lengths.tolist()`: one host sync per block) and calls SDPA once
  per image and block (the W5 profile: ~880 calls per step, benchmarks/RESULTS.md);
- packed rows (`speed.packing`): vlmtune's span attention (`packed_attention.py`) calls SDPA once per sample and
  layer, in the forward, the checkpointed recomputation and the backward.
`torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.9, CUDA, 16-bit) takes all the tokens concatenated with their
cumulative lengths: one kernel per block or layer, work = the sum of the squared lengths, no host sync.

The vision tower's attention is registered in transformers' AttentionInterface under a name containing "flash":
transformers' Qwen vision code then hands over `cu_seqlens` and `max_seqlen` (computed once per forward), as it
does for the flash-attn package (which stays optional: it does not install from a wheel). Packed rows get the
cumulative lengths from their position ids (restarting at 0 per sample), computed once per forward. Anything the
kernel cannot take (CPU, fp32, dropout, padded batches with a mask) goes through SDPA per sequence, as before.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from vlmtune.speed.packed_attention import _segments, is_packed, packed_mask, packed_sdpa_attention

VISION_NAME = "vlmtune_flash_varlen"
"""Contains "flash": transformers' vision attention then passes cu_seqlens / max_seqlen (is_flash_attention_requested)."""
PACKED_NAME = "vlmtune_packed_varlen"
"""No "flash": the language model keeps SDPA's mask logic for padded batches."""


@functools.cache
def _varlen_fn() -> Any | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _parameters(fn: Any) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def varlen_unavailable(device: str) -> str | None:
    """Why the kernel cannot run here (None when it can)."""
    if device != "cuda" or not torch.cuda.is_available():
        return "training runs on the CPU (varlen_attn is a CUDA kernel)"
    if _varlen_fn() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (PyTorch >= 2.9)"
    return None


def _usable(query: Tensor, dropout: float) -> bool:
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] <= 256
        and dropout == 0.0
        and _varlen_fn() is not None
    )


def _call_varlen(
    q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scaling: float | None, causal: bool
) -> Tensor:
    """q/k/v: (tokens, heads, dim); grouped-query k/v (fewer heads) are repeated when the kernel cannot group."""
    fn = _varlen_fn()
    params = _parameters(fn)
    kwargs: dict[str, Any] = {"scale": scaling if scaling is not None else 1.0 / math.sqrt(q.shape[-1])}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    if causal:
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0)
        else:
            kwargs["is_causal"] = True
    return fn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def vision_varlen_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' flash-attention calling convention: query (1, heads, tokens, dim) holding every sequence,
    `cu_seq_lens_q` / `max_length_q`; returns (1, tokens, heads, dim)."""
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    if cu is None:
        raise ValueError(f"{VISION_NAME} is for attention over cu_seqlens (vision towers); got none")
    if _usable(query, dropout):
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
        out = _call_varlen(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
            cu.to(torch.int32), int(max_len), scaling, causal,
        )
        return out.unsqueeze(0), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = cu.tolist()
    outs = [
        sdpa_attention_forward(
            module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None,
            dropout=dropout, scaling=scaling, is_causal=causal,
        )[0]
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(outs, dim=1), None


@torch.compiler.disable
def _packed_cu(position_ids: Tensor, device: torch.device) -> tuple[Tensor, int]:
    """Cumulative lengths over the flattened rows (rows x length tokens), cached on the position tensor like the
    spans: every layer (and the recomputation) of one forward gets the same tensor. Run eagerly under speed.compile
    (host-side work on the positions; dynamo cannot trace pin_memory: the H100 run failed there)."""
    cached = getattr(position_ids, "_vlmtune_cu", None)
    if cached is not None:
        return cached
    length = position_ids.shape[-1]
    bounds, longest = [0], 0
    for row, spans in enumerate(_segments(position_ids)):
        for start, end in spans:
            bounds.append(row * length + end)
            longest = max(longest, end - start)
    cu = torch.tensor(bounds, dtype=torch.int32)
    if device.type == "cuda":  # from pinned memory: the copy does not wait for the GPU's queue
        cu = cu.pin_memory().to(device, non_blocking=True)
    position_ids._vlmtune_cu = (cu, longest)  # type: ignore[attr-defined]
    return cu, longest


def packed_varlen_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Causal attention of packed rows (no mask; positions restart at 0 per sample) in one varlen call; anything
    else (padding with a mask, a KV cache, CPU, fp32) goes to the per-span SDPA of `packed_sdpa_attention`."""
    position_ids = kwargs.get("position_ids")
    if not (is_packed(query, key, attention_mask, position_ids) and _usable(query, dropout)):
        return packed_sdpa_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, heads, length, dim = query.shape
    cu, longest = _packed_cu(position_ids, query.device)

    def flat(t: Tensor) -> Tensor:
        return t.transpose(1, 2).reshape(rows * length, t.shape[1], dim)

    out = _call_varlen(flat(query), flat(key), flat(value), cu, longest, scaling, causal=True)
    return out.reshape(rows, length, heads, dim), None


class VarlenAttention:
    """Sets the vision tower's (and, for packed rows, the language model's) attention to the varlen functions;
    `remove()` restores what each config had."""

    def __init__(self, configs: list[tuple[Any, str]]):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(VISION_NAME, vision_varlen_attention)
        AttentionInterface.register(PACKED_NAME, packed_varlen_attention)
        AttentionMaskInterface.register(PACKED_NAME, packed_mask)
        self._previous = [(config, config._attn_implementation) for config, _ in configs]
        self.names = []
        for config, name in configs:
            config._attn_implementation = name
            self.names.append(name)

    def remove(self) -> None:
        for config, previous in self._previous:
            config._attn_implementation = previous
        self._previous = []


def _config_of(hf_model: nn.Module, prefixes: tuple[str, ...]) -> Any | None:
    for prefix in prefixes:
        try:
            module = hf_model.get_submodule(prefix)
        except AttributeError:
            continue
        return getattr(module, "config", None)
    return None


def varlen_attention(
    hf_model: nn.Module,
    family: Any,
    device: str,
    packed: bool,
    require_kernel: bool = True,
) -> VarlenAttention | str:
    """Install the varlen attention on the vision tower when it attends over cu_seqlens (the Qwen towers) and on
    the language model when rows are packed. require_kernel=False installs it without a usable kernel (tests: the
    per-sequence SDPA fallback)."""
    if require_kernel and (why := varlen_unavailable(device)):
        return why
    configs: list[tuple[Any, str]] = []
    reasons = []
    vision = _config_of(hf_model, family.vision_prefixes)
    tower = next((m for m in hf_model.modules() if _attends_over_cu_seqlens(m)), None)
    if vision is None or tower is None:
        reasons.append("the vision tower does not attend over cu_seqlens (one sequence per image batch)")
    elif getattr(vision, "_attn_implementation", None) != "sdpa":
        reasons.append(f"the vision tower uses attention {vision._attn_implementation!r}, not sdpa")
    else:
        configs.append((vision, VISION_NAME))
    if packed:
        language = _config_of(hf_model, family.language_prefixes)
        current = getattr(language, "_attn_implementation", None)
        if current in ("sdpa", "vlmtune_packed_sdpa"):
            configs.append((language, PACKED_NAME))
        else:
            reasons.append(f"the language model uses attention {current!r}, not sdpa")
    if not configs:
        return "; ".join(reasons)
    return VarlenAttention(configs)


def _attends_over_cu_seqlens(module: nn.Module) -> bool:
    """A vision attention whose forward takes cu_seqlens (Qwen2-VL, Qwen2.5-VL, Qwen3-VL towers)."""
    if not type(module).__name__.endswith("Attention"):
        return False
    try:
        return "cu_seqlens" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
