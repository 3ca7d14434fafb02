"""LoRA dropout inside compiled decoder layers that keeps no mask: the mask is a hash of each element's index and a
per-call seed, so backward computes it again instead of reading it back.

Why: under `speed.compile` the adapters run PEFT's own path (`fused_lora.py` is not traced), and PyTorch's dropout
draws its mask from the random generator. AOTAutograd's partitioner never recomputes a random op, so each compiled
layer keeps one 1-byte mask per adapted linear (seven per decoder layer) and the dropped copies some adapters' weight
gradients read: counted on the CPU with benchmarks/saved_activations.py --compile, Qwen2-VL-2B's compiled layer kept
103,736 bytes per token with LoRA dropout 0.05 against 73,272 without, more than an eager fused layer (97,560). On
W1 at Unsloth's memory compiled vlmtune was 0.10 GiB over (benchmarks/RESULTS.md session 19): the eager first layer,
then on PEFT's path, was its peak, and the compiled layers came next.

Here the mask is `fmix32((index + seed) * golden) >= p * 2^32`, murmur3's 32-bit finaliser over the element's flat
index, pure integer arithmetic; the seed is one random int64 per call (drawn on the device, no host sync). Being a
deterministic function of a saved scalar and the tensor's shape, the partitioner can recompute it in backward, fused
into the kernels that need it, and keep the layer's input (which q/k/v_proj and gate/up_proj share) instead of masks
and dropped copies. Each call draws a new seed, so masks differ between calls, layers and steps as PyTorch's do;
within a tensor the keep decisions are independent to the quality of the hash (tests/speed/test_hash_dropout.py
checks the keep rate and the correlation between neighbours). The masks are not PyTorch's: a compiled run does not
reproduce an eager run's dropout draw for draw (they never did: inductor has its own generator).

Applied to the adapters' dropout modules of the compiled layers only: the first decoder layer stays eager
(`compile_layers.py`), where autograd would keep the scaled mask in 16 bits, twice PyTorch's 1-byte mask.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on int64 values holding 32-bit words (products wrap; the low 32 bits are kept)."""
    h = h ^ (h >> 16)
    h = (h * _C1) & _MASK32
    h = h ^ (h >> 13)
    h = (h * _C2) & _MASK32
    return h ^ (h >> 16)


def keep_mask(shape: torch.Size, seed: torch.Tensor, p: float, device: torch.device) -> torch.Tensor:
    """Boolean keep mask of `shape` (each element kept with probability 1 - p) from a 0-d int64 `seed` tensor. The
    flat index is built from a row and a column range (broadcast), so nothing of the tensor's size needs keeping."""
    width = shape[-1] if len(shape) else 1
    rows = math.prod(shape[:-1])
    # the seed enters before anything of the tensor's size exists: no seed-free intermediate the partitioner could
    # share between the layers reading one input (and then keep, 8 bytes per element)
    index = (torch.arange(rows, device=device, dtype=torch.int64) * width + seed)[:, None] + torch.arange(
        width, device=device, dtype=torch.int64
    )
    h = _fmix32((index * _GOLDEN) & _MASK32)
    return (h >= int(round(p * 2**32))).view(shape)


def hash_dropout(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """Dropout of `x` with the mask `keep_mask(x.shape, seed, p)`, kept values scaled by 1 / (1 - p)."""
    keep = keep_mask(x.shape, seed, p, x.device)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def _forward(self: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    if not self.training or self.p == 0:
        return x
    seed = torch.randint(0, 2**31 - 1, (), device=x.device, dtype=torch.int64)
    if not torch.is_grad_enabled() or not x.requires_grad:
        return hash_dropout(x, self.p, seed)
    # a checkpointed region: what backward needs of it (the dropped copy, for lora_A's weight gradient) is computed
    # again from its inputs, x and the seed, instead of kept; under torch.compile the partitioner honours the region
    return checkpoint(hash_dropout, x, self.p, seed, use_reentrant=False)


class HashDropout:
    """The dropout modules whose forward draws a hashed mask; `remove()` gives them nn.Dropout's forward back."""

    def __init__(self, modules: list[nn.Dropout]):
        self.modules = modules
        for module in modules:
            module.forward = types.MethodType(_forward, module)  # type: ignore[method-assign]

    def remove(self) -> None:
        for module in self.modules:
            vars(module).pop("forward", None)
        self.modules = []


def hash_lora_dropout(layers: list[nn.Module]) -> HashDropout | str:
    """Patch the LoRA dropout of every adapted linear in `layers` (the compiled decoder layers)."""
    modules: list[nn.Dropout] = []
    for layer in layers:
        for module in layer.modules():
            dropouts: Any = getattr(module, "lora_dropout", None)
            if isinstance(dropouts, nn.ModuleDict):
                modules += [d for d in dropouts.values() if isinstance(d, nn.Dropout) and d.p > 0]
    if not modules:
        return "no LoRA dropout in the compiled layers (lora.dropout 0, or no adapters there)"
    return HashDropout(modules)
