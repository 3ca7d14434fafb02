"""data.image_root reaches every command that reads a data file, not only `train` and `data check`: `estimate
--data`, `recommend --data` (and the file it writes, so `train FILE --dry-run` finds the images too) and
`predict --data`. The data file sits in one folder, its images (relative paths) under another."""

from __future__ import annotations

import json
import shutil

import pytest

from vlmtune.cli.main import main

MODEL = "Qwen/Qwen2-VL-2B-Instruct"


@pytest.fixture
def split_data(shapes_data, tmp_path):
    """(data file, image root): the shapes records copied away from their images."""
    train = shapes_data[0]
    data = tmp_path / "annotations" / "train.jsonl"
    data.parent.mkdir()
    lines = train.read_text(encoding="utf-8").splitlines()[:4]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert all(not json.loads(line)["messages"][0]["content"][0]["image"].startswith("/") for line in lines)
    root = tmp_path / "image_folder"
    shutil.copytree(train.parent / "images", root / "images")
    return data, root


def test_estimate_and_recommend_read_images_under_the_root(split_data, tmp_path, capsys):
    data, root = split_data
    assert main(["estimate", "--model", MODEL, "--data", str(data)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["estimate", "--model", MODEL, "--data", str(data), "--image-root", str(root)]) == 0
    assert "4 samples" in capsys.readouterr().out

    out = tmp_path / "rec.yaml"
    assert main(["recommend", "--gpu", "RTX 4090", "--model", MODEL, "--data", str(data),
                 "--image-root", str(root), "-o", str(out)]) == 0
    capsys.readouterr()
    assert f"image_root: {root}" in out.read_text(encoding="utf-8")
    # the written file finds the images again
    assert main(["train", str(out), "--dry-run", "--gpu", "RTX 4090"]) == 0
    assert "4 samples" in capsys.readouterr().out


@pytest.mark.slow
def test_predict_reads_images_under_the_root(split_data, tiny_model_dir, tmp_path, capsys):
    data, root = split_data
    out = tmp_path / "predictions.jsonl"
    model = str(tiny_model_dir("qwen2_vl"))
    assert main(["predict", "--model", model, "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "2"]) == 2
    assert "image" in capsys.readouterr().err
    assert main(["predict", "--model", model, "--data", str(data), "--out", str(out), "--max-new-tokens", "2",
                 "--image-root", str(root)]) == 0
    assert "on 4 records" in capsys.readouterr().out
    assert len(out.read_text(encoding="utf-8").splitlines()) == 4
