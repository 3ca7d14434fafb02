"""docs/HARDWARE.md cannot go stale silently: a few rows of its computed tables are computed again here, through the
same commands (`vlmtune recommend --table`, `vlmtune estimate --sweep`), and must appear in the doc as printed
today. When this fails, run `bash scripts/hardware_tables.sh` and paste docs/hardware/*.txt into the doc (and
re-read the comparison with the guides: the numbers the text quotes may have moved too)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmtune.cli.main import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "HARDWARE.md"
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "hardware_tables.sh"
QWEN2B, QWEN7B = "Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"


def _doc_rows() -> set[tuple[str, ...]]:
    """Every line of the doc as its whitespace-separated words (column widths depend on the rows printed)."""
    return {tuple(line.split()) for line in DOC.read_text().splitlines() if line.strip()}


def _printed_rows(capsys, argv: list[str]) -> list[tuple[str, ...]]:
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    return [tuple(line.split()) for line in lines if line.strip() and not set(line.strip()) <= {"-", " "}]


@pytest.mark.parametrize(
    ("model", "gpus", "counts"),
    [(QWEN2B, "RTX 4060 Ti,H100", "2"), (QWEN7B, "RTX 4090", "4"), (QWEN7B, "RTX 4070", "2")],
    ids=["qwen2vl2b", "qwen25vl7b", "qwen25vl7b-lean"],
)
def test_hardware_table_rows_match_the_code(capsys, model, gpus, counts):
    rows = _printed_rows(
        capsys, ["recommend", "--table", "--model", model, "--gpus", gpus, "--counts", counts]
    )
    doc = _doc_rows()
    # rows[0]: the title (sequence, margin), checked below
    stale = [" ".join(r) for r in rows[1:] if r not in doc]
    assert not stale, f"docs/HARDWARE.md no longer matches `recommend --table` for {model}: {stale}"
    assert rows[0] in doc, f"the table's title changed: {' '.join(rows[0])}"
    column = 6 if model == QWEN2B else 7  # the side-by-side table with the guide: one column per model
    side = [
        [c.strip() for c in line.split("|")] for line in DOC.read_text().splitlines() if line.startswith("| ")
    ]
    for words in rows[3:]:  # title, head, rule, then one row per (GPU, count)
        r16 = words.index("r16")
        lean = words[r16 - 2] == "lean"
        method = ("lean " if lean else "") + {"lora": "LoRA", "qlora": "QLoRA"}[words[r16 - 1]]
        count = words[r16 - 3 if lean else r16 - 2]
        name = " ".join(words[: r16 - (3 if lean else 2)])
        batch, accum, ckpt, gib = words[r16 + 1], words[r16 + 2], words[r16 + 4], words[r16 + 6]
        summary = f"{method}, {batch} x {accum}, {'ckpt' if ckpt == 'on' else 'no ckpt'}, {gib}"
        cells = [c for c in side if len(c) > column and name.startswith(c[1]) and c[2] == count]
        assert cells and all(c[column].startswith(summary) for c in cells), (
            f"the comparison with the guide no longer says {summary!r} for {name} x {count} ({model})"
        )


def test_rank_sweep_rows_match_the_code(capsys):
    argv = [
        "estimate",
        "--model",
        QWEN7B,
        "--sweep",
        "method.lora.rank=16,512",
        "--sweep",
        "method.lora.target_modules=minimal,all",
        "--num-gpus",
        "8",
        "--zero-stage",
        "3",
        "--gpu",
        "H100",
    ]
    rows = _printed_rows(capsys, argv)
    doc = _doc_rows()
    stale = [" ".join(r) for r in rows if r not in doc]
    assert not stale, f"docs/HARDWARE.md no longer matches the rank sweep: {stale}"
    side = {
        c[1]: c
        for c in (
            [x.strip() for x in line.split("|")]
            for line in DOC.read_text().splitlines()
            if line.startswith("| ")
        )
    }
    # title, head, rule, then: rank, targets, trainable (2 words), allocated, reserved, nvidia-smi, ...
    for words in rows[3:]:
        rank, targets, smi = words[0], words[1], words[6]
        column = {"minimal": 5, "attention": 6, "all": 7}[targets]
        assert side[rank][column] == f"{smi} GiB", (
            f"the comparison with the guide is stale at r{rank} {targets}"
        )


def test_doc_commands_are_the_scripts():
    """The commands the doc prints above its tables are the ones scripts/hardware_tables.sh runs."""
    text, script = DOC.read_text(), SCRIPT.read_text()
    for command in (
        "recommend --table --model Qwen/Qwen2-VL-2B-Instruct",
        "recommend --table --method full --model Qwen/Qwen2-VL-2B-Instruct",
        "recommend --table --model Qwen/Qwen2.5-VL-7B-Instruct",
        "--sweep method.lora.rank=16,32,64,128,256,512",
    ):
        assert command in text and command in script, command
