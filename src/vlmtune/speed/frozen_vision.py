"""No backward through a frozen vision tower: run it under `torch.no_grad`, and never checkpoint it.

Why this is needed: `enable_input_require_grads` (PEFT calls it for every LoRA model, transformers for gradient
checkpointing) hooks the input embeddings of every `PreTrainedModel` inside the VLM, the vision tower's patch
embedding included. The frozen tower's activations then require grad: they are saved for a backward that only
computes gradients nobody uses, and under checkpointing the tower is recomputed too (memory_anchors.md §6.3).

What runs without grad: the whole vision module when none of its parameters train; otherwise its leading frozen
children (in registration order, which is execution order for the supported towers: patch embedding, blocks, then
the merger) up to the first child that trains, e.g. everything but Qwen's merger with `lora.train_projector`, or
only the patch embedding with `lora.adapt_vision_tower`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _ordered_children(module: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for child_name, child in module.named_children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            out += [(f"{name}.{child_name}.{i}", item) for i, item in enumerate(child)]
        else:
            out.append((f"{name}.{child_name}", child))
    return out


def frozen_prefix(module: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """The modules under `module` that can run without grad: itself when frozen, else its frozen leading children
    (module lists expanded) up to the first child that trains. That child is not entered: the deeper the walk, the
    less registration order says about execution order (residual branches, adapters beside their base layer)."""
    if not _trains(module):
        return [(name, module)]
    out: list[tuple[str, nn.Module]] = []
    for full, child in _ordered_children(module, name):
        if _trains(child):
            return out
        if any(True for _ in child.parameters()):  # parameter-free helpers (rotary tables) need no wrapping
            out.append((full, child))
    return out


class NoGradVision:
    """Wraps the `forward` of the given modules in `torch.no_grad` (reversibly) and turns their checkpointing off."""

    def __init__(self, modules: list[tuple[str, nn.Module]]):
        self.names = [name for name, _ in modules]
        self._originals: list[tuple[nn.Module, Any, bool]] = []
        for _, module in modules:
            had = "forward" in vars(module)
            self._originals.append((module, module.forward, had))
            module.forward = _no_grad_forward(module, module.forward)  # type: ignore[method-assign]

    def remove(self) -> None:
        for module, original, had in self._originals:
            if had:
                module.forward = original  # type: ignore[method-assign]
            else:
                vars(module).pop("forward", None)
        self._originals = []


def _no_grad_forward(module: nn.Module, original: Any) -> Any:
    # The Trainer switches checkpointing on for every layer after the engine has prepared the model, so it is
    # switched off again here, at call time; under no_grad it would only cost the RNG bookkeeping.
    checkpointed = [m for m in module.modules() if hasattr(m, "gradient_checkpointing")]

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        for layer in checkpointed:
            layer.gradient_checkpointing = False
        with torch.no_grad():
            return original(*args, **kwargs)

    return forward


def vision_without_grad(hf_model: nn.Module, vision_prefixes: tuple[str, ...]) -> NoGradVision | str:
    """Run the frozen part of the vision tower without grad; returns the handle, or why nothing could be wrapped."""
    planned: list[tuple[str, nn.Module]] = []
    for prefix in vision_prefixes:
        try:
            root = hf_model.get_submodule(prefix)
        except AttributeError:
            continue
        planned += frozen_prefix(root, prefix)
    if not planned:
        return f"no frozen leading part in {', '.join(vision_prefixes)} (the vision tower trains from its input on)"
    return NoGradVision(planned)
