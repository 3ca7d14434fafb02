"""LoRA: adapters on the language model's linear layers; the vision tower stays frozen unless asked otherwise.

Targets are resolved to full module names from the family's prefixes before PEFT sees them, so a short name such as
`q_proj` can never reach into the vision tower (CLIP's attention layers are also called `q_proj`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.errors import ConfigError
from vlmtune.methods.base import (
    Method,
    PrecisionPlan,
    base_reference,
    linear_names,
    load_base_model,
    log_parameter_counts,
    resolve_precision,
)

if TYPE_CHECKING:
    from vlmtune.families.base import FamilyDescriptor

log = logging.getLogger(__name__)


def lora_target_names(model: torch.nn.Module, config: VlmtuneConfig, family: FamilyDescriptor) -> list[str]:
    """Full names of the linear layers that get adapters: inside the language model's decoder layers, plus the
    vision tower's blocks with `adapt_vision_tower` and the projector's layers with `adapt_projector` (where the
    family names them; otherwise the projector is frozen or trained fully)."""
    lora = config.method.lora
    kind = lora.target_modules
    layers = [family.language_layers_prefix]
    names = linear_names(model, layers, family.lora_targets(kind))
    if not names:
        available = sorted({n.rsplit(".", 1)[-1] for n in linear_names(model, layers)})
        raise ConfigError(
            [
                f"method.lora.target_modules={kind!r} matches no linear layer of the language model; "
                f"its linear layers are named: {', '.join(available)}"
            ]
        )
    if lora.adapt_vision_tower:
        targets = list(family.vision_lora_targets)
        vision = linear_names(
            model, [family.vision_layers_prefix], targets, exclude=family.projector_prefixes
        )
        if not vision:
            raise ConfigError(
                [f"method.lora.adapt_vision_tower=true, but no vision-tower linear layer matches {targets}"]
            )
        names += vision
    if lora.adapt_projector:
        projector = (linear_names(model, [family.projector_layers_prefix], family.projector_lora_targets)
                     if family.projector_layers_prefix else [])
        if not projector:
            raise ConfigError([f"method.lora.adapt_projector=true, but {family.name} names no projector layers for "
                               "adapters; use method.lora.train_projector"])
        names += projector
    return names


def lora_parameter_names(model: torch.nn.Module, config: VlmtuneConfig, family: FamilyDescriptor) -> list[str]:
    """Full names of the bare parameters that get adapters through PEFT's `target_parameters` (the family's
    `lora_target_parameters` for the target set, e.g. fused expert weights), inside the language model's layers."""
    wanted = family.lora_parameter_targets(config.method.lora.target_modules)
    prefix = family.language_layers_prefix + "."
    names = [n for n, _ in model.named_parameters()
             if n.startswith(prefix) and any(n.endswith("." + w) for w in wanted)]
    if wanted and not names:
        raise ConfigError([f"method.lora.target_modules={config.method.lora.target_modules!r}: {family.name} "
                           f"adapts the parameters {wanted}, but the model has none of them"])
    return names


def projector_names(model: torch.nn.Module, family: FamilyDescriptor) -> list[str]:
    """The projector modules present in this model (fully trained with `train_projector`). A module list (e.g. one
    DeepStack merger per tapped vision block) is given by its items: PEFT's modules_to_save wraps modules,
    not lists."""
    modules = dict(model.named_modules())
    names: list[str] = []
    for prefix in family.projector_prefixes:
        module = modules.get(prefix)
        if isinstance(module, torch.nn.ModuleList):
            names += [f"{prefix}.{i}" for i in range(len(module))]
        elif module is not None:
            names.append(prefix)
    return names


def _deepspeed_enabled() -> bool:
    """A DeepSpeed config is registered (the training arguments are built before the model for this)."""
    from transformers.integrations.deepspeed import deepspeed_config

    return deepspeed_config() is not None


def add_adapters(
    model: torch.nn.Module, config: VlmtuneConfig, family: FamilyDescriptor, plan: PrecisionPlan
) -> torch.nn.Module:
    """Wrap `model` with PEFT LoRA. The projector, when trained, rides along in `modules_to_save` so it is saved
    with the adapter and restored by `PeftModel.from_pretrained`."""
    from peft import LoraConfig, get_peft_model

    lora = config.method.lora
    targets = lora_target_names(model, config, family)
    parameters = lora_parameter_names(model, config, family)
    dropout = lora.dropout
    if parameters and "dropout" not in lora.model_fields_set:
        dropout = 0.0  # PEFT's target_parameters take none; a dropout the user sets is refused by family.check
    modules_to_save = projector_names(model, family) if lora.train_projector else None
    if lora.train_projector and not modules_to_save:
        raise ConfigError(
            [f"method.lora.train_projector=true, but the model has none of {family.projector_prefixes}"]
        )
    peft_config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=dropout,
        target_modules=targets,
        **({"target_parameters": parameters} if parameters else {}),
        modules_to_save=modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_config)
    model.peft_config["default"].base_model_name_or_path = base_reference(config)
    if (plan.bf16 or plan.fp16) and _deepspeed_enabled():
        # DeepSpeed computes in 16-bit and keeps fp32 master weights itself. ZeRO-1/2 cast the whole module to
        # 16-bit; ZeRO-3 casts nothing it did not build partitioned, so the adapters are cast here to match.
        half = torch.bfloat16 if plan.bf16 else torch.float16
        for param in model.parameters():
            if param.requires_grad and param.dtype != half:
                param.data = param.data.to(half)
    elif plan.bf16 or plan.fp16:
        # Trainable 16-bit copies (the projector) would be updated in 16-bit and cannot be unscaled under fp16.
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    log.info(
        "LoRA r=%d alpha=%g on %d linear layers%s%s%s%s",
        lora.rank,
        lora.alpha,
        len(targets),
        f" and {len(parameters)} parameters (target_parameters)" if parameters else "",
        " (vision tower included)" if lora.adapt_vision_tower else "",
        " (projector included)" if lora.adapt_projector else "",
        f"; projector trained fully: {modules_to_save}" if modules_to_save else "",
    )
    return model


class LoraMethod(Method):
    name = "lora"

    def load_and_prepare(self, config: VlmtuneConfig, family: FamilyDescriptor) -> torch.nn.Module:
        plan = resolve_precision(config)
        model = load_base_model(config, plan.weights_dtype)
        model = add_adapters(model, config, family, plan)
        log_parameter_counts(model, self.name)
        return model
