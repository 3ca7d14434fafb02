"""A torch Dataset over JSONL records, encoded by the model's processor, that counts what it had to drop.

`encode` returns None for a sample that cannot be kept (its max_length cut falls inside an image span; see
`data.on_overflow`). Which samples survive is settled when the dataset is built, so its length, the sampler's order
and therefore resuming mid-epoch are all deterministic:
- eager: every record is encoded once up front and kept in memory (small data sets; the default below 1,000).
- lazy: a first pass learns which records survive and their lengths, without keeping tensors; `__getitem__`
  encodes on demand, so memory stays flat for large image sets. Given `survey` (`data.survey`), that pass reads
  image headers instead of decoding images (it encodes only the over-long records with images); without it, it
  encodes every record once.

Training's data check can be that first pass (`EncodeOnce`): it encodes each record to count its tokens, and the
dataset built from the same file afterwards takes the samples, lengths and drops it learned instead of encoding
again.

Memory per record, past the EAGER_LIMIT samples held: EncodeOnce keeps ~33 bytes (arrays of line, fingerprint,
length, labelled count, kept), the dataset an index into its records (8 bytes) and its length lists; records come
from `records.RecordFile`, which reads each one back from the file when asked for it.
"""

from __future__ import annotations

import logging
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Encoded:
    """What a first pass learned of one record."""

    record: Record
    sample: Any | None
    """The encoded sample; None when dropped, or when not kept (a data set too large to hold, see EncodeOnce)."""
    kept: bool
    length: int = 0
    labelled: int = 0


def _survey(record: Record, sample: Any | None) -> Encoded:
    if sample is None:
        return Encoded(record, None, kept=False)
    return Encoded(record, sample, kept=True, length=len(sample), labelled=_labelled(sample))


def _fingerprint(record: Record) -> int:
    """64 bits that change when the record's content does (the pass keeps this, not the record)."""
    return hash((record.line, repr(record.messages)))


class EncodeOnce:
    """One encoding pass shared by training's data check and the dataset built after it from the same file.

    `count(record)` is the check's token-length function: it encodes the record and remembers the result, and
    `EncodedDataset(records, encode, first_pass=this)` takes it instead of encoding again. The count is the
    untruncated length the check reports: the encoded length when nothing was cut, else `count_tokens(record)`
    (a cut or dropped sample no longer shows its full length, so only those are tokenized a second time).
    Samples are held for at most EAGER_LIMIT records, what an eager dataset holds; past that only lengths and drops
    are, and the (lazy) dataset encodes on demand as usual. Records are remembered by line and fingerprint, in file
    order (as the check visits them), ~33 bytes each."""

    _TAKEN = -1

    def __init__(self, encode: EncodeFn, count_tokens: Callable[[Record], int], max_length: int):
        self._encode, self._count_tokens, self._max_length = encode, count_tokens, max_length
        self._lines, self._prints = array("q"), array("q")
        self._lengths, self._labelled, self._kept = array("q"), array("q"), array("b")
        self._samples: dict[int, Any] = {}
        self._hold_samples = True

    def count(self, record: Record) -> int:
        try:
            sample = self._encode(record)
        except DataError:  # e.g. data.on_overflow=error: the dataset encodes it again and raises there, as before
            return self._count_tokens(record)
        self._remember(_survey(record, sample))
        if sample is not None and len(sample) < self._max_length:
            return len(sample)
        return self._count_tokens(record)

    def _remember(self, seen: Encoded) -> None:
        line = seen.record.line
        if self._lines and line <= self._lines[-1]:
            return  # out of file order: not remembered (the dataset encodes it itself)
        if self._hold_samples and len(self._lines) >= EAGER_LIMIT:
            self._hold_samples = False
            self._samples.clear()
        self._lines.append(line)
        self._prints.append(_fingerprint(seen.record))
        self._lengths.append(seen.length)
        self._labelled.append(seen.labelled)
        self._kept.append(int(seen.kept))
        if self._hold_samples and seen.sample is not None:
            self._samples[line] = seen.sample

    def take(self, record: Record) -> Encoded | None:
        """What the pass learned of `record` (once), or None if it did not see this very record."""
        i = bisect_left(self._lines, record.line)
        if i == len(self._lines) or self._lines[i] != record.line or self._kept[i] == self._TAKEN:
            return None
        if self._prints[i] != _fingerprint(record):
            return None
        kept, self._kept[i] = bool(self._kept[i]), self._TAKEN
        sample = self._samples.pop(record.line, None)
        return Encoded(record, sample, kept, self._lengths[i], self._labelled[i])


class EncodedDataset(Dataset):
    """Records encoded for training; `dropped` lists the source lines of the samples that were left out.

    `first_pass`: an EncodeOnce that has already encoded these records with the same `encode`. `survey(record)`:
    (kept, length, labelled) as `encode` would give them, or None to encode (a lazy data set's first pass)."""

    def __init__(
        self,
        records: Sequence[Record],
        encode: EncodeFn,
        source: Path | str = "",
        eager: bool | None = None,
        first_pass: EncodeOnce | None = None,
        survey: Callable[[Record], tuple[bool, int, int] | None] | None = None,
    ):
        self.source = str(source)
        self.eager = len(records) <= EAGER_LIMIT if eager is None else eager
        self._encode = encode
        self._samples: list[Any] = []
        self._all = records
        self._kept = array("q")
        self.dropped: list[int] = []
        self.lengths: list[int] = []
        """Token length (image tokens included) of each kept sample, in dataset order: sizes the worst batch."""
        self.labelled: list[int] = []
        """Tokens with a label (trained on) in each kept sample: sizes the loss."""
        for index, record in enumerate(records):
            seen = first_pass.take(record) if first_pass is not None else None
            if seen is None and survey is not None and not self.eager:
                learnt = survey(record)
                seen = Encoded(record, None, *learnt) if learnt is not None else None
            if seen is None or (self.eager and seen.kept and seen.sample is None):
                seen = _survey(record, encode(record))
            if not seen.kept:
                self.dropped.append(record.line)
                continue
            self._kept.append(index)
            self.lengths.append(seen.length)
            self.labelled.append(seen.labelled)
            if self.eager:
                self._samples.append(seen.sample)
        if not self._kept:
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
    def records(self) -> Sequence[Record]:
        """The records that were kept, in dataset order (read on demand when the source reads on demand)."""
        return _Kept(self._all, self._kept)

    def __len__(self) -> int:
        return len(self._kept)

    def __getitem__(self, index: int) -> Any:
        if self.eager:
            return self._samples[index]
        record = self._all[self._kept[index]]
        sample = self._encode(record)
        if sample is None:
            raise DataError(
                f"{self.source}:{record.line}: the sample encoded on the first pass but not on the "
                "second; the record or its image changed while training was running."
            )
        return sample


class _Kept(Sequence[Record]):
    """A view of the kept records of a sequence, by index."""

    def __init__(self, records: Sequence[Record], kept: array):
        self._records, self._kept = records, kept

    def __len__(self) -> int:
        return len(self._kept)

    def __getitem__(self, index: int | slice) -> Record | list[Record]:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._records[self._kept[index]]

    def __iter__(self) -> Iterator[Record]:
        if isinstance(self._records, list):
            yield from (self._records[i] for i in self._kept)
            return
        kept = iter(self._kept)
        want = next(kept, None)
        for i, record in enumerate(self._records):  # one streaming read instead of one open per record
            if i == want:
                yield record
                want = next(kept, None)
                if want is None:
                    return
