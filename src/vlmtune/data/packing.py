"""Padding-free packing: several encoded samples in one row, each attending only to itself.

    bins = pack_bins(dataset.lengths, budget)          # first-fit decreasing, deterministic
    packed = PackedDataset(dataset, bins)              # item i = the samples of bin i (the Trainer shuffles bins)
    collate = PackingCollator(pad_token_id, rope_index=rope_index_of(model))

A packed row concatenates its samples' tokens; images stay whole (their tensors are concatenated in order, as in a
padded batch). Attention isolation comes from the positions: every sample's positions restart at 0 and the row
carries no attention_mask, which transformers (>= 5.17, `find_packed_sequence_indices`) turns into a block-diagonal
causal mask for SDPA / eager / flex attention, or varlen boundaries for flash-attention. For M-RoPE models (a model
with `get_rope_index`) the 3-D positions are computed per sample by the model's own `get_rope_index` and sent as
`position_ids` of shape (4, rows, length): text positions first (which transformers reads the sample boundaries
from), then the temporal/height/width rows.

The loss is unchanged: the first token of every sample is unlabelled (so no sample learns to predict the next one's
start), and the mean over all labelled tokens of a packed batch is the mean over the same tokens unpacked. Rows of
one batch are right-padded to the longest; the padding is its own unlabelled block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from vlmtune.data.processing import IGNORE_INDEX, EncodedSample

RopeIndex = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def pack_bins(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped into bins of at most `budget` tokens (first-fit decreasing; a longer sample gets its own
    bin). Within a bin the samples keep dataset order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for index in order:
        size = lengths[index]
        slot = next((b for b, room in enumerate(free) if room >= size), None)
        if slot is None:
            bins.append([index])
            free.append(budget - size)
        else:
            bins[slot].append(index)
            free[slot] -= size
    return [sorted(b) for b in bins]


class PackedDataset(Dataset):
    """Item i is the list of samples of bin i."""

    def __init__(self, base: Any, bins: list[list[int]]):
        self.base, self.bins = base, bins

    @classmethod
    def from_dataset(cls, base: Any, budget: int) -> PackedDataset:
        lengths = getattr(base, "lengths", None) or [len(base[i]) for i in range(len(base))]
        return cls(base, pack_bins(lengths, budget))

    @property
    def dropped_count(self) -> int:
        return int(getattr(self.base, "dropped_count", 0))

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> list[EncodedSample]:
        return [self.base[i] for i in self.bins[index]]


def rope_index_of(model: torch.nn.Module) -> RopeIndex | None:
    """The model's `get_rope_index` (M-RoPE families), or None for 1-D positions."""
    for module in model.modules():
        fn = getattr(module, "get_rope_index", None)
        if callable(fn):
            return fn
    return None


class PackingCollator:
    """`PackingCollator(pad_token_id, rope_index)(rows) -> dict`; `rows` is a list of lists of samples (one list
    per packed row), or a flat list of samples (packed into one row)."""

    def __init__(self, pad_token_id: int, rope_index: RopeIndex | None = None):
        self.pad_token_id = pad_token_id
        self.rope_index = rope_index

    def positions(self, sample: EncodedSample) -> torch.Tensor:
        """(1 or 3, length) positions of one sample on its own, as the model would compute them unpacked."""
        length = len(sample)
        if self.rope_index is None:
            return torch.arange(length)[None]
        grid = sample.images.get("image_grid_thw")
        position_ids, _ = self.rope_index(
            input_ids=sample.input_ids[None],
            mm_token_type_ids=sample.sequence["mm_token_type_ids"][None],
            image_grid_thw=grid,
            attention_mask=None,
        )
        return position_ids[:, 0]

    def _row(self, samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        keys = list(samples[0].sequence)
        row = {key: torch.cat([s.sequence[key] for s in samples]) for key in keys}
        labels = row["labels"] = row["labels"].clone()
        starts = torch.tensor([0] + [len(s) for s in samples[:-1]]).cumsum(0)
        labels[starts] = IGNORE_INDEX
        text = torch.cat([torch.arange(len(s)) for s in samples])
        if self.rope_index is None:
            row["position_ids"] = text
        else:
            row["position_ids"] = torch.cat(
                [text[None], torch.cat([self.positions(s) for s in samples], dim=1)]
            )
        row.pop("attention_mask", None)
        return row

    def __call__(self, rows: Sequence[Any]) -> dict[str, Any]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        groups = [list(r) for r in rows] if isinstance(rows[0], (list, tuple)) else [list(rows)]
        if any(s.extras or s.images_per_sample for g in groups for s in g):
            raise ValueError("packed rows cannot carry a family's per-sample extra inputs (e.g. the Q-Former text) or "
                             "per-sample images (cross-attention); the family's capability map should have refused "
                             "speed.packing")
        built = [self._row(g) for g in groups]
        length = max(r["input_ids"].shape[0] for r in built)
        batch: dict[str, Any] = {}
        for key in built[0]:
            batch[key] = torch.stack([self._pad(key, r[key], length) for r in built], dim=-2)
        samples = [s for g in groups for s in g]
        for key in dict.fromkeys(k for s in samples for k in s.images):
            batch[key] = torch.cat([s.images[key] for s in samples if key in s.images], dim=0)
        batch["use_cache"] = False  # with a cache, transformers ignores the packing
        return batch

    def _pad(self, key: str, value: torch.Tensor, length: int) -> torch.Tensor:
        missing = length - value.shape[-1]
        if missing == 0:
            return value
        if key == "position_ids":  # the padding is one more block whose positions restart at 0
            fill = torch.arange(missing).expand(*value.shape[:-1], missing)
        else:
            pad = self.pad_token_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
            fill = torch.full((*value.shape[:-1], missing), pad, dtype=value.dtype)
        return torch.cat([value, fill.to(value.dtype)], dim=-1)
