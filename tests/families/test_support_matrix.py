"""The support matrix: the README's copy is `vlmtune families --markdown`, every registered family has a row, and each
"no" is what the family's check refuses a config for, with the same reason."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vlmtune.cli.main import main
from vlmtune.config.schema import VlmtuneConfig
from vlmtune.families import all_families
from vlmtune.support_matrix import COLUMNS, markdown, matrix

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_shows_the_matrix_the_code_gives():
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- support-matrix:start -->\n(.*?)<!-- support-matrix:end -->", text, re.S)
    assert found, "README.md lost its support-matrix markers"
    assert found.group(1) == markdown(), "README's support matrix is stale: paste `vlmtune families --markdown`"


def test_every_family_has_a_row_with_every_column():
    rows = matrix()
    assert list(rows) == [f.name for f in all_families()]
    for cells in rows.values():
        assert tuple(cells) == COLUMNS
        assert all(c.status in ("yes", "no", "experimental") for c in cells.values())
        assert all(c.note for c in cells.values() if c.status != "yes")


_ASKS = {
    "lora": {"method": {"name": "lora"}},
    "qlora": {"method": {"name": "qlora"}},
    "full": {"method": {"name": "full"}},
    "packing": {"speed": {"packing": True}},
}


@pytest.mark.parametrize("family", all_families(), ids=lambda f: f.name)
def test_a_no_is_refused_with_its_reason_and_a_yes_is_not(family):
    cells = matrix()[family.name]
    for column, asks in _ASKS.items():
        problems = family.check(VlmtuneConfig.model_validate(asks))
        if cells[column].status == "no":
            assert any(cells[column].note in p for p in problems), (column, problems)
        else:
            assert not problems, (column, problems)


def test_cli_prints_the_table(capsys):
    assert main(["families", "--markdown"]) == 0
    assert capsys.readouterr().out == markdown()
    assert main(["families"]) == 0
    out = capsys.readouterr().out
    for family in all_families():
        assert family.name in out and family.default_model in out


def test_models_the_estimator_knows_but_no_family_trains_are_said_so(capsys, tmp_path):
    """`estimate` / `recommend` size a model `train` would refuse only with a word about it, and recommend writes no
    config for it."""
    from vlmtune.memory.catalogue import catalogue_names, lookup_model
    from vlmtune.support_matrix import trains

    untrained = [n for n in catalogue_names() if not trains(lookup_model(n).model_type)]
    assert all(trains(lookup_model(n).model_type) for n in ("Qwen/Qwen-VL-Chat", "Qwen/Qwen2-VL-2B-Instruct"))
    for name in untrained[:1]:  # SmolVLM v1 (idefics3) today
        assert main(["estimate", "--model", name]) == 0
        assert "cannot train it yet" in capsys.readouterr().out
        out = tmp_path / "rec.yaml"
        assert main(["recommend", "--gpu", "RTX 4090", "--model", name, "-o", str(out)]) == 2
        assert "cannot train it yet" in capsys.readouterr().err and not out.exists()
