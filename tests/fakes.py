"""Stand-ins shared by tests in several folders (tests/ is on the import path through its conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FakeDataset:
    """What the memory preflight reads of an EncodedDataset: kept records (their images) and encoded lengths."""

    records: list
    lengths: list[int]
    labelled: list[int]
    source: str = "fake.jsonl"
    dropped: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.lengths)
