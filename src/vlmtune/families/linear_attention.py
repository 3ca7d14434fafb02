"""Which kernel transformers' linear-attention layers (gated DeltaNet) can train with here, and the PyTorch reference
where flash-linear-attention's cannot.

transformers (5.17 and 5.23) decorates its reference functions (`torch_chunk_gated_delta_rule` in
`modeling_qwen3_5`) with `use_kernel_func_from_hub_with_fallback(..., "fla")`: when `fla` imports, the module global
calls fla's Triton kernel, resolved once at import, whatever the device. Two cases where that kernel cannot train:

- fla-core 0.6.0 refuses the backward on a Hopper GPU (compute capability 9.x) with Triton >= 3.4.0 and < 3.7.1
  unless its tilelang backend takes the call (`fla/ops/common/chunk_o.py` `chunk_bwd_dqkwg`: "Triton >= 3.4.0 and
  < 3.7.1 on Hopper GPUs produces incorrect results for gated chunk_bwd_dqkwg"). Measured on an H100 with torch 2.11
  and Triton 3.6.0: every Qwen3.5 training run stopped at its first backward; the forward alone ran.
- a run on the CPU: fla's Triton kernels take CUDA tensors only.

`linear_attention_kernel` says which kernel a run on a device gets and why (the memory estimator reads the same
answer: memory/inputs.py); `reference_kernels` points the module globals at the PyTorch functions transformers
wrapped (`__wrapped__`) until `remove()`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

HOPPER_BAD_TRITON = ("3.4.0", "3.7.1")
"""Triton versions [from, to) whose gated chunk_bwd_dqkwg gives wrong gradients on Hopper (fla issue #640)."""


@dataclass(frozen=True)
class LinearAttentionKernel:
    name: Literal["fla", "torch"]
    reason: str
    fallback: bool
    """fla imports (so transformers calls it) but cannot train here: the run points the layers at the reference."""

    def describe(self) -> str:
        return f"{'flash-linear-attention' if self.name == 'fla' else 'PyTorch reference'} ({self.reason})"


def linear_attention_kernel(device: str) -> LinearAttentionKernel:
    """The kernel transformers' gated DeltaNet layers can train with on `device` ("cuda", "cuda:1", "cpu"), and why.
    A CUDA device this process cannot see (an estimate for another machine) is taken as able to run fla."""
    if not _fla_installed():
        return LinearAttentionKernel(
            "torch", "flash-linear-attention (the `fla` package) is not installed: transformers runs its PyTorch "
            "reference, a Python loop over chunks of tokens; `pip install flash-linear-attention` for the fused kernel",
            fallback=False)
    if not device.startswith("cuda"):
        return LinearAttentionKernel(
            "torch", f"fla's Triton kernels need a CUDA GPU (device {device})", fallback=True)
    refusal = _hopper_refusal(device)
    if refusal:
        return LinearAttentionKernel("torch", refusal, fallback=True)
    return LinearAttentionKernel("fla", "fla imports and can train on this GPU", fallback=False)


FLA_DISTRIBUTIONS = ("fla-core", "flash-linear-attention")
"""The pip distributions that install the `fla` package (0.6: fla-core holds the kernels)."""


def _fla_installed() -> bool:
    """`fla` importable and installed as a distribution: a stray folder named fla on sys.path (a namespace package:
    transformers imports it, finds no kernel in it and runs the reference) is not flash-linear-attention."""
    if importlib.util.find_spec("fla") is None:
        return False
    for name in FLA_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            continue
    return False


def _hopper_refusal(device: str) -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    capability = torch.cuda.get_device_capability(device)
    triton = _triton_version()
    if capability[0] != 9 or triton is None or not _in_bad_range(triton) or _tilelang_backend():
        return None
    low, high = HOPPER_BAD_TRITON
    return (f"fla's backward refuses Triton {triton} on a Hopper GPU (compute capability {capability[0]}."
            f"{capability[1]}): Triton >= {low} and < {high} gives wrong gradients in its gated chunk_bwd_dqkwg "
            f"(fla issue #640). Upgrade Triton to >= {high} or `pip install tilelang` to train on fla's kernel")


def _in_bad_range(version: str) -> bool:
    from packaging.version import Version

    low, high = HOPPER_BAD_TRITON
    return Version(low) <= Version(version) < Version(high)


def _triton_version() -> str | None:
    for distribution in ("triton", "pytorch-triton"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _tilelang_backend() -> bool:
    """Whether fla's tilelang backend would take the Hopper backward: tilelang installed and not switched off by
    fla's own environment switches (FLA_TILELANG=0, FLA_DISABLE_BACKEND_DISPATCH=1). fla also needs nvcc for it."""
    switched_off = os.environ.get("FLA_TILELANG") == "0" or os.environ.get("FLA_DISABLE_BACKEND_DISPATCH") == "1"
    return not switched_off and importlib.util.find_spec("tilelang") is not None


class ReferenceKernels:
    """Module globals pointed at transformers' PyTorch reference functions; `remove()` puts the originals back.
    `opaque`: each as one operator that torch.compile does not trace into (speed/opaque_delta_rule.py), for compiled
    layers."""

    def __init__(self, functions: tuple[str, ...], opaque: bool = False):
        self.swapped: list[tuple[Any, str, Callable[..., Any]]] = []
        references = []
        for path in functions:  # all resolved before any is swapped
            module_name, _, name = path.partition(":")
            module = importlib.import_module(module_name)
            current = getattr(module, name)
            torch_function = getattr(current, "__wrapped__", None)
            if torch_function is None:
                raise AttributeError(f"{path} has no __wrapped__ reference function (transformers' "
                                     "use_kernel_func_from_hub_with_fallback sets it)")
            references.append((module, name, current, _opaque(torch_function) if opaque
                               else _reference(torch_function)))
        for module, name, current, reference in references:
            self.swapped.append((module, name, current))
            setattr(module, name, reference)

    def remove(self) -> None:
        for module, name, original in reversed(self.swapped):
            setattr(module, name, original)
        self.swapped = []


def reference_kernels(functions: tuple[str, ...], opaque: bool = False) -> ReferenceKernels | str:
    """Point each "module:function" at its PyTorch reference (`opaque`: as one operator for torch.compile), or say
    why not."""
    try:
        return ReferenceKernels(functions, opaque)
    except (ImportError, AttributeError) as exc:
        return f"cannot switch {', '.join(functions)} to the PyTorch reference: {exc}"


def packed_sequences_error(torch_function: Callable[..., Any]) -> ValueError:
    """What a reference function called with `cu_seqlens` raises (here and in speed/opaque_delta_rule.py)."""
    return ValueError(f"{torch_function.__name__}: the PyTorch reference cannot keep packed sequences apart "
                      "(cu_seqlens)")


def _opaque(torch_function: Callable[..., Any]) -> Callable[..., Any]:
    from vlmtune.speed.opaque_delta_rule import opaque

    return opaque(torch_function)


def _reference(torch_function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(torch_function)
    def reference(*args: Any, cu_seqlens: Any = None, **kwargs: Any) -> Any:
        # transformers 5.23's wrapper refuses these on the reference path (5.17's passes them on, and the reference
        # ignores them): samples packed in one sequence would run as one
        if cu_seqlens is not None:
            raise packed_sequences_error(torch_function)
        return torch_function(*args, **kwargs)

    return reference
