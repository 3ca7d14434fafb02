"""A torch Dataset over JSONL records, encoded by the model's processor, that counts what it had to drop.

`encode` returns None for a sample that cannot be kept (its max_length cut falls inside an image span; see
`data.on_overflow`). Which samples survive is settled when the dataset is built, so its length, the sampler's order
and therefore resuming mid-epoch are all deterministic:
- eager: every record is encoded once up front and kept in memory (small data sets; the default below 1,000).
- lazy: a first pass encodes every record to learn which survive, then throws the tensors away; `__getitem__`
  encodes again on demand, so memory stays flat for large image sets at the price of encoding twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from vlmtune.data.processing import IGNORE_INDEX
from vlmtune.data.records import Record
from vlmtune.errors import DataError

log = logging.getLogger(__name__)

EAGER_LIMIT = 1000
"""Data sets with at most this many records are encoded eagerly."""

EncodeFn = Callable[[Record], Any]


def _labelled(sample: Any) -> int:
    labels = getattr(sample, "labels", None)
    return int((labels != IGNORE_INDEX).sum()) if labels is not None else len(sample)


class EncodedDataset(Dataset):
    """Records encoded for training; `dropped` lists the source lines of the samples that were left out."""

    def __init__(
        self, records: Sequence[Record], encode: EncodeFn, source: Path | str = "", eager: bool | None = None
    ):
        self.source = str(source)
        self.eager = len(records) <= EAGER_LIMIT if eager is None else eager
        self._encode = encode
        self._samples: list[Any] = []
        self._records: list[Record] = []
        self.dropped: list[int] = []
        self.lengths: list[int] = []
        """Token length (image tokens included) of each kept sample, in dataset order: sizes the worst batch."""
        self.labelled: list[int] = []
        """Tokens with a label (trained on) in each kept sample: sizes the loss."""
        for record in records:
            sample = encode(record)
            if sample is None:
                self.dropped.append(record.line)
                continue
            self._records.append(record)
            self.lengths.append(len(sample))
            self.labelled.append(_labelled(sample))
            if self.eager:
                self._samples.append(sample)
        if not self._records:
            raise DataError(
                f"{self.source}: all {len(records)} sample(s) were dropped because they do not fit "
                "data.max_length without cutting into an image; raise data.max_length or lower "
                "data.image_size / data.max_pixels (run `vlmtune data check` for token lengths)."
            )
        if self.dropped:
            shown = ", ".join(str(n) for n in self.dropped[:20]) + (" ..." if len(self.dropped) > 20 else "")
            log.warning(
                "%s: dropped %d of %d sample(s) longer than data.max_length (lines %s)",
                self.source,
                len(self.dropped),
                len(records),
                shown,
            )

    @property
    def dropped_count(self) -> int:
        return len(self.dropped)

    @property
    def records(self) -> list[Record]:
        """The records that were kept, in dataset order."""
        return list(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Any:
        if self.eager:
            return self._samples[index]
        record = self._records[index]
        sample = self._encode(record)
        if sample is None:
            raise DataError(
                f"{self.source}:{record.line}: the sample encoded on the first pass but not on the "
                "second; the record or its image changed while training was running."
            )
        return sample
