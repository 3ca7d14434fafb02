"""Training methods as strategies: each loads the base model and prepares its trainable weights; the engine in
`vlmtune.train` trains whatever they return."""

from __future__ import annotations

from vlmtune.config.schema import TrainingMethod
from vlmtune.methods.base import Method, PrecisionPlan, count_parameters, resolve_precision
from vlmtune.methods.full import FullMethod
from vlmtune.methods.lora import LoraMethod
from vlmtune.methods.qlora import QLoraMethod

_METHODS: dict[TrainingMethod, type[Method]] = {
    TrainingMethod.LORA: LoraMethod,
    TrainingMethod.QLORA: QLoraMethod,
    TrainingMethod.FULL: FullMethod,
}


def get_method(name: TrainingMethod | str) -> Method:
    """The strategy for `method.name` (lora, qlora or full)."""
    return _METHODS[TrainingMethod(name)]()


__all__ = [
    "FullMethod",
    "LoraMethod",
    "Method",
    "PrecisionPlan",
    "QLoraMethod",
    "count_parameters",
    "get_method",
    "resolve_precision",
]
