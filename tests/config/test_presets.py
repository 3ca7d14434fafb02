import pytest

from vlmtune.config import TrainingMethod, list_presets, load_preset
from vlmtune.config.presets import preset_header
from vlmtune.errors import ConfigError

EXPECTED = {"ultra_low_memory", "consumer_16gb", "consumer_24gb", "balanced", "high_capacity", "full_finetune"}


def test_all_expected_presets_exist():
    assert EXPECTED <= set(list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_preset_validates_and_has_header(name):
    cfg = load_preset(name)
    header = preset_header(name)
    assert "Targets:" in header and "Launch: vlmtune train --preset" in header
    assert cfg.experiment_name


def test_preset_contents():
    b = load_preset("balanced").method.lora
    assert (b.rank, b.alpha, b.target_modules) == (32, 64, "attention")
    h = load_preset("high_capacity").method.lora
    assert (h.rank, h.alpha, h.target_modules) == (64, 128, "all")
    assert load_preset("full_finetune").method.name is TrainingMethod.FULL


def test_unknown_preset():
    with pytest.raises(ConfigError, match="available: .*balanced"):
        load_preset("nope")
