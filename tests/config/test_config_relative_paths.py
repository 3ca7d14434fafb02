"""Data paths in a config file are relative to the file (as image paths are relative to their data file), whatever
the working directory; a path that exists only from the working directory (the old rule) still works, with a
warning; flags and dotted overrides stay relative to the working directory."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from vlmtune.config.loader import load_config


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"data": data}), encoding="utf-8")
    return path


def test_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "project" / "data").mkdir(parents=True)
    (tmp_path / "project" / "data" / "train.jsonl").write_text("")
    config = _write(tmp_path / "project" / "configs" / "run.yaml",
                    {"train_path": "../data/train.jsonl", "val_path": "../data/val.jsonl", "image_root": "../images",
                     "max_length": 512})
    monkeypatch.chdir(tmp_path)  # somewhere else entirely
    cfg = load_config(config)
    folder = (tmp_path / "project" / "configs").resolve()
    assert cfg.data.train_path == folder / "../data/train.jsonl"
    assert cfg.data.train_path.resolve() == (tmp_path / "project" / "data" / "train.jsonl").resolve()
    assert cfg.data.val_path == folder / "../data/val.jsonl"  # not there yet: still the config's folder
    assert cfg.data.image_root == folder / "../images"


def test_a_path_only_the_working_directory_has_is_kept_with_a_warning(tmp_path, monkeypatch, caplog):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")
    config = _write(tmp_path / "configs" / "run.yaml", {"train_path": "data/train.jsonl"})
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        cfg = load_config(config)
    assert cfg.data.train_path == Path("data/train.jsonl")
    assert "relative to the file's folder" in caplog.text and "data.train_path" in caplog.text


def test_overrides_hub_sets_and_dataset_info_names(tmp_path, monkeypatch):
    config = _write(tmp_path / "configs" / "run.yaml",
                    {"train_path": "dataset_info.json#mllm_demo", "val_path": "hf://datasets/org/name#test"})
    monkeypatch.chdir(tmp_path)
    cfg = load_config(config)
    assert str(cfg.data.train_path) == str((tmp_path / "configs").resolve() / "dataset_info.json") + "#mllm_demo"
    assert str(cfg.data.val_path).startswith("hf:")
    cfg = load_config(config, overrides=["data.train_path=mine.jsonl"])
    assert cfg.data.train_path == Path("mine.jsonl")  # the command line's own, relative to the working directory


def test_recommend_writes_paths_the_file_reads_back(shapes_data, tmp_path, monkeypatch, capsys):
    """`recommend --data data/train.jsonl -o configs/rec.yaml` from the project folder: the file says
    ../data/train.jsonl, and its dry run from another folder sizes the same data."""
    import shutil

    from vlmtune.cli.main import main

    project = tmp_path / "project"
    shutil.copytree(shapes_data[0].parent, project / "data")
    (project / "configs").mkdir()
    monkeypatch.chdir(project)
    assert main(["recommend", "--gpu", "RTX 4090", "--model", "Qwen/Qwen2-VL-2B-Instruct", "--data",
                 "data/train.jsonl", "-o", "configs/rec.yaml"]) == 0
    written = yaml.safe_load((project / "configs" / "rec.yaml").read_text(encoding="utf-8"))
    assert written["data"]["train_path"] == "../data/train.jsonl"
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "project/configs/rec.yaml", "--dry-run", "--gpu", "RTX 4090"]) == 0
    assert "16 samples" in capsys.readouterr().out
