"""SDPA without cuDNN's attention kernels: variable sequence lengths stay cheap on the CPU.

PyTorch's scaled_dot_product_attention prefers cuDNN's fused attention on Hopper GPUs. cuDNN builds an execution
plan for every new (batch, heads, length) shape and caches it; with images of varying sizes (the vision tower
attends per image) or packed rows, most shapes are new, and each call then costs about 1.9 ms of CPU in the forward
and 2.9 ms in the backward (torch.profiler, H100, W5 of benchmarks/speed: 7.3 s of CPU in 3 steps for 0.7 s of
attention kernels). The flash and memory-efficient kernels need no plan. Switching cuDNN off leaves SDPA to pick
among those (and the math kernel), as it does on GPUs without cuDNN attention.
"""

from __future__ import annotations


class CudnnAttentionOff:
    """`torch.backends.cuda.enable_cudnn_sdp(False)` for the run; `remove()` restores the previous setting."""

    def __init__(self) -> None:
        import torch

        self._was = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)

    def remove(self) -> None:
        import torch

        torch.backends.cuda.enable_cudnn_sdp(self._was)


def cudnn_attention_off(attn_implementation: str | None, device: str) -> CudnnAttentionOff | str:
    """Turn cuDNN's SDPA kernels off when the model attends through SDPA on a GPU; returns the handle or why not."""
    import torch

    if device != "cuda":
        return "training runs on the CPU (cuDNN attention is a GPU kernel)"
    if attn_implementation not in (None, "sdpa"):
        return f"model.attn_implementation={attn_implementation} does not go through SDPA"
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return "cuDNN attention is already off in this process"
    return CudnnAttentionOff()
