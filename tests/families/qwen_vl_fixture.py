"""The Qwen-VL parity fixture's checkpoint, rebuilt bit for bit from a seed: a tiny config and weights drawn from
one seeded generator in key order, independent of the port's own initialisation. benchmarks/qwen_vl_parity.py ran
the original remote code on this checkpoint (Hub layout) and recorded its outputs in fixtures/qwen_vl_parity.json;
tests/families/test_qwen_vl.py checks the port still gives them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FIXTURE = Path(__file__).with_name("fixtures") / "qwen_vl_parity.json"
SEED = 1234
IMAGE_SIDE = 56


def fixture() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def checkpoint_weights(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Weights for `shapes` (name -> shape, in the fixture's order): N(0, 0.08^2) from one generator; norm weights
    around 1 so that activations keep a sensible scale through the layers."""
    generator = torch.Generator().manual_seed(SEED)
    out = {}
    for name, shape in shapes.items():
        value = torch.randn(shape, generator=generator) * 0.08
        if any(part in name for part in ("ln_", "ln_f", "ln_q", "ln_kv")) and name.endswith("weight"):
            value = value + 1.0
        out[name] = value
    return out


def images() -> torch.Tensor:
    """Two fixed images (uint8 RGB, IMAGE_SIDE square) as (2, side, side, 3)."""
    generator = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, 256, (2, IMAGE_SIDE, IMAGE_SIDE, 3), generator=generator, dtype=torch.uint8)
