"""Images embedded in the data (base64 in a record, a `data:` URL, image bytes in a parquet or arrow cell).

Kept apart from `images` so that parsing records does not import Pillow.
"""

from __future__ import annotations

import hashlib


class EmbeddedImage:
    """An image whose bytes are in the data itself (base64 or a `data:` URL in a record, a parquet/arrow cell).

    Stands where an image path stands (`ImagePart.path`, `Record.images`): `data.images` opens it from memory, and
    nothing is written to disk. `str()` names where it came from, for messages."""

    __slots__ = ("data", "origin", "_digest")

    def __init__(self, data: bytes, origin: str):
        self.data, self.origin = data, origin
        self._digest = hashlib.sha1(data).hexdigest()[:12]

    def __str__(self) -> str:
        return f"embedded image ({self.origin}, {len(self.data):,} bytes)"

    def __repr__(self) -> str:  # with the content's hash: data.dataset fingerprints records by their repr
        return f"EmbeddedImage({self.origin!r}, {len(self.data)} bytes, sha1 {self._digest})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EmbeddedImage) and other.data == self.data

    def __hash__(self) -> int:
        return hash(self._digest)
