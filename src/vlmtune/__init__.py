"""vlmtune: fine-tune vision-language models with LoRA, QLoRA or full fine-tuning."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmtune.config import ConfigPresets, TrainingMethod, VlmtuneConfig, load_config

if TYPE_CHECKING:
    from vlmtune.train.engine import TrainResult

__version__ = "0.1.0"
__all__ = ["ConfigPresets", "TrainingMethod", "VlmtuneConfig", "load_config", "train"]


def train(config: VlmtuneConfig, resume: bool | str = False) -> TrainResult:
    """Train with a validated config (see `ConfigPresets`). Heavy imports happen here, not at `import vlmtune`."""
    from vlmtune.train.engine import train as _train

    return _train(config, resume=resume)
