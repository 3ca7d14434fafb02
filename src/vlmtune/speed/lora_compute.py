"""LoRA adapters computing on the layer's 16-bit input under autocast, instead of on an fp32 copy of it.

PEFT keeps adapters in fp32 (so the optimizer updates fp32 weights) and casts each LoRA layer's input to the
adapter's dtype first. Under bf16/fp16 autocast that cast buys nothing: autocast runs the adapter matmuls in 16-bit
anyway, so the fp32 copy is cast straight back, and the adapter saves its own 16-bit copy of the input for backward
instead of sharing the one the base layer saved. Switching PEFT's per-layer `cast_input_dtype_enabled` off (the flag
behind `peft.helpers.disable_input_dtype_casting`) removes both copies; the adapters stay fp32.
Only valid under autocast: without it, a 16-bit input meets fp32 adapter weights and the matmul fails.
"""

from __future__ import annotations

from torch import nn


class LoraInputCasting:
    """Turns input casting off on every LoRA layer of the model; `remove()` turns it back on."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        for layer in layers:
            layer.cast_input_dtype_enabled = False

    def remove(self) -> None:
        for layer in self.layers:
            layer.cast_input_dtype_enabled = True
        self.layers = []


def lora_compute_in_16bit(model: nn.Module, autocast: bool) -> LoraInputCasting | str:
    """Keep LoRA inputs in 16-bit when training runs under autocast; returns the handle or why it does not apply."""
    if not autocast:
        return (
            "training does not run under 16-bit autocast here (CPU or fp32): adapters need their fp32 input"
        )
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled") and hasattr(m, "lora_A")]
    if not layers:
        return "the model has no LoRA layers"
    return LoraInputCasting(layers)
