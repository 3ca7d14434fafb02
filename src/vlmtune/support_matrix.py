"""The support matrix: every registered family x (LoRA, QLoRA, full, packing, compile, ZeRO-3, estimator), read from
the families' capability maps and the estimator's catalogue, so `vlmtune families`, the README's table and the code
cannot disagree (tests/families/test_support.py compares the README with `markdown()`). It sits above families/ and memory/, reading both..

What backs each column (the tests run every registered family, so a new family is covered when it registers):
- LoRA / QLoRA / full: tests/train/test_engine_matrix.py (loss falls, the saved result reloads with identical outputs)
- packing: tests/speed/test_packing.py (packed loss equals unpacked) or the family's reason for refusing it
- compile: tests/speed/test_compile_families.py (compiled decoder layers give the eager loss and gradients)
- ZeRO-3: tests/train/test_deepspeed_runs.py::test_zero3_lora_every_family (two CPU processes, the adapter reloads)
- estimator: the catalogue knows the family's architecture; tests/memory/test_params.py builds each catalogue model
  on the meta device and compares its parameter count
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmtune.families.capabilities import Experimental, Unsupported

COLUMNS = ("lora", "qlora", "full", "packing", "compile", "zero3", "estimator")
TITLES = {"lora": "LoRA", "qlora": "QLoRA", "full": "full", "packing": "packing", "compile": "compile",
          "zero3": "ZeRO-3", "estimator": "estimator"}


@dataclass(frozen=True)
class Cell:
    status: str
    """"yes", "experimental" or "no"."""
    note: str = ""
    """The reason (no) or the caveat (experimental)."""


def _capability_cell(family, key: str) -> Cell:
    cap = family.capabilities.get(key)
    if isinstance(cap, Unsupported):
        return Cell("no", cap.reason)
    if isinstance(cap, Experimental):
        return Cell("experimental", cap.note)
    return Cell("yes")


def _estimator_cell(family) -> Cell:
    from vlmtune.errors import VlmtuneError
    from vlmtune.memory.catalogue import lookup_model

    try:
        spec = lookup_model(family.default_model)
    except VlmtuneError:
        return Cell("no", f"the estimator's catalogue does not know {family.default_model}")
    if spec.analytic is not None:
        return Cell("experimental", f"{family.default_model} is counted analytically from its published config, "
                                    "not from a model build")
    return Cell("yes")


def row(family) -> dict[str, Cell]:
    cells = {key: _capability_cell(family, key) for key in ("lora", "qlora", "full", "packing")}
    # compile has no capability entry: every family is run through it by the test named above; ZeRO-3 is "yes" unless
    # the family's map says otherwise (Mllama: every micro-batch needs an image)
    cells["compile"] = Cell("yes")
    cells["zero3"] = _capability_cell(family, "zero3")
    cells["estimator"] = _estimator_cell(family)
    return cells


def matrix() -> dict[str, dict[str, Cell]]:
    from vlmtune.families import all_families

    return {family.name: row(family) for family in all_families()}


def markdown() -> str:
    """The table with numbered notes under it (one note per distinct reason)."""
    notes: list[str] = []
    lines = ["| family | " + " | ".join(TITLES[c] for c in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, cells in matrix().items():
        shown = []
        for column in COLUMNS:
            cell = cells[column]
            if cell.note:
                if cell.note not in notes:
                    notes.append(cell.note)
                shown.append(f"{cell.status} ({notes.index(cell.note) + 1})")
            else:
                shown.append(cell.status)
        lines.append(f"| `{name}` | " + " | ".join(shown) + " |")
    lines.append("")
    lines += [f"{i}. {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def trains(model_type: str) -> bool:
    """Whether a family trains models of this model_type (the catalogue's own name for an architecture counts too:
    its `qwen_vl` is the checkpoints' `qwen`)."""
    from vlmtune.errors import VlmtuneError
    from vlmtune.families import all_families, get_family

    if any(model_type in f.model_types for f in all_families()):
        return True
    try:
        get_family(model_type)
        return True
    except VlmtuneError:
        return False


def untrainable_note(model_type: str, model: str) -> str | None:
    """What `estimate` / `recommend` say about a model they can size but `vlmtune train` cannot train."""
    if trains(model_type):
        return None
    return (f"vlmtune can size {model} ({model_type}) but cannot train it yet: no family handles {model_type} "
            "(`vlmtune families` lists those it trains)")

