"""benchmarks/speed/check.py on tiny models of the families whose GPU check failed or that pack their own way: the
image size settings each family takes (Gemma 3's fixed resolution, SmolVLM's longest edge), its packed-row
mechanism (Gemma 3's own masks, Qwen3.5's per-span DeltaNet layers), and the switches it does not have skipped
with the reason. fp32 on the CPU, without compiling (check.py --smoke)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.speed import check


def _by_name(lines: list[dict]) -> dict[str, dict]:
    return {line["name"]: line for line in lines}


@pytest.mark.parametrize("family", ["qwen3_vl", "gemma3", "smolvlm", "qwen3_5"])
def test_check_passes_on_the_family(tiny_model_dir, tmp_path, family):
    lines = check.run(tiny_model_dir(family), tmp_path, "fp32", family, smoke=True)
    failed = [line for line in lines if line["ok"] is False]
    assert not failed, failed
    compared = [line for line in lines if line["ok"]]
    assert len(compared) >= 7
    names = _by_name(lines)
    packing = [line for name, line in names.items() if name.startswith("packing")]
    assert any(line["ok"] for line in packing)  # every one of these families packs
    assert names["mlp_chunk_tokens=64 (GC on: the checkpointed layers' MLP in chunks in backward)"]["ok"]
    mrope = names["positions_in_collator (M-RoPE ids from the collator)"]
    assert (mrope["ok"] is None) == (family in ("gemma3", "smolvlm"))
    if family == "gemma3":
        assert any("family_mask" in name and line["ok"] for name, line in names.items())
        assert "builds its packed rows' masks itself" in names["packing, packed_attention=spans"]["skipped"]
    if family == "qwen3_5":
        assert any("linear_attn per sample span" in name and line["ok"] for name, line in names.items())


@pytest.mark.slow
def test_check_catches_packed_rows_without_the_per_span_layers(tiny_model_dir, tmp_path, monkeypatch):
    """Qwen3.5's packed rows with its DeltaNet layers run over the whole row (each sample starting from the state of
    the one before) fail the check."""
    from vlmtune.speed import span_layers

    class Nothing:
        layers: list[str] = []

        def remove(self) -> None:
            pass

    monkeypatch.setattr(span_layers, "span_layers", lambda model, leaves, prefixes: Nothing())
    lines = _by_name(check.run(tiny_model_dir("qwen3_5"), tmp_path, "fp32", "qwen3_5", smoke=True))
    packed = next(line for name, line in lines.items() if "per sample span" in name)
    assert packed["ok"] is False, packed


def test_main_creates_its_out_folder(tmp_path, monkeypatch):
    """--out that does not exist yet is created (it crashed on the GPU); --smoke takes the family's tiny model, fp32."""
    import json

    from benchmarks.speed import bench

    monkeypatch.setattr(bench, "ROOT", tmp_path / "root")
    calls = []

    def run(model_dir, root, precision, family, smoke, layers):
        calls.append((model_dir.name, precision, smoke, layers))
        return [{"name": "noise floor", "precision": precision, "ok": True}]

    monkeypatch.setattr(check, "run", run)
    out = tmp_path / "new" / "folder"
    lines = check.main(out, "smolvlm", smoke=True)
    assert calls == [("smolvlm-tiny", "fp32", True, None)]
    assert [json.loads(x) for x in (out / "check.jsonl").read_text().splitlines()] == lines
    assert lines[0]["arch"] == "tiny" and lines[0]["family"] == "smolvlm"


def test_layers_keeps_the_first_decoder_layers_in_their_pattern(tiny_model_dir):
    """--layers N: the architecture's widths with only its first N decoder layers, their kinds as in the config (a
    9B Qwen3.5 check that fits one device call)."""
    model = check._model(tiny_model_dir("qwen3_5"), torch.float32, "qwen3_5", layers=1)
    text = model.config.get_text_config()
    assert text.num_hidden_layers == 1 and text.layer_types == ["linear_attention"]
    assert len(model.base_model.model.model.language_model.layers) == 1
