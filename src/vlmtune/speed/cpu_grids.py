"""Image grids in CPU memory: the Qwen vision tower and M-RoPE code read them element by element.

`image_grid_thw` / `video_grid_thw` hold three integers per image. transformers' Qwen2-VL / Qwen2.5-VL code turns
them into Python numbers again and again: `cu_seqlens` and `lengths.tolist()` in every vision attention layer
(SDPA path), the rotary position ids per image, the split of the image features, the M-RoPE positions per sample.
With the grids on the GPU each of those is a host-device sync (CUDA sync debug mode: ~100 per W1 step in the
vision tower alone, benchmarks/RESULTS.md, session 4), and a sync stops the CPU from queueing kernels ahead of the
GPU. The HF Trainer's data loader moves every tensor of the batch to the GPU before the model sees it, so the grids
are copied back once per forward (one sync) by a pre-hook on the model.

Not with flash-attention 2: its varlen kernel takes `cu_seqlens` on the GPU.
"""

from __future__ import annotations

from typing import Any

from torch import nn

GRID_KEYS = ("image_grid_thw", "video_grid_thw")


def grids_to_cpu(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Forward pre-hook (with kwargs): the grid tensors of the call, copied to the CPU."""
    for key in GRID_KEYS:
        value = kwargs.get(key)
        if value is not None and hasattr(value, "device") and value.device.type != "cpu":
            kwargs[key] = value.cpu()
    return args, kwargs


def grids_on_cpu(hf_model: nn.Module, attn_implementation: str | None, device: str) -> Any:
    """Install the pre-hook; returns its removable handle or why not. It goes on the inner model that the
    `...ForConditionalGeneration` wrapper calls with keyword arguments (`hf_model.model`): PEFT calls the wrapper's
    `forward` directly, which module hooks on the wrapper would not see."""
    if device != "cuda":
        return "training runs on the CPU (the grids are there already)"
    if attn_implementation == "flash_attention_2":
        return "flash-attention 2 takes cu_seqlens on the GPU"
    inner = getattr(hf_model, "model", None)
    target = inner if isinstance(inner, nn.Module) else hf_model
    return target.register_forward_pre_hook(grids_to_cpu, with_kwargs=True)
