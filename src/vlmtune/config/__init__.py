"""The typed configuration tree, its loader and the presets."""

from vlmtune.config.loader import apply_overrides, config_from_dict, load_config, save_config
from vlmtune.config.presets import ConfigPresets, list_presets, load_preset
from vlmtune.config.schema import (
    DataConfig,
    DistributedConfig,
    HardwareConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    QuantizationConfig,
    TrainingConfig,
    TrainingMethod,
    VlmtuneConfig,
)

__all__ = [
    "ConfigPresets",
    "DataConfig",
    "DistributedConfig",
    "HardwareConfig",
    "LoraConfig",
    "MethodConfig",
    "ModelConfig",
    "QuantizationConfig",
    "TrainingConfig",
    "TrainingMethod",
    "VlmtuneConfig",
    "apply_overrides",
    "config_from_dict",
    "list_presets",
    "load_config",
    "load_preset",
    "save_config",
]
