"""Full fine-tuning: every weight trains, except the vision tower when `method.freeze_vision_tower` (the default).

The projector always trains, also when it lives inside the vision tower's module (Qwen's `model.visual.merger`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.methods.base import Method, has_prefix, load_base_model, log_parameter_counts, resolve_precision

if TYPE_CHECKING:
    from vlmtune.families.base import FamilyDescriptor


def freeze_vision_tower(model: torch.nn.Module, family: FamilyDescriptor) -> int:
    """Freeze the vision tower's parameters (not the projector's). Returns how many tensors were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if has_prefix(name, family.vision_prefixes) and not has_prefix(name, family.projector_prefixes):
            param.requires_grad_(False)
            frozen += 1
    return frozen


class FullMethod(Method):
    name = "full"

    def load_and_prepare(self, config: VlmtuneConfig, family: FamilyDescriptor) -> torch.nn.Module:
        plan = resolve_precision(config)
        model = load_base_model(config, plan.weights_dtype)
        model.requires_grad_(True)
        if config.method.freeze_vision_tower:
            freeze_vision_tower(model, family)
        log_parameter_counts(model, self.name)
        return model
