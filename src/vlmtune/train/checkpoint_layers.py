"""Which layers gradient checkpointing recomputes under `speed.checkpoint_every_n_layers = n > 1`: the language
model's decoder layers whose index in the language model is a multiple of n, and every other checkpointable block
(the vision tower's, a projector's) as with n = 1. This is what the memory estimate counts (memory/activations.py)
and what auto chose n by.

transformers decides otherwise: `activation_checkpointing_enable(every_n_layers=n)` numbers every
GradientCheckpointingLayer of the whole model in module order, the vision tower's blocks first, and checkpoints
those whose running number is a multiple of n. With 27 vision blocks (Qwen3-VL, Qwen3.5, Gemma 3's and SmolVLM2's
SigLIP) and n = 2 it checkpoints the odd decoder layers instead of the even ones, and only every other vision block.
On Qwen3.5, whose decoder layers go 3 gated DeltaNet : 1 attention, the layers left to keep their activations were
then all 16 DeltaNet layers instead of 8 DeltaNet + 8 attention, and its QLoRA run (F8, every 2nd layer) peaked at
16.03 GiB allocated against the 14.47 estimated (benchmarks/RESULTS.md, session 15). The Trainer enables
checkpointing when training starts, so the flags are set right after it, at `on_train_begin`.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback


def checkpoint_layers(model: nn.Module, layers_prefix: str, every: int) -> list[int]:
    """Set each checkpointable block's flag: decoder layer j of `layers_prefix` iff j % every == 0, any other block
    on. Returns the indices of the decoder layers checkpointed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from vlmtune.speed.loss_hook import unwrap_peft

    hf_model = unwrap_peft(model)
    layers = hf_model.get_submodule(layers_prefix)
    index = {id(layer): j for j, layer in enumerate(layers)}
    for module in hf_model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            j = index.get(id(module))
            module.gradient_checkpointing = True if j is None else j % every == 0
    return [j for j in range(len(layers)) if j % every == 0]


class CheckpointLayers(TrainerCallback):
    """`checkpoint_layers` once the Trainer has enabled gradient checkpointing (it does so as training starts)."""

    def __init__(self, layers_prefix: str, every: int):
        self.layers_prefix, self.every = layers_prefix, every
        self.checkpointed: list[int] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        if args.gradient_checkpointing and self.every > 1 and model is not None:
            self.checkpointed = checkpoint_layers(model, self.layers_prefix, self.every)
