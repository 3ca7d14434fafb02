import yaml

from vlmtune.cli.main import main, parse_args
from vlmtune.cli.train_cmd import resolve_config


def _cfg(argv):
    args = parse_args(["train", *argv])
    return resolve_config(args)


def test_compat_flags_map_to_fields(tmp_path):
    sft = tmp_path / "sft.yaml"
    sft.write_text(yaml.safe_dump({"experiment_name": "from-file", "training": {"learning_rate": 3e-5}}))
    cfg = _cfg(["--sft_config", str(sft), "--output_dir", str(tmp_path / "o"), "--lora_r", "12", "--lora_alpha", "24",
                "--lora_dropout", "0.1", "--target_modules", "q_proj,v_proj,o_proj", "--flash_attn", "--use-4bit",
                "--use-lora", "--batch-size", "3", "--gradient-accumulation-steps", "5", "--model", "my/model",
                "--train-data", "t.jsonl", "--val-data", "v.jsonl"])
    assert cfg.experiment_name == "from-file" and cfg.training.learning_rate == 3e-5
    assert cfg.output_dir == tmp_path / "o"
    assert (cfg.method.lora.rank, cfg.method.lora.alpha, cfg.method.lora.dropout) == (12, 24, 0.1)
    assert cfg.method.lora.target_modules == ["q_proj", "v_proj", "o_proj"]
    assert cfg.hardware.attn_implementation == "flash_attention_2"
    assert cfg.method.name.value == "qlora"  # --use-4bit wins over --use-lora
    assert (cfg.training.batch_size, cfg.training.gradient_accumulation_steps) == (3, 5)
    assert cfg.model.name_or_path == "my/model"
    assert str(cfg.data.train_path) == "t.jsonl" and str(cfg.data.val_path) == "v.jsonl"


def test_precedence_preset_file_flag_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"method": {"lora": {"rank": 4}}, "training": {"batch_size": 7}}))
    cfg = _cfg(["--preset", "balanced", str(f), "--lora_r", "5", "method.lora.alpha=11"])
    assert cfg.method.lora.target_modules == "attention"  # from the preset
    assert cfg.training.batch_size == 7  # file over preset
    assert cfg.method.lora.rank == 5  # flag over file
    assert cfg.method.lora.alpha == 11  # override


def test_use_lora_alone_and_named_target_set():
    cfg = _cfg(["--preset", "full_finetune", "--use-lora", "--target_modules", "attention"])
    assert cfg.method.name.value == "lora" and cfg.method.lora.target_modules == "attention"


def test_bad_config_exits_without_traceback(capsys):
    code = main(["train", "method.lora.rank=0", "training.nope=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "method.lora.rank" in err and "training.nope" in err and "Traceback" not in err


def test_print_config(capsys):
    assert main(["train", "--preset", "balanced", "--print-config"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["method"]["lora"]["rank"] == 32


def test_presets_cli(capsys):
    assert main(["presets", "list"]) == 0
    assert "ultra_low_memory" in capsys.readouterr().out
    assert main(["presets", "show", "ultra_low_memory"]) == 0
    out = capsys.readouterr().out
    assert "8 GB" in out and "qlora" in out
    assert main(["presets", "show", "nope"]) == 2
