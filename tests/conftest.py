"""Shared fixtures: tiny offline models of every family, built once per test session.

    def test_something(tiny_model_dir):
        model_dir = tiny_model_dir("qwen2_vl")   # a folder loadable with from_pretrained / load_processor

Tests must not write into these folders (they are shared); copy them first if needed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: `tiny_model_dir(family_name) -> Path` of that family's tiny model (built on first use, ~0.2 s)."""
    from vlmtune.families import get_family

    built: dict[str, Path] = {}

    def get(family_name: str) -> Path:
        if family_name not in built:
            out = tmp_path_factory.mktemp(f"tiny-{family_name}")
            built[family_name] = get_family(family_name).build_tiny(out)
        return built[family_name]

    return get
