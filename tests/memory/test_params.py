"""Exact parameter counts from meta-device builds of the built-in catalogue (no weights, no network)."""

from __future__ import annotations

import json

import pytest

from vlmtune.errors import VlmtuneError
from vlmtune.memory.catalogue import catalogue_names, hf_config, lookup_model
from vlmtune.memory.params import count_params, lora_params

# memory_anchors.md §1.3 (verified on transformers 5.17): total and split per part.
ANCHOR_PARTS = {
    "Qwen/Qwen2-VL-2B-Instruct": (631183360, 34087936, 233373696, 0),
    "Qwen/Qwen2-VL-7B-Instruct": (631183360, 44575744, 544997376, 544997376),
    "Qwen/Qwen2.5-VL-3B-Instruct": (631975680, 36708608, 311164928, 0),
    "Qwen/Qwen2.5-VL-7B-Instruct": (631975680, 44574464, 544997376, 544997376),
    "Qwen/Qwen3-VL-2B-Instruct": (306242560, 100714496, 311164928, 0),
    "Qwen/Qwen3-VL-4B-Instruct": (306242560, 109105152, 388956160, 0),
    "llava-hf/llava-1.5-7b-hf": (303507456, 20979712, 131334144, 131334144),
    "Salesforce/instructblip-vicuna-7b": (985952256, 188834560, 131334144, 131334144),
    "HuggingFaceTB/SmolVLM-256M-Instruct": (86433024, 7077888, 28385280, 28385280),
    "HuggingFaceTB/SmolVLM-Instruct": (412987248, 21233664, 100669440, 100669440),
}

# LoRA r16 on all seven LLM linears: trainable parameters PEFT reported in the H100 anchor runs.
ANCHOR_LORA = {
    "Qwen/Qwen2-VL-2B-Instruct": 18464768,
    "Qwen/Qwen2-VL-7B-Instruct": 40370176,
    "Qwen/Qwen2.5-VL-3B-Instruct": 29933568,
    "Qwen/Qwen3-VL-2B-Instruct": 17432576,
    "Qwen/Qwen3-VL-4B-Instruct": 33030144,
    "llava-hf/llava-1.5-7b-hf": 39976960,
    "HuggingFaceTB/SmolVLM-Instruct": 18087936,
}

REQUIRED = [
    "Qwen2-VL-2B",
    "Qwen2-VL-7B",
    "Qwen2-VL-72B",
    "Qwen2.5-VL-3B",
    "Qwen2.5-VL-7B",
    "Qwen2.5-VL-32B",
    "Qwen2.5-VL-72B",
    "llava-1.5-7b",
    "llava-1.5-13b",
    "instructblip-vicuna-7b",
    "Qwen-VL-Chat",
    "Qwen3-VL-2B",
    "Qwen3-VL-4B",
    "Qwen3-VL-8B",
    "Qwen3-VL-32B",
    "SmolVLM-256M",
    "SmolVLM-500M",
    "SmolVLM-Instruct",
]


def test_catalogue_has_the_models_users_start_from():
    names = " ".join(catalogue_names())
    assert [r for r in REQUIRED if r not in names] == []


@pytest.mark.parametrize("name", catalogue_names())
def test_meta_build_matches_the_catalogue_count(name):
    spec = lookup_model(name)
    counts = count_params(spec)
    assert counts.total == spec.params
    if spec.analytic is None:
        import torch
        from transformers import AutoModelForImageTextToText

        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(hf_config(spec))
        assert counts.total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(ANCHOR_PARTS))
def test_split_by_part_matches_the_anchors(name):
    parts = count_params(lookup_model(name)).parts
    assert (parts["vision"], parts["projector"], parts["embeddings"], parts["lm_head"]) == ANCHOR_PARTS[name]


@pytest.mark.parametrize("name", sorted(ANCHOR_LORA))
def test_lora_parameters_match_peft(name):
    spec = lookup_model(name)
    assert lora_params(count_params(spec), spec.arch.lora_targets["all"], 16) == ANCHOR_LORA[name]


def test_vision_lora_parameters_match_peft():
    spec = lookup_model("Qwen/Qwen2-VL-2B-Instruct")
    counts = count_params(spec)
    assert lora_params(counts, spec.arch.lora_targets["all"], 16, spec.arch.vision_lora_targets) == 28950528


def test_tied_embeddings_are_counted_once():
    counts = count_params(lookup_model("Qwen/Qwen2-VL-2B-Instruct"))
    assert counts.tied and counts.parts["lm_head"] == 0 and counts.linear_weights["lm_head"] == 0


def test_qwen_vl_is_built_by_the_port_and_matches_the_published_counts():
    """Qwen-VL-Chat is remote code on the Hub; the estimator builds vlmtune's port (families/qwen_vl_model) on the
    meta device: the counts the catalogue had from the published config, total and per part."""
    counts = count_params(lookup_model("Qwen/Qwen-VL"))
    assert counts.source.startswith("meta-device build")
    assert counts.parts == {"vision": 1842770688, "projector": 92839936, "embeddings": 622329856,
                            "language": 6476664832, "lm_head": 622329856}
    assert (counts.dims.hidden, counts.dims.intermediate, counts.dims.vision_depth) == (4096, 11008, 48)


def test_lookup_is_forgiving_about_case_and_organisation():
    assert lookup_model("qwen2-vl-7b-instruct").name == "Qwen/Qwen2-VL-7B-Instruct"
    assert lookup_model("HuggingFaceTB/SmolVLM-2B-Instruct").name == "HuggingFaceTB/SmolVLM-Instruct"


def test_unknown_model_lists_what_is_accepted():
    with pytest.raises(VlmtuneError, match="unknown model 'acme/vlm-9b'.*Qwen/Qwen2.5-VL-7B-Instruct"):
        lookup_model("acme/vlm-9b")


def test_local_folder_config_is_counted(tmp_path):
    hf_config(lookup_model("Qwen/Qwen2-VL-2B-Instruct")).save_pretrained(tmp_path)
    spec = lookup_model(str(tmp_path))
    assert spec.path == str(tmp_path)
    assert count_params(spec).total == 2208985600


def test_local_folder_with_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(VlmtuneError, match="model_type 'bert'.*Supported model types: .*qwen2_vl"):
        lookup_model(str(tmp_path))


def test_catalogue_agrees_with_the_family_descriptors():
    """Which modules are vision / projector and what LoRA targets: the estimator's data must not drift from the
    families the training path uses."""
    from vlmtune.families import all_families
    from vlmtune.memory.catalogue import architectures

    archs = architectures()
    checked = 0
    for family in all_families():
        for model_type in family.model_types:
            if model_type not in archs:
                continue
            arch = archs[model_type]
            assert arch.vision == tuple(family.vision_prefixes), model_type
            assert arch.projector == tuple(family.projector_prefixes), model_type
            for kind in ("minimal", "attention", "all"):
                assert arch.lora_targets[kind] == (list(family.lora_targets(kind))
                                                   + family.lora_parameter_targets(kind)), (model_type, kind)
            name = next(n for n in catalogue_names() if lookup_model(n).model_type == model_type)
            counts = count_params(lookup_model(name))
            targets = family.vision_lora_targets
            leaves = tuple(targets() if callable(targets) else targets)
            assert lora_params(counts, [], 16, leaves) == lora_params(
                counts, [], 16, arch.vision_lora_targets
            )
            checked += 1
    assert checked >= 3
