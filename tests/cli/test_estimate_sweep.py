"""`vlmtune estimate --sweep FIELD=V1,V2 ...`: one estimate per combination, each equal to its own estimate."""

from __future__ import annotations

import json

from vlmtune.cli.main import main

MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"


def _single(capsys, *argv):
    assert main(["estimate", "--model", MODEL, "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_sweep_rows_equal_single_estimates(capsys):
    argv = ["--num-gpus", "8", "--zero-stage", "3"]
    assert main(["estimate", "--model", MODEL, *argv, "--json", "--sweep", "method.lora.rank=16,256",
                 "--sweep", "method.lora.target_modules=minimal,all"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["settings"] for r in rows] == [
        {"method.lora.rank": "16", "method.lora.target_modules": "minimal"},
        {"method.lora.rank": "16", "method.lora.target_modules": "all"},
        {"method.lora.rank": "256", "method.lora.target_modules": "minimal"},
        {"method.lora.rank": "256", "method.lora.target_modules": "all"},
    ]
    for row in rows:
        s = row["settings"]
        one = _single(capsys, *argv, f"method.lora.rank={s['method.lora.rank']}",
                      f"method.lora.target_modules={s['method.lora.target_modules']}")
        assert row["peak_total"] == one["peak_total"] and row["trainable_params"] == one["trainable_params"]
    assert rows[3]["peak_total"] > rows[0]["peak_total"]  # more adapters, more memory


def test_sweep_table(capsys):
    assert main(["estimate", "--model", MODEL, "--gpu", "RTX 4090", "--sweep", "method.name=lora,qlora"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:2] == ["method.name", "trainable"] and "verdict" in out[1]
    lora, qlora = out[3].split(), out[4].split()
    assert lora[0] == "lora" and qlora[0] == "qlora" and float(qlora[5]) < float(lora[5])


def test_sweep_mistakes_name_the_item(capsys):
    assert main(["estimate", "--sweep", "method.lora.rank"]) == 2
    assert "--sweep 'method.lora.rank': write FIELD=V1,V2" in capsys.readouterr().err
    assert main(["estimate", "--sweep", "method.lora.rank=8", "--sweep", "method.lora.rank=16"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["estimate", "--sweep", "method.lora.rank=8,x"]) == 2
    assert "method.lora.rank" in capsys.readouterr().err
    assert main(["estimate", "--sweep", "method.lora.rnak=8"]) == 2
    assert "method.lora.rnak: unknown field" in capsys.readouterr().err


def test_sweep_picture(tmp_path, capsys):
    from PIL import Image

    from vlmtune.memory.picture import STATUS_COLOUR

    out = tmp_path / "sweep.png"
    assert main(["estimate", "--model", MODEL, "--gpu", "RTX 4090", "--sweep", "method.name=lora,qlora",
                 "--sweep", "method.lora.rank=16,256", "--plot", str(out)]) == 0
    assert f"picture: {out}" in capsys.readouterr().out
    image = Image.open(out).convert("RGB")
    colours = {image.getpixel((x, y)) for x in range(0, image.width, 2) for y in range(0, image.height, 2)}
    assert STATUS_COLOUR["does not fit"] in colours  # LoRA r256 (30 GiB) is over the 4090: its label and the line
    two = tmp_path / "two.png"
    assert main(["estimate", "--model", MODEL, "--sweep", "method.name=lora,qlora", "--plot", str(two)]) == 0
    assert Image.open(two).height < image.height  # one bar per combination
