"""CLI conventions (issue 20 item 4): --version, --debug/--verbose anywhere, "did you mean" for flags and config keys,
the subcommand's own usage on its argument errors, help text on every option, --gpu by memory size."""

from __future__ import annotations

import argparse

import pytest
import yaml

from vlmtune import __version__
from vlmtune.cli.main import build_parser, main, parse_args, subparsers
from vlmtune.errors import VlmtuneError


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"vlmtune {__version__}"


@pytest.mark.parametrize("argv", [["--debug", "train"], ["train", "--debug"], ["data", "check", "f.jsonl", "--debug"],
                                  ["data", "--debug", "split", "f.jsonl"], ["checkpoints", "verify", "d", "--debug"]])
def test_debug_anywhere(argv):
    assert parse_args(argv).debug is True


def test_debug_after_a_nested_action_shows_the_traceback(tmp_path):
    assert main(["checkpoints", "verify", str(tmp_path / "none")]) == 2
    with pytest.raises(VlmtuneError):
        main(["checkpoints", "verify", str(tmp_path / "none"), "--debug"])


def test_verbose_anywhere():
    assert parse_args(["train", "--verbose"]).verbose and parse_args(["--verbose", "predict"]).verbose
    assert not parse_args(["train"]).verbose


@pytest.mark.parametrize("argv,usage,hint", [
    (["train", "--lora-rank", "8"], "usage: vlmtune train", "did you mean --lora-r?"),
    (["train", "--lora_dropuot", "0.1"], "usage: vlmtune train", "did you mean --lora-dropout?"),
    (["estimate", "--gpus", "T4"], "usage: vlmtune estimate", "did you mean --gpu?"),
    (["data", "check", "f.jsonl", "--max-lenght", "9"], "usage: vlmtune data check", "did you mean --max-length?"),
    (["export", "--adapter", "a", "--out", "b", "--bsae", "m"], "usage: vlmtune export", "did you mean --base?"),
])
def test_misspelled_flag_gets_a_suggestion_and_the_subcommand_usage(argv, usage, hint, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(usage) and hint in err
    assert f"{usage.removeprefix('usage: ')}: error: unrecognized arguments" in err


def test_missing_argument_prints_the_subcommand_usage(capsys):
    with pytest.raises(SystemExit):
        parse_args(["data", "split"])
    assert capsys.readouterr().err.startswith("usage: vlmtune data split")


def test_misspelled_config_keys_get_suggestions(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"training": {"batch_sise": 2}, "method": {"lora": {"rnak": 4}}}))
    assert main(["train", str(config), "training.lerning_rate=1e-4", "training.rank=3", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "training.batch_sise: unknown field; did you mean training.batch_size?" in err  # YAML keys
    assert "method.lora.rnak: unknown field; did you mean method.lora.rank?" in err
    assert "training.lerning_rate: unknown field; did you mean training.learning_rate?" in err  # overrides
    assert "training.rank: unknown field; did you mean method.lora.rank?" in err  # the field of another section


def test_every_option_of_every_command_has_help():
    internal = {"local_rank"}  # passed by the DeepSpeed launcher, hidden on purpose
    missing = []
    parser = build_parser()
    for p in [parser, *subparsers(parser)]:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction) or action.dest in internal:
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{p.prog} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing
    assert len(subparsers(parser)) >= 14  # nested actions (data check/split/convert, checkpoints verify) walked


def test_gpu_by_memory_size(tiny_model_dir, capsys):
    assert main(["estimate", "--model", str(tiny_model_dir("qwen2_vl")), "--gpu", "24GB"]) == 0
    assert "FITS on 24GB GPU (23.6 GiB usable)" in capsys.readouterr().out
