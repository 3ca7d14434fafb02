"""What the engine refuses before it reads any model weights, and the data set's drop accounting."""

from __future__ import annotations

import json

import pytest

import vlmtune.methods
from vlmtune.config.schema import DataConfig
from vlmtune.data.dataset import EncodedDataset
from vlmtune.data.records import read_records
from vlmtune.errors import ConfigError, DataError
from vlmtune.train.engine import train


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(name):
        raise AssertionError("the model was loaded although the run should have stopped before")

    monkeypatch.setattr(vlmtune.methods, "get_method", refuse)


def test_bad_data_is_refused_before_the_model_loads(run_config, shapes_data, tmp_path, no_model_loading):
    train_path, _ = shapes_data
    lines = train_path.read_text().splitlines()
    broken = json.loads(lines[1])
    broken["messages"][0]["content"][0]["image"] = str(train_path.parent / "images" / "missing.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], json.dumps(broken), "{not json"]) + "\n")
    config = run_config(data={"train_path": str(bad)})
    with pytest.raises(DataError) as info:
        train(config)
    message = str(info.value)
    assert "bad.jsonl:2" in message and "bad.jsonl:3" in message  # every problem, with its line
    assert not config.output_dir.exists()  # the folder it made is gone again: nothing stale for the rerun


def test_every_record_over_max_length_is_refused(run_config, no_model_loading):
    with pytest.raises(DataError, match="max_length"):
        train(run_config(data={"max_length": 8}))


def test_missing_training_file_setting_is_a_config_error(run_config, no_model_loading):
    with pytest.raises(ConfigError, match="data.train_path"):
        train(run_config(data={"train_path": None}))


def test_unsupported_feature_is_refused_with_the_family_reason(run_config, no_model_loading):
    with pytest.raises(ConfigError, match="data.min_pixels / data.max_pixels"):
        train(run_config("llava", data={"max_pixels": 3136}))  # LLaVA-1.5 has a fixed input resolution


def test_dataset_counts_dropped_records(shapes_data, tiny_model_dir):
    from vlmtune.data.processing import encode
    from vlmtune.families import get_family

    family = get_family("qwen2_vl")
    processor = family.load_processor(tiny_model_dir("qwen2_vl"))
    records = read_records(shapes_data[0])[:4]
    keep = {records[0].line, records[2].line}
    cfg = DataConfig()

    def encode_some(record):
        return encode(record, processor, family, cfg) if record.line in keep else None

    for eager in (True, False):
        dataset = EncodedDataset(records, encode_some, source="train.jsonl", eager=eager)
        assert len(dataset) == 2 and dataset.dropped_count == 2
        assert dataset.dropped == [records[1].line, records[3].line]
        assert dataset[1].line == records[2].line
    with pytest.raises(DataError, match="all 4 sample"):
        EncodedDataset(records, lambda record: None, source="train.jsonl")
