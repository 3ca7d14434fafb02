"""Trained tiny results to predict with and merge, each trained once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from vlmtune.config.schema import VlmtuneConfig


@pytest.fixture(scope="session")
def red_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight colour questions whose answer is always "red": a tiny model learns it in a few steps."""
    from vlmtune.data.synthetic import make_shapes_vqa

    return make_shapes_vqa(tmp_path_factory.mktemp("red"), 8, seed=0, colors=["red"])


@pytest.fixture(scope="session")
def train_tiny(tiny_model_dir, red_data, tmp_path_factory) -> Callable[..., Path]:
    """train_tiny(method, steps, lr, family="qwen2_vl") -> output_dir/final of a run on `red_data` (cached per
    arguments)."""
    from vlmtune.train.engine import train

    done: dict[tuple, Path] = {}

    def run(method: str, steps: int = 6, lr: float = 5e-3, family: str = "qwen2_vl") -> Path:
        key = (method, steps, lr, family)
        if key not in done:
            config = VlmtuneConfig.model_validate(
                {
                    "output_dir": str(tmp_path_factory.mktemp(f"run-{family}-{method}")),
                    "model": {"name_or_path": str(tiny_model_dir(family))},
                    "data": {"train_path": str(red_data)},
                    "method": {"name": method, "lora": {"dropout": 0.0, "train_projector": method != "full"}},
                    "training": {
                        "max_steps": steps,
                        "batch_size": 4,
                        "learning_rate": lr,
                        "lr_scheduler": "constant",
                        "warmup_ratio": 0.0,
                        "logging_steps": steps,
                        "save_steps": 1000,
                        "report_to": ["none"],
                    },
                    "hardware": {"precision": "bf16", "use_cpu": True, "gradient_checkpointing": False},
                }
            )
            done[key] = train(config).final_dir
        return done[key]

    return run
