"""A lazy data set's first pass from image headers (`data.survey`): the same kept records, lengths and labelled
counts as encoding every record, for every family, without decoding an image unless a record is over max_length."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import vlmtune.data.images
from vlmtune.config.schema import DataConfig
from vlmtune.data.dataset import EncodedDataset
from vlmtune.data.processing import encode
from vlmtune.data.records import ImagePart, Message, Record, TextPart
from vlmtune.data.survey import survey
from vlmtune.families import all_families, get_family


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (80, 60), "red").save(folder / "a.png")
    Image.new("RGB", (40, 90), "blue").save(folder / "b.png")
    return folder / "a.png", folder / "b.png"


def records(images: tuple[Path, Path], multi: bool) -> list[Record]:
    a, b = images
    q = [TextPart("What colour is the picture?")]
    out = [
        Record(1, [Message("user", [ImagePart(a), *q]), Message("assistant", [TextPart("Red.")])]),
        Record(2, [Message("system", [TextPart("Be brief.")]), Message("user", [TextPart("Say hi.")]),
                   Message("assistant", [TextPart("Hi.")], train=False), Message("user", [ImagePart(b), *q]),
                   Message("assistant", [TextPart("Blue, mostly.")])]),
        Record(3, [Message("user", [TextPart("Tell a long story.")]),
                   Message("assistant", [TextPart("Once upon a time " * 40)])]),  # over max_length: truncated
        Record(4, [Message("user", [TextPart("x " * 200), ImagePart(a), *q]),
                   Message("assistant", [TextPart("Red.")])]),  # the cut falls before the image: dropped
    ]
    if multi:
        out.append(Record(5, [Message("user", [ImagePart(a), TextPart("and"), ImagePart(b), *q]),
                              Message("assistant", [TextPart("Red and blue.")])]))
    return out


FAMILIES = sorted(f.name for f in all_families())


@pytest.mark.parametrize("name", FAMILIES)
def test_the_header_survey_learns_what_encoding_does(name: str, images, tiny_model_dir, monkeypatch) -> None:
    family = get_family(name)
    if family.record_problem(records(images, False)[0]) is not None:
        pytest.skip(f"{name} takes other records (its record_problem)")
    processor = family.load_processor(tiny_model_dir(name), DataConfig())
    data_cfg = DataConfig(max_length=96)
    multi = family.capabilities.get("multi_image").__class__.__name__ != "Unsupported"
    recs = [r for r in records(images, multi) if family.record_problem(r) is None]

    def enc(record):
        return encode(record, processor, family, data_cfg)

    encoded = EncodedDataset(recs, enc, eager=False)
    decoded = []
    real_decode = vlmtune.data.images.decode_image
    monkeypatch.setattr(vlmtune.data.images, "decode_image",
                        lambda path, *a, **k: decoded.append(path) or real_decode(path, *a, **k))
    surveyed = EncodedDataset(recs, enc, eager=False,
                              survey=lambda record: survey(record, processor, family, data_cfg))
    assert (surveyed.lengths, surveyed.labelled, surveyed.dropped) == \
        (encoded.lengths, encoded.labelled, encoded.dropped)
    assert 4 in surveyed.dropped and 3 not in surveyed.dropped
    assert set(decoded) <= {images[0]}  # only record 4 (over max_length with an image) was encoded
