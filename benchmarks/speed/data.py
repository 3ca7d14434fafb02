"""Benchmark inputs: a full-size architecture's config + processor (no weights: both paths build random weights
from the config), and a JSONL data set of exact shapes, encoded the same way for every variant.

Fixed shapes: one `side` x `side` image and an answer cut so that the encoded sample has the image's tokens plus
`text_tokens` text tokens (chat template included), as benchmarks/make_bench_data.py does. Spread (W5): per record
an image side drawn from 224..side (multiples of 28) and an answer of 5..text_tokens tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image

from vlmtune.config.schema import DataConfig
from vlmtune.data.processing import encode
from vlmtune.data.records import parse_line, read_records
from vlmtune.families import get_family


def model_dir(root: Path, family: str, arch: str) -> Path:
    out = root / f"{family}-{arch}"
    if not (
        out / "config.json"
    ).is_file():  # config + tokenizer + processor ("tiny": with its random weights)
        get_family(family).build_tiny(out, arch=None if arch == "tiny" else arch)
    return out


def smallest_side(largest: int) -> int:
    """The spread's smallest image side: 224 px (a quarter of that for the CPU smoke test's tiny images)."""
    return 224 if largest >= 448 else 56


def data_config(max_length: int, image_side: int, spread: bool, family: str | None = None) -> DataConfig:
    """Fixed shapes: images fit in image_side px. The spread keeps every image at its own size, as the family sizes
    images: per-image pixel bounds spanning the whole range (Qwen-VL families: the default, `family` None), else the
    longest edge at most image_side (SmolVLM, Mllama), else nothing to set (a fixed-resolution tower: Gemma 3)."""
    if spread:
        sizing = image_sizing(family)
        if sizing == "pixels":
            low = smallest_side(image_side)
            return DataConfig(max_length=max_length, min_pixels=low * low, max_pixels=image_side * image_side)
        if sizing == "fixed":
            return DataConfig(max_length=max_length)
    return DataConfig(max_length=max_length, image_size=image_side)


def image_sizing(family: str | None) -> str:
    """How `family` takes its image size settings: "pixels" (data.min_pixels / max_pixels), "edge" (data.image_size
    bounds the longest edge) or "fixed" (its vision tower's own resolution), from its capability map."""
    from vlmtune.families.capabilities import Unsupported

    if family is None:
        return "pixels"
    descriptor = get_family(family)
    if not isinstance(descriptor.capabilities.get("pixel_bounds"), Unsupported):
        return "pixels"
    return "edge" if descriptor.dynamic_resolution else "fixed"


def _record(image: str, answer: str) -> dict[str, Any]:
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe."}],
            },
            {"role": "assistant", "content": answer},
        ]
    }


def write_data(
    out: Path,
    model: Path,
    family_name: str,
    n: int,
    side: int,
    text_tokens: int,
    spread: bool,
    max_length: int,
    seed: int = 0,
) -> Path:
    """Write `n` records (and their images) under `out`; returns the JSONL path (reused when it exists)."""
    path = out / "train.jsonl"
    if path.is_file():
        return path
    rng = random.Random(seed)
    family = get_family(family_name)
    data_cfg = data_config(max_length, side, spread, family_name)
    processor = family.load_processor(model, data_cfg)
    tok = processor.tokenizer
    words = [w for w in tok.get_vocab() if w.isalpha() and len(w) > 2][:400]
    (out / "images").mkdir(parents=True, exist_ok=True)

    def text(count: int) -> str:
        ids: list[int] = []
        while len(ids) < count:
            ids += tok(
                " " + " ".join(rng.choice(words) for _ in range(64)), add_special_tokens=False
            ).input_ids
        return tok.decode(ids[:count]).strip() or "x"

    def length(image: str, answer: str) -> int:
        record = parse_line(json.dumps(_record(image, answer)), 1, out)[0]
        sample = encode(record, processor, family, data_cfg)
        assert sample is not None
        return len(sample)

    lines = []
    for i in range(n):
        this_side = rng.randrange(smallest_side(side), side + 1, 28) if spread else side
        name = f"images/{i}.png"
        colour = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", (this_side, this_side), colour).save(out / name)
        image_tokens = family.image_token_count(this_side, this_side, processor)
        if spread:
            answer = text(rng.randint(5, text_tokens))
        else:  # the chat template's own tokens count towards text_tokens
            overhead = length(name, "x") - image_tokens - 1
            answer = text(max(1, text_tokens - overhead))
        lines.append(json.dumps(_record(name, answer)))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def encoded_dataset(path: Path, model: Path, family_name: str, data_cfg: DataConfig) -> list[Any]:
    """The records encoded exactly as vlmtune's engine encodes them (the plain path trains on these)."""
    family = get_family(family_name)
    processor = family.load_processor(model, data_cfg)
    samples = [encode(r, processor, family, data_cfg) for r in read_records(path)]
    return [s for s in samples if s is not None]
