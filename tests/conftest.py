"""Shared fixtures: tiny offline models of every family, built once per test session.

    def test_something(tiny_model_dir):
        model_dir = tiny_model_dir("qwen2_vl")   # a folder loadable with from_pretrained / load_processor

Tests must not write into these folders (they are shared); copy them first if needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vlmtune.config.schema import VlmtuneConfig


@pytest.fixture(scope="session", autouse=True)
def compile_cache_root() -> Iterator[Path]:
    """Runs that compile (speed.compile) keep inductor's and Triton's caches in a folder of the temporary directory,
    not the user's ~/.cache/vlmtune/compile (speed/compile_cache.py); it outlasts the session, as /tmp's
    torchinductor cache did, so later test sessions compile from it."""
    import getpass
    import tempfile

    from vlmtune.speed import compile_cache

    root = Path(tempfile.gettempdir()) / f"vlmtune-tests-compile-{getpass.getuser()}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compile_cache, "default_root", lambda env: root)
        yield root


@pytest.fixture(autouse=True)
def no_allocator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Estimates built from a config follow PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF where set
    (memory/allocator_setting.py): the tests see the default, whatever the shell running them sets."""
    from vlmtune.memory.allocator_setting import ENV_VARS

    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


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


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train, val) JSONL files of the demo's colour questions: 16 and 4 records, 56 px images."""
    from vlmtune.data.synthetic import make_shapes_vqa

    root = tmp_path_factory.mktemp("shapes")
    train = make_shapes_vqa(root, 16, seed=0, file_name="train.jsonl")
    val = make_shapes_vqa(root / "val", 4, seed=1, file_name="val.jsonl")
    return train, val


@pytest.fixture
def run_config(tiny_model_dir, shapes_data, tmp_path) -> Callable[..., VlmtuneConfig]:
    """run_config(family, method, out=None, val=False, training={...}, lora={...}, **sections) -> a config for a
    tiny CPU run (6 steps, logging every step, no checkpoints unless training.save_steps is lowered)."""

    def make(
        family: str = "qwen2_vl",
        method: str = "lora",
        out: Path | None = None,
        val: bool = False,
        training: dict | None = None,
        lora: dict | None = None,
        **sections: dict,
    ) -> VlmtuneConfig:
        train_path, val_path = shapes_data
        data = {"train_path": str(train_path), "val_path": str(val_path) if val else None}
        return VlmtuneConfig.model_validate(
            {
                "output_dir": str(out or tmp_path / f"{family}-{method}"),
                "model": {"name_or_path": str(tiny_model_dir(family))},
                "data": {**data, **sections.pop("data", {})},
                "method": {"name": method, "lora": lora or {}},
                "training": {
                    "max_steps": 6,
                    "batch_size": 2,
                    "learning_rate": 5e-3,
                    "logging_steps": 1,
                    "save_steps": 100,
                    "report_to": ["none"],
                    **(training or {}),
                },
                "hardware": {"precision": "bf16", "use_cpu": True, **sections.pop("hardware", {})},
                **sections,
            }
        )

    return make
