"""Batching encoded samples: per-token tensors right-padded to the longest sample, image tensors concatenated.

Image tensors are concatenated on dim 0 (dynamic-resolution processors return pixel_values as patches x features
with image_grid_thw saying which rows belong to which image; fixed-resolution ones as images x C x H x W), so a
batch may mix samples with and without images. M-RoPE models in transformers 5.23 need `mm_token_type_ids` next to
input_ids to build positions when images are passed; it is a per-token tensor here, padded with 0 (text).
A family's per-sample extra inputs (e.g. a Q-Former's text input) are padded with 0 and stacked (`collate_extras`).
Per-token tensors with more dims (Mllama's cross_attention_mask: tokens x images x tiles) are padded with 0 on every
dim; samples whose model takes images per sample (`EncodedSample.images_per_sample`) get their image tensors stacked
one row per sample, zero-padded (a padded image has aspect_ratio_id 0 and no tile in the cross-attention mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlmtune.data.processing import IGNORE_INDEX, EncodedSample


class Collator:
    """`Collator(pad_token_id)(samples) -> dict` of tensors ready for the model's forward.

    rope_index: the model's `get_rope_index` (M-RoPE families, `vlmtune.data.packing.rope_index_of`): the batch then
    carries the model's own 3-D position ids, computed here, in the data loader's worker processes, instead of in
    the forward on the GPU, where transformers' per-sample loops cost about 80 host-device syncs per step
    (W1 profile, benchmarks/RESULTS.md session 5) while the GPU waits (`speed.positions_in_collator`)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, rope_index: Any = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.rope_index = rope_index

    def pad_value(self, key: str) -> int:
        if key == "input_ids":
            return self.pad_token_id
        return IGNORE_INDEX if key == "labels" else 0

    def __call__(self, samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        keys = list(samples[0].sequence)
        if any(list(s.sequence) != keys for s in samples):
            raise ValueError(f"samples carry different per-token tensors: {[list(s.sequence) for s in samples]}")
        length = max(len(s) for s in samples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, torch.Tensor] = {}
        for key in keys:
            values = [s.sequence[key] for s in samples]
            trailing = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
            batch[key] = pad_stack(values, (length, *trailing), self.pad_value(key))
        batch.update(collate_extras(samples))
        image_keys = list(dict.fromkeys(k for s in samples for k in s.images))
        for key in image_keys:
            if samples[0].images_per_sample:  # (samples, images, ...), each zero-padded to the batch's largest
                with_key = [s.images[key] for s in samples if key in s.images]
                values = [s.images.get(key, with_key[0][:0]) for s in samples]
                shape = [max(v.shape[d] for v in values) for d in range(values[0].dim())]
                batch[key] = pad_stack(values, tuple(shape), 0)
            else:
                batch[key] = torch.cat([s.images[key] for s in samples if key in s.images], dim=0)
        if self.rope_index is not None and "mm_token_type_ids" in batch:
            batch["position_ids"], _ = self.rope_index(
                input_ids=batch["input_ids"],
                mm_token_type_ids=batch["mm_token_type_ids"],
                image_grid_thw=batch.get("image_grid_thw"),
                attention_mask=batch.get("attention_mask"),
            )
        return batch


def pad_stack(values: Sequence[torch.Tensor], shape: tuple[int, ...], fill: int) -> torch.Tensor:
    """`values` stacked into (len(values), *shape), each in the leading corner, the rest `fill`."""
    out = torch.full((len(values), *shape), fill, dtype=values[0].dtype)
    for row, value in enumerate(values):
        out[(row, *(slice(0, n) for n in value.shape))] = value
    return out


def collate_extras(samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
    """The samples' `extras` (family.extra_text_inputs), right-padded with 0 to the longest and stacked: one row per
    sample; a padded `*attention_mask` is 0 there, so the padded ids are never attended."""
    keys = list(samples[0].extras)
    if any(list(s.extras) != keys for s in samples):
        raise ValueError(f"samples carry different extra inputs: {[list(s.extras) for s in samples]}")
    batch = {}
    for key in keys:
        values = [s.extras[key] for s in samples]
        out = torch.zeros((len(values), max(v.shape[0] for v in values)), dtype=values[0].dtype)
        for row, value in enumerate(values):
            out[row, : value.shape[0]] = value
        batch[key] = out
    return batch
