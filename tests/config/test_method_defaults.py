"""Method-aware defaults: unset fields take their method's value, set ones (preset, file, flag, override) stay."""

import pytest
import yaml

from vlmtune.cli.main import main, parse_args
from vlmtune.cli.train_cmd import resolve_config
from vlmtune.config.loader import config_from_dict, load_config, save_config
from vlmtune.config.method_defaults import LEAN_DEFAULTS, derived_fields
from vlmtune.config.presets import load_preset


def _cfg(argv):
    return resolve_config(parse_args(["train", *argv]))


@pytest.mark.parametrize(("method", "lr"), [("lora", 2e-4), ("qlora", 2e-4), ("full", 1e-5)])
def test_learning_rate_defaults_per_method(method, lr):
    cfg = load_config(overrides=[f"method.name={method}"])
    assert cfg.training.learning_rate == lr
    assert derived_fields(cfg) == {"training.learning_rate": f"method default ({method})"}


def test_set_values_are_kept_whatever_the_method(tmp_path):
    assert load_config(overrides=["method.name=full", "training.learning_rate=3e-5"]).training.learning_rate == 3e-5
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"method": {"name": "full"}, "training": {"learning_rate": 2e-4}}))
    cfg = load_config(f)
    assert cfg.training.learning_rate == 2e-4 and "training.learning_rate" not in derived_fields(cfg)
    # a preset that sets the rate keeps it under another method (the preset's choice, not a default)
    assert _cfg(["--preset", "consumer_24gb", "method.name=full"]).training.learning_rate == 2e-4
    assert _cfg(["--preset", "full_finetune"]).training.learning_rate == 1e-5
    # --use-4bit over the full preset: the preset's 1e-5 stays (it was set)
    assert _cfg(["--preset", "full_finetune", "--use-4bit"]).training.learning_rate == 1e-5
    assert _cfg(["--lr", "5e-5", "method.name=full"]).training.learning_rate == 5e-5


def test_saved_config_reloads_the_same_values(tmp_path):
    cfg = load_config(overrides=["method.name=full"])
    again = load_config(save_config(cfg, tmp_path / "c.yaml"))
    assert again.training.learning_rate == 1e-5 == cfg.training.learning_rate


def test_print_config_marks_method_defaults(capsys):
    assert main(["train", "method.name=full", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "learning_rate: 1.0e-05  # method default (full)" in out
    assert yaml.safe_load(out)["training"]["learning_rate"] == 1e-5  # still YAML a config file can be
    assert main(["train", "method.name=full", "--lr", "3e-5", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "learning_rate: 3.0e-05\n" in out and "# method default" not in out


def test_lean_qlora_fills_its_fields_unless_set():
    cfg = load_config(overrides=["method.name=qlora", "method.quantization.lean=true", "speed.loss_chunk_tokens=512"])
    q = cfg.method.quantization
    assert (q.quantize_vision_tower, q.quantize_lm_head) == (True, True)
    assert cfg.training.optimizer == "paged_adamw_8bit" and cfg.speed.embeddings_on_cpu
    assert cfg.speed.loss_chunk_tokens == 512  # set: kept
    derived = derived_fields(cfg)
    assert set(derived) == (set(LEAN_DEFAULTS) - {"speed.loss_chunk_tokens"}) | {"training.learning_rate"}
    plain = load_config(overrides=["method.name=qlora"])
    assert not plain.method.quantization.quantize_vision_tower and plain.training.optimizer == "adamw_torch"


def test_lean_applies_to_qlora_only():
    """Like the rest of the quantization section, lora and full ignore lean (a lean preset under --use-lora)."""
    cfg = config_from_dict({"method": {"name": "lora", "quantization": {"lean": True}}})
    assert cfg.training.optimizer == "adamw_torch" and not cfg.speed.embeddings_on_cpu
    assert derived_fields(cfg) == {"training.learning_rate": "method default (lora)"}
    cfg = _cfg(["--preset", "ultra_low_memory", "--use-lora"])
    assert cfg.method.name.value == "lora" and not cfg.method.quantization.quantize_vision_tower


def test_ultra_low_memory_is_lean_and_estimated_so():
    from vlmtune.memory import estimate, inputs_from_config

    cfg = load_preset("ultra_low_memory", model={"name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"})
    assert cfg.method.quantization.lean and cfg.training.optimizer == "paged_adamw_8bit"
    lean = inputs_from_config(cfg)
    assert (lean.quantize_vision_tower, lean.quantize_lm_head, lean.embeddings_on_cpu) == (True, True, True)
    assert lean.optimizer == "paged_adamw_8bit" and lean.loss_chunk_tokens == 256
    plain = inputs_from_config(load_preset("ultra_low_memory", model={"name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"},
                                           method={"quantization": {"lean": False}}))
    b_lean, b_plain = estimate(lean), estimate(plain)
    # the 1.02 GiB embedding table leaves the GPU (it is counted in CPU RAM), the 4-bit vision tower and lm_head shrink
    assert b_lean.weights["embeddings"] == 0 and b_plain.weights["embeddings"] > 2**30
    assert b_lean.cpu_ram >= 2**30
    assert b_lean.peak_total < 7.5 * 2**30 < b_plain.peak_total


def test_presets_keep_their_values():
    for name in ("ultra_low_memory", "consumer_16gb", "full_finetune"):
        cfg = load_preset(name)
        assert "training.learning_rate" not in derived_fields(cfg), name
