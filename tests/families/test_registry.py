"""The family registry: lookup by name, detection from a model folder or the hub cache, and its error messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vlmtune.errors import VlmtuneError
from vlmtune.families import all_families, family_for_model, get_family

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "instructblip", "gemma3", "smolvlm", "qwen3_5", "internvl", "qwen_vl", "mllama", "qwen3_vl_moe"]
SRC = Path(__file__).resolve().parents[2] / "src" / "vlmtune"


def test_registry_lists_every_family():
    assert [f.name for f in all_families()] == FAMILIES
    for name in FAMILIES:
        assert get_family(name).name == name


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(VlmtuneError, match="known families: qwen2_vl, qwen2_5_vl, qwen3_vl, llava, instructblip, gemma3, smolvlm, qwen3_5, internvl, qwen_vl, mllama, qwen3_vl_moe"):
        get_family("qwen9_vl")


@pytest.mark.parametrize("name", FAMILIES)
def test_family_detected_from_tiny_model_folder(tiny_model_dir, name):
    assert family_for_model(tiny_model_dir(name)).name == name
    assert family_for_model(str(tiny_model_dir(name))).name == name


def test_missing_folder_and_folder_without_config(tmp_path):
    with pytest.raises(VlmtuneError, match="not a folder on this machine"):
        family_for_model(tmp_path / "nope" / "deeper")
    with pytest.raises(VlmtuneError, match="has no config.json"):
        family_for_model(tmp_path)


def test_unsupported_model_type_says_what_is_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    with pytest.raises(VlmtuneError) as err:
        family_for_model(tmp_path)
    assert "model_type 'idefics3'" in str(err.value)
    assert "qwen2_vl (qwen2_vl)" in str(err.value) and "llava (llava)" in str(err.value)
    assert "instructblip (instructblip)" in str(err.value)


def _fake_hub_cache(root: Path, repo: str, config: dict) -> None:
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    snapshot = folder / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))


def test_hub_id_read_from_cache_or_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _fake_hub_cache(tmp_path, "someone/cached-vl", {"model_type": "qwen2_5_vl"})
    assert family_for_model("someone/cached-vl").name == "qwen2_5_vl"
    with pytest.raises(VlmtuneError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE=1") as err:
        family_for_model("Qwen/Qwen2-VL-2B-Instruct")
    assert "hf download Qwen/Qwen2-VL-2B-Instruct" in str(err.value)  # online: tests/cli/test_hub_models.py


def test_no_family_name_in_the_generic_family_and_data_code():
    """Generic code reads descriptor attributes; family names live only in families/<family>.py."""
    generic = ["families/__init__.py", "families/base.py", "families/capabilities.py", "families/tiny.py",
               "data/processing.py", "data/collate.py"]
    pattern = re.compile(r"qwen|llava|vicuna|clip|blip", re.IGNORECASE)
    for rel in generic:
        text = re.sub(r"from vlmtune\.families import \([^)]*\)", "", (SRC / rel).read_text())  # the registry's
        hits = [line for line in text.splitlines()
                if pattern.search(line) and not line.startswith("from vlmtune.families import ")
                and "DESCRIPTOR" not in line]
        assert not hits, f"{rel} names a family: {hits}"
