"""What a lazy data set's first pass must learn of each record (kept or dropped, its length, its labelled tokens),
without decoding an image: so training on a large image set starts after reading the records and the image
headers, not after encoding every image once (issue 18: 100,000 parquet rows of 448 px images).

The numbers are the ones `processing.encode` gives: the rendered conversation's segments are tokenized as encode
tokenizes them, and each image adds what its processor expands it to, from the image's header size
(`family.image_token_count`, the rule `count_tokens` and `data check` use, tested equal to the encoded length).
Only a record over `data.max_length` that has images needs the real encoding, to see where the cut falls against its
image spans: `survey` returns None for it, and the data set encodes that one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmtune.config.schema import DataConfig
    from vlmtune.data.records import Record
    from vlmtune.families.base import FamilyDescriptor


def survey(record: Record, processor: Any, family: FamilyDescriptor,
           data_cfg: DataConfig) -> tuple[bool, int, int] | None:
    """(kept, length, labelled tokens) as `encode` would give them, or None when only encoding can tell."""
    from vlmtune.data.images import image_size
    from vlmtune.data.processing import segments

    segs = segments(record, processor, family)  # first: it refuses what the family cannot take (record_problem)
    extra = []
    for image in record.images:
        width, height = image_size(image, data_cfg.max_image_megapixels)
        extra.append(family.image_token_count(height, width, processor) - 1)
    pos, taken, labelled_spans = 0, 0, []
    for seg in segs:
        n = len(processor.tokenizer(seg.text, add_special_tokens=False)["input_ids"])
        n += sum(extra[taken: taken + seg.images])
        taken += seg.images
        if seg.labelled:
            labelled_spans.append((pos, pos + n))
        pos += n
    limit = data_cfg.max_length
    if pos > limit and record.images:
        return None
    length = min(pos, limit)
    labelled = sum(max(0, min(end, length) - start) for start, end in labelled_spans)
    return labelled > 0, length, labelled
