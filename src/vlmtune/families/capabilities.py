"""What a family can do, as data: each feature a config can ask for maps to Supported, Unsupported(reason) or
Experimental(note), so an unsupported request fails at validation with its reason instead of mid-run.

The features and the config fields that switch them on are listed once here (`FEATURES`); a family only says
which of them it supports. Features missing from a family's map count as supported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlmtune.config.schema import VlmtuneConfig


@dataclass(frozen=True)
class Supported:
    note: str = ""


@dataclass(frozen=True)
class Unsupported:
    reason: str


@dataclass(frozen=True)
class Experimental:
    note: str


Capability = Supported | Unsupported | Experimental


@dataclass(frozen=True)
class Feature:
    description: str
    field: str
    """The config field that asks for the feature (named in problems)."""
    requested: Callable[[VlmtuneConfig], object] | None
    """Whether a config asks for it; None for data-level features (checked by `data check`, not here) and for
    default-on speed switches that skip themselves where they do not apply (the entry documents why)."""


def _method(cfg: VlmtuneConfig) -> str:
    return cfg.method.name.value


def _adapters(cfg: VlmtuneConfig) -> bool:
    return _method(cfg) in ("lora", "qlora")


FEATURES: dict[str, Feature] = {
    "lora": Feature("LoRA", "method.name", lambda c: _method(c) == "lora"),
    "qlora": Feature("QLoRA (4-bit base weights)", "method.name", lambda c: _method(c) == "qlora"),
    "full": Feature("full fine-tuning", "method.name", lambda c: _method(c) == "full"),
    "adapt_vision_tower": Feature("LoRA adapters on the vision tower", "method.lora.adapt_vision_tower",
                                  lambda c: _adapters(c) and c.method.lora.adapt_vision_tower),
    "adapt_projector": Feature("LoRA adapters on the projector's layers", "method.lora.adapt_projector",
                               lambda c: _adapters(c) and c.method.lora.adapt_projector),
    "train_projector": Feature("training the projector with adapters", "method.lora.train_projector",
                               lambda c: _adapters(c) and c.method.lora.train_projector),
    "unfreeze_vision_tower": Feature("training the vision tower in full fine-tuning", "method.freeze_vision_tower",
                                     lambda c: _method(c) == "full" and not c.method.freeze_vision_tower),
    "quantize_vision_tower": Feature("4-bit vision tower", "method.quantization.quantize_vision_tower",
                                     lambda c: _method(c) == "qlora" and c.method.quantization.quantize_vision_tower),
    "quantize_lm_head": Feature("4-bit lm_head", "method.quantization.quantize_lm_head",
                                lambda c: _method(c) == "qlora" and c.method.quantization.quantize_lm_head),
    "flash_attention_2": Feature("flash_attention_2", "hardware.attn_implementation",
                                 lambda c: c.hardware.attn_implementation == "flash_attention_2"),
    "fp16": Feature("fp16 precision", "hardware.precision", lambda c: c.hardware.precision == "fp16"),
    "pixel_bounds": Feature("per-image pixel bounds (dynamic resolution)", "data.min_pixels / data.max_pixels",
                            lambda c: c.data.min_pixels is not None or c.data.max_pixels is not None),
    "multi_image": Feature("several images in one conversation", "(data)", None),
    "packing": Feature("padding-free packing", "speed.packing", lambda c: c.speed.packing),
    # Speed switches that are on by default and skip themselves (with the reason in the log) where they do not
    # apply: a family's map entry documents why, nothing is refused.
    "varlen_vision_attention": Feature("variable-length vision attention", "speed.varlen_attention", None),
    "mrope_positions": Feature("M-RoPE positions built in the collator", "speed.positions_in_collator", None),
    # Not a switch: whether the fused kernels a hybrid (linear-attention) model needs are installed; a family
    # with such layers says what it costs without them and logs it as a note (`FamilyDescriptor.notes`).
    # Not a switch: several processes (DDP, ZeRO) run the same modules on every rank; a family whose batches can take
    # different module paths says so here (`vlmtune families`' ZeRO-3 column reads it; missing: supported).
    "zero3": Feature("several processes (DeepSpeed ZeRO-3, DDP)", "distributed", None),
    "linear_attention_kernels": Feature("fused linear-attention kernels (flash-linear-attention, causal-conv1d)",
                                        "(environment)", None),
}


def check_capabilities(family_name: str, capabilities: Mapping[str, Capability],
                       config: VlmtuneConfig) -> tuple[list[str], list[str]]:
    """(problems, notes): problems for unsupported requests, notes for experimental ones. Each names the field."""
    problems, notes = [], []
    for key, cap in capabilities.items():
        feature = FEATURES[key]
        if feature.requested is None or not feature.requested(config):
            continue
        if isinstance(cap, Unsupported):
            problems.append(f"{feature.field}: {family_name} does not support {feature.description}: {cap.reason}")
        elif isinstance(cap, Experimental):
            notes.append(f"{feature.field}: {feature.description} is experimental for {family_name}: {cap.note}")
    return problems, notes
