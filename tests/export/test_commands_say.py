"""Each command does what it says (issue 20 item 3): predict finds the base in the adapter, --out is a folder unless
it names a .jsonl file, an adapter on another family's base is refused naming both, recommend --plot draws."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmtune.cli.main import main


@pytest.fixture(scope="module")
def adapter(train_tiny):
    return train_tiny("lora")


def test_predict_reads_the_base_from_the_adapter(adapter, red_data, tmp_path, capsys):
    assert main(["predict", "--adapter", str(adapter), "--data", str(red_data), "--out", str(tmp_path / "preds")]) == 0
    out = tmp_path / "preds" / "predictions.jsonl"  # a name without .jsonl is a folder, as for export and split
    assert out.is_file() and f"predictions in {out}" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 8
    assert main(["predict", "--adapter", str(adapter), "--data", str(red_data), "--out", str(tmp_path / "p.jsonl")]) == 0
    assert (tmp_path / "p.jsonl").is_file() and json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])


def test_predict_needs_an_adapter_or_a_model(capsys):
    assert main(["predict", "--prompt", "what colour?"]) == 2
    assert "--adapter DIR (its base model is read from the adapter) or --model DIR" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["predict", "export"])
def test_adapter_on_another_familys_base_is_refused(command, adapter, tiny_model_dir, tmp_path, capsys):
    other = tiny_model_dir("llava")
    if command == "predict":
        argv = ["predict", "--adapter", str(adapter), "--model", str(other), "--prompt", "what colour?"]
    else:
        argv = ["export", "--adapter", str(adapter), "--base", str(other), "--out", str(tmp_path / "merged")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"the adapter {adapter} was trained on a qwen2_vl model" in err
    assert f"the base model {other} is a llava model" in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()


def test_recommend_plot_writes_the_picture(tmp_path, capsys):
    picture = tmp_path / "fit.png"
    assert main(["recommend", "--model", "Qwen/Qwen2-VL-2B-Instruct", "--gpu", "RTX 3070", "--plot", str(picture),
                 "--output", str(tmp_path / "rec.yaml")]) == 0
    assert f"picture: {picture}" in capsys.readouterr().out
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.size[0] > 400
    assert main(["recommend", "--table", "--model", "Qwen/Qwen2-VL-2B-Instruct", "--plot", str(picture)]) == 2
    assert "drop it with --table" in capsys.readouterr().err
