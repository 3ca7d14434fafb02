"""The dataset built after training's data check takes that check's encodings (one pass, not two) and ends up
the same as a dataset that encodes on its own: samples, lengths, drops, eager or lazy. The check's report is the
same as with the plain token counter."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import vlmtune.data.dataset as dataset_module
from vlmtune.config.schema import DataConfig
from vlmtune.data.check import check_file
from vlmtune.data.dataset import EncodedDataset, EncodeOnce
from vlmtune.data.processing import count_tokens, encode
from vlmtune.data.records import read_records
from vlmtune.errors import DataError
from vlmtune.families import get_family

MAX_LENGTH = 96


@pytest.fixture(scope="module")
def qwen(tiny_model_dir):
    family = get_family("qwen2_vl")
    return family, family.load_processor(tiny_model_dir("qwen2_vl"), DataConfig())


@pytest.fixture
def data_file(write_jsonl, make_image, chat):
    """Short records, one cut after its image (kept, truncated) and one with its image past MAX_LENGTH."""
    make_image("img.png", size=(56, 56))
    late_image = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "word " * 120}, {"type": "image", "image": "img.png"}]},
        {"role": "assistant", "content": "red"},
    ]}
    return write_jsonl([chat(), chat(answer="blue " * 120), late_image, chat(question="Which?"), chat(image=None)])


def counting(fn: Callable) -> tuple[Callable, list[int]]:
    calls: list[int] = []

    def wrapped(record):
        calls.append(record.line)
        return fn(record)

    return wrapped, calls


def passes(qwen, cfg: DataConfig):
    family, processor = qwen
    encode_fn, encoded = counting(lambda r: encode(r, processor, family, cfg))
    count_fn, counted = counting(lambda r: count_tokens(r, processor, family, cfg))
    return encode_fn, EncodeOnce(encode_fn, count_fn, cfg.max_length), encoded, counted


@pytest.mark.parametrize("eager", [True, False])
def test_the_dataset_reuses_the_checks_encodings(qwen, data_file, eager, monkeypatch):
    family, processor = qwen
    if not eager:
        monkeypatch.setattr(dataset_module, "EAGER_LIMIT", 2)  # the pass holds no samples past the limit
    cfg = DataConfig(max_length=MAX_LENGTH, on_overflow="drop")
    plain = check_file(data_file, cfg, lambda r: count_tokens(r, processor, family, cfg))
    encode_fn, first_pass, encoded, counted = passes(qwen, cfg)
    shared = check_file(data_file, cfg, first_pass.count)
    assert shared.to_dict() == plain.to_dict()  # the check reports exactly what the token counter gave
    assert encoded == [1, 2, 3, 4, 5] and counted == [2, 3]  # only the cut and the dropped record are counted
    records = read_records(data_file)
    dataset = EncodedDataset(records, encode_fn, source="data.jsonl", first_pass=first_pass)
    assert encoded == [1, 2, 3, 4, 5]  # nothing encoded again to build it
    alone = EncodedDataset(records, lambda r: encode(r, processor, family, cfg), source="data.jsonl")
    assert dataset.dropped == alone.dropped == [3] and dataset.eager is eager
    assert dataset.lengths == alone.lengths and dataset.labelled == alone.labelled
    assert MAX_LENGTH in dataset.lengths  # the cut record, truncated
    for i in range(len(alone)):
        assert dataset[i].input_ids.tolist() == alone[i].input_ids.tolist()
    assert len(encoded) == (5 if eager else 5 + len(alone))  # lazy: encoded on demand, as before


def test_an_overflow_error_is_raised_by_the_dataset_as_without_the_pass(qwen, data_file):
    cfg = DataConfig(max_length=MAX_LENGTH, on_overflow="error")
    encode_fn, first_pass, _, counted = passes(qwen, cfg)
    report = check_file(data_file, cfg, first_pass.count)
    assert report.ok and 3 in counted  # the check counts it (a warning); the encoding error is not remembered
    with pytest.raises(DataError, match="line 3: .* set data.on_overflow=drop"):
        EncodedDataset(read_records(data_file), encode_fn, first_pass=first_pass)


def test_a_record_the_pass_did_not_see_is_encoded(qwen, data_file, write_jsonl, chat):
    cfg = DataConfig(max_length=MAX_LENGTH, on_overflow="drop")
    encode_fn, first_pass, encoded, _ = passes(qwen, cfg)
    check_file(data_file, cfg, first_pass.count)
    encoded.clear()
    other = read_records(write_jsonl([chat(answer="green")] * 2, name="other.jsonl"))  # same lines, other records
    EncodedDataset(other, encode_fn, first_pass=first_pass)
    assert encoded == [1, 2]
