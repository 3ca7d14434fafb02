import json
from pathlib import Path

import pytest
import yaml

from vlmtune.config import ConfigPresets, TrainingMethod, load_config, save_config
from vlmtune.config.loader import apply_overrides
from vlmtune.errors import ConfigError


def test_defaults_validate():
    cfg = load_config()
    assert cfg.method.name is TrainingMethod.LORA
    assert cfg.training.save_steps == 100


def test_yaml_and_json_load_the_same(tmp_path):
    data = {"method": {"name": "qlora", "lora": {"rank": 8}}, "training": {"batch_size": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "c.json").write_text(json.dumps(data))
    a, b = load_config(tmp_path / "c.yaml"), load_config(tmp_path / "c.json")
    assert a == b
    assert a.method.name is TrainingMethod.QLORA and a.method.lora.rank == 8 and a.training.batch_size == 2


def test_dotted_overrides_are_typed(tmp_path):
    cfg = load_config(overrides=["method.lora.rank=32", "method.lora.target_modules=[q_proj,v_proj]",
                                 "data.image_size=null", "training.learning_rate=1e-4"])
    assert cfg.method.lora.rank == 32
    assert cfg.method.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.image_size is None
    assert cfg.training.learning_rate == pytest.approx(1e-4)


def test_every_problem_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "lora", "lora": {"rank": 0, "dropuot": 0.1}},
                                    "training": {"batch_size": "four"}, "hardwear": {}}))
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides=["data.max_length=-5", "garbage"])
    problems = info.value.problems
    text = str(info.value)
    assert str(path) in text
    for field in ("method.lora.rank", "method.lora.dropuot", "training.batch_size", "hardwear",
                  "data.max_length", "garbage"):
        assert any(field in p for p in problems), (field, problems)
    assert len(problems) == 6


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="qlora needs hardware.precision"):
        load_config(overrides=["method.name=qlora", "hardware.precision=fp32"])
    with pytest.raises(ConfigError, match="min_pixels"):
        load_config(overrides=["data.min_pixels=1000", "data.max_pixels=10"])


def test_override_into_a_value_is_reported():
    _, problems = apply_overrides({"training": {"batch_size": 1}}, ["training.batch_size.x=3"])
    assert problems and "is a value" in problems[0]


def test_missing_and_unparsable_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)


def test_save_roundtrip(tmp_path):
    cfg = ConfigPresets.balanced(data_path="t.jsonl")
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    loaded = load_config(path)
    assert loaded.data.train_path == Path("t.jsonl").resolve()  # saved absolute: the same file from anywhere
    assert loaded.model_copy(update={"data": cfg.data}) == cfg


def test_python_api_ultra_low_memory():
    cfg = ConfigPresets.ultra_low_memory(data_path="train.jsonl", val_path="val.jsonl")
    assert cfg.method.name is TrainingMethod.QLORA
    q, lora = cfg.method.quantization, cfg.method.lora
    assert (q.quant_type, q.double_quant, q.bits) == ("nf4", True, 4)
    assert (lora.rank, lora.alpha, lora.dropout) == (8, 16, 0.05)
    assert (cfg.training.batch_size, cfg.training.gradient_accumulation_steps) == (1, 32)
    assert (cfg.data.max_length, cfg.data.image_size) == (512, 336)
    assert cfg.hardware.gradient_checkpointing and cfg.hardware.precision == "bf16"
    assert str(cfg.data.train_path) == "train.jsonl" and str(cfg.data.val_path) == "val.jsonl"
    cfg.method.lora.rank = 16  # editable, still validated
    with pytest.raises(ValueError):
        cfg.method.lora.rank = -1


def test_unknown_preset_argument():
    with pytest.raises(ConfigError, match="unknown argument"):
        ConfigPresets.balanced(datapath="x")
