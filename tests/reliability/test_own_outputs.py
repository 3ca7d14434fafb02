"""What vlmtune replaces of its own outputs keeps what others added: a new `final/` keeps the old one when it holds
predictions or notes; the demo writes only into a new, empty or earlier demo folder."""

from __future__ import annotations

import pytest

from vlmtune.cli.main import main
from vlmtune.train.saving import _retire


def _final(folder, *names):
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_text(name)
    return folder


@pytest.mark.reliability("overwrite")
def test_a_new_final_keeps_an_old_one_that_holds_other_files(tmp_path):
    final = _final(tmp_path / "final", "adapter_model.safetensors", "vlmtune.json", "predictions.jsonl")
    _retire(final, {"adapter_model.safetensors", "adapter_config.json", "vlmtune.json"})
    kept = tmp_path / "final.previous-1"
    assert not final.exists() and (kept / "predictions.jsonl").read_text() == "predictions.jsonl"

    final = _final(tmp_path / "final", "adapter_model.safetensors", "vlmtune.json")  # only training's files
    _retire(final, {"adapter_model.safetensors", "vlmtune.json"})
    assert not final.exists() and not (tmp_path / "final.previous-2").exists()


@pytest.mark.reliability("overwrite")
def test_the_demo_refuses_a_user_folder(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "already holds files vlmtune did not write (notes.txt)" in err and "Traceback" not in err
    assert notes.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
