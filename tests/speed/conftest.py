"""Fixtures for the speed tests: records of different shapes, encoded batches, and tiny models with LoRA."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from vlmtune.config.schema import DataConfig
from vlmtune.data.processing import EncodedSample, encode
from vlmtune.data.records import read_records
from vlmtune.families import get_family


def _img(i: int) -> dict:
    return {"type": "image", "image": f"images/{i:05d}.png"}


def _txt(text: str) -> dict:
    return {"type": "text", "text": text}


VARIED = [  # 0, 1 and 2 images, one and two assistant turns, answers of different lengths
    [
        {"role": "user", "content": [_img(0), _txt("What colour is the shape?")]},
        {"role": "assistant", "content": [_txt("blue")]},
    ],
    [
        {"role": "user", "content": [_img(1), _txt("Describe it.")]},
        {"role": "assistant", "content": [_txt("A blue circle at the left of the image, " * 3)]},
    ],
    [
        {"role": "user", "content": [_txt("Say hello.")]},
        {"role": "assistant", "content": [_txt("hello there")]},
    ],
    [
        {"role": "user", "content": [_img(2), _img(3), _txt("Which one is green?")]},
        {"role": "assistant", "content": [_txt("the first")]},
        {"role": "user", "content": [_txt("And the other?")]},
        {"role": "assistant", "content": [_txt("it is red, " * 4)]},
    ],
    [
        {"role": "user", "content": [_img(4), _txt("How many objects are there?")]},
        {"role": "assistant", "content": [_txt("one object")]},
    ],
]


@pytest.fixture(scope="session")
def varied_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmtune.data.synthetic import make_shapes_vqa

    root = tmp_path_factory.mktemp("varied")
    make_shapes_vqa(root, 5, seed=0, file_name="shapes.jsonl")  # writes images/00000.png ... 00004.png
    path = root / "varied.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in VARIED), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def encoded(tiny_model_dir, varied_jsonl) -> Callable[[str], tuple[object, list[EncodedSample]]]:
    """encoded(family) -> (processor, the VARIED records encoded for that family's tiny model)."""
    cache: dict[str, tuple[object, list[EncodedSample]]] = {}

    def get(family_name: str) -> tuple[object, list[EncodedSample]]:
        if family_name not in cache:
            family, data_cfg = get_family(family_name), DataConfig()
            processor = family.load_processor(tiny_model_dir(family_name), data_cfg)
            samples = [encode(r, processor, family, data_cfg) for r in read_records(varied_jsonl)]
            assert all(s is not None for s in samples)
            cache[family_name] = (processor, samples)  # type: ignore[assignment]
        return cache[family_name]

    return get
