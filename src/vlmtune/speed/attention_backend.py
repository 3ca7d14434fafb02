"""SDPA without cuDNN's attention kernels: variable sequence lengths stay cheap on the CPU.

PyTorch's scaled_dot_product_attention prefers cuDNN's fused attention on Hopper GPUs. cuDNN builds an execution
plan for every new (batch, heads, length) shape and caches it; with images of varying sizes (the vision tower
attends per image) or packed rows, most shapes are new, and each call then costs about 1.9 ms of CPU in the forward
and 2.9 ms in the backward (torch.profiler, H100, W5 of benchmarks/speed: 7.3 s of CPU in 3 steps for 0.7 s of
attention kernels). The flash and memory-efficient kernels need no plan. Switching cuDNN off leaves SDPA to pick
among those (and the math kernel), as it does on GPUs without cuDNN attention.

Except where that leaves a masked language model on the slow kernel (`speed.sdpa_cudnn=auto`, `keeps_cudnn`): flash
takes no mask, so a family whose language model is masked on every batch (Gemma 3's bidirectional image blocks,
`FamilyDescriptor.language_attention_masked`) attends with the memory-efficient kernel once cuDNN is off. On an H100
that kernel's backward took 13.3 ms where cuDNN's took 6.8 (W1, head_dim 128; benchmarks/RESULTS.md), and PyTorch
itself puts cuDNN first on Hopper. With a fixed-resolution vision tower such a step has one language-model shape
and one vision shape, so cuDNN plans once per new batch length and the plan cache serves the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmtune.families.base import FamilyDescriptor


class CudnnAttentionOff:
    """`torch.backends.cuda.enable_cudnn_sdp(False)` for the run; `remove()` restores the previous setting."""

    def __init__(self) -> None:
        import torch

        self._was = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)

    def remove(self) -> None:
        import torch

        torch.backends.cuda.enable_cudnn_sdp(self._was)


def keeps_cudnn(family: FamilyDescriptor, text_config: Any) -> str | None:
    """Why `speed.sdpa_cudnn=auto` leaves cuDNN's attention on for this model, or None where it switches it off."""
    if not family.language_attention_masked or family.dynamic_resolution:
        return None
    heads = getattr(text_config, "num_attention_heads", None)
    head_dim = getattr(text_config, "head_dim", None) or (
        text_config.hidden_size // heads if heads and getattr(text_config, "hidden_size", None) else None)
    width = f" at head_dim {head_dim}" if head_dim else ""
    return (
        f"speed.sdpa_cudnn=auto keeps cuDNN attention on: {family.name}'s language model attends with a mask on "
        f"every batch{width}, where SDPA runs no flash kernel and the memory-efficient one left without cuDNN is "
        "slower; its fixed-resolution vision tower keeps the shapes few enough for cuDNN's plan cache"
    )


def cudnn_keep_reason(setting: bool | str, family: FamilyDescriptor, text_config: Any) -> str | None:
    """Why `speed.sdpa_cudnn` leaves cuDNN's attention on for this model (true: always; auto: `keeps_cudnn`), or
    None where vlmtune switches it off. The one decision apply_speed and the collator's padding both read."""
    if setting is True:
        return "speed.sdpa_cudnn=true"
    return keeps_cudnn(family, text_config) if setting == "auto" else None


def sdpa_on_gpu_refusal(attn_implementation: str | None, device: str) -> str | None:
    """Why cuDNN's SDPA kernels play no part in this run (not on a GPU, or attention not through SDPA), or None."""
    if device != "cuda":
        return "training runs on the CPU (cuDNN attention is a GPU kernel)"
    if attn_implementation not in (None, "sdpa"):
        return f"model.attn_implementation={attn_implementation} does not go through SDPA"
    return None


def cudnn_attention_off(
    attn_implementation: str | None, device: str, keep_reason: str | None = None
) -> CudnnAttentionOff | str:
    """Turn cuDNN's SDPA kernels off when the model attends through SDPA on a GPU; returns the handle or why not.
    keep_reason: why this model keeps them (`keeps_cudnn`, under speed.sdpa_cudnn=auto), or None."""
    import torch

    why_not = sdpa_on_gpu_refusal(attn_implementation, device) or keep_reason
    if why_not is not None:
        return why_not
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return "cuDNN attention is already off in this process"
    return CudnnAttentionOff()
