"""Scan a JSONL data set for what memory depends on: image sizes, text lengths, and the longest batch.

Image sizes come from the file headers (nothing is decoded). Text is counted with the model's tokenizer when one is
available offline (a local folder or the Hugging Face cache); otherwise with a conservative estimate of one token
per 3.5 UTF-8 bytes, which the report says. Image tokens follow the processor rules of memory/image_tokens.py under
the data settings being estimated, so one scan serves every max_pixels the advisor tries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlmtune.errors import DataError
from vlmtune.memory.catalogue import ModelSpec
from vlmtune.memory.image_tokens import image_cost, tile_wrapper_tokens

BYTES_PER_TOKEN = 3.5
PERCENTILES = (50, 90, 95, 99, 100)


@dataclass(frozen=True)
class SampleShape:
    text_tokens: int
    """Text and chat-template tokens (image tokens excluded)."""
    images: tuple[tuple[int, int], ...]
    """(height, width) of each image, in order."""


@dataclass(frozen=True)
class SampleCosts:
    lengths: list[int]
    image_tokens: list[int]
    patches: list[int]


@dataclass(frozen=True)
class BatchShape:
    seq_len: int
    """Longest sample of the worst batch, capped at max_length (the collator pads to it)."""
    vit_patches: int
    """Vision patches of the worst batch (the batch_size samples with the most)."""
    images_per_sample: int
    image_tokens: int
    """Most image tokens in one sample."""
    percentiles: dict[str, int]
    """Token lengths (image tokens included) at p50/p90/p95/p99/max."""
    over_limit: int
    """Samples longer than max_length (dropped or cut by the engine)."""


@dataclass(frozen=True)
class DataProfile:
    path: str
    samples: tuple[SampleShape, ...]
    exact_text: bool
    """Whether text was counted with the model's tokenizer."""

    @property
    def images(self) -> int:
        return sum(len(s.images) for s in self.samples)

    def costs(
        self,
        spec: ModelSpec,
        image_size: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> SampleCosts:
        """Per-sample token lengths (image tokens included), image tokens and vision patches under the given
        processor limits."""
        per_image = spec.arch.chat.get("tokens_per_image", 0)
        out = SampleCosts([], [], [])
        for sample in self.samples:
            image_tokens, vit = 0, 0
            for h, w in sample.images:
                cost = image_cost(spec.image, h, w, image_size, min_pixels, max_pixels)
                image_tokens += cost.llm_tokens + per_image + tile_wrapper_tokens(spec.image, cost)
                vit += cost.vit_patches
            out.lengths.append(sample.text_tokens + image_tokens)
            out.image_tokens.append(image_tokens)
            out.patches.append(vit)
        return out

    def batch(
        self,
        spec: ModelSpec,
        batch_size: int,
        max_length: int,
        image_size: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        costs: SampleCosts | None = None,
    ) -> BatchShape:
        """The worst micro-batch this data can produce under the given processor limits (`costs` reuses a
        previous `costs()` result for the same limits)."""
        costs = costs or self.costs(spec, image_size, min_pixels, max_pixels)
        ordered = sorted(costs.lengths)
        pct = {
            f"p{p}" if p < 100 else "max": ordered[
                min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)
            ]
            for p in PERCENTILES
        }
        return BatchShape(
            seq_len=min(ordered[-1], max_length),
            vit_patches=sum(sorted(costs.patches)[-batch_size:]),
            images_per_sample=max(len(s.images) for s in self.samples),
            image_tokens=max(costs.image_tokens),
            percentiles=pct,
            over_limit=sum(n > max_length for n in costs.lengths),
        )


def _text_counter(spec: ModelSpec) -> tuple[Callable[[str], int], bool]:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec.path or spec.name, local_files_only=True)
    except (OSError, ValueError, ImportError):
        return (lambda text: math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)), False
    return (lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])), True


def _image_hw(path: Path) -> tuple[int, int]:
    from PIL import Image

    from vlmtune.data.images import image_file

    with Image.open(image_file(path)) as image:
        width, height = image.size
    return height, width


def scan_data(path: str | Path, spec: ModelSpec, image_root: str | Path | None = None) -> DataProfile:
    """Read every record's text length and image sizes. Raises DataError listing every unreadable record/image.
    `image_root`: data.image_root, where relative image paths resolve first (then the data file's folder)."""
    from vlmtune.config.schema import DataConfig
    from vlmtune.data.records import format_problems, scan

    path = Path(path)
    count, exact = _text_counter(spec)
    per_message = spec.arch.chat.get("tokens_per_message", 0)
    samples, problems, bad_images = [], [], []
    measuring = DataConfig(on_ignored_field="warn", image_root=image_root)  # measuring, not training
    for _, record, found in scan(path, measuring):
        problems += [p for p in found if p.severity == "error"]
        if record is None:
            continue
        text = sum(count(m.text) + per_message for m in record.messages)
        sizes = []
        for image in record.images:
            try:
                sizes.append(_image_hw(image))
            except (OSError, ValueError) as exc:
                bad_images.append(f"{path}:{record.line}: cannot read image {image}: {exc}")
        samples.append(SampleShape(text, tuple(sizes)))
    if problems or bad_images:
        lines = ([format_problems(path, problems)] if problems else []) + bad_images[:50]
        raise DataError(
            f"cannot size the data in {path} ({len(problems) + len(bad_images)} problem(s)):\n"
            + "\n".join(lines)
        )
    if not samples:
        raise DataError(f"{path} has no records to size")
    return DataProfile(str(path), tuple(samples), exact)
