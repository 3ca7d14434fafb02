"""Tiny models, full-size architectures, processors (image size settings, token counts) and capability checks."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vlmtune.config.schema import DataConfig, VlmtuneConfig
from vlmtune.errors import ConfigError, VlmtuneError
from vlmtune.families import get_family

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "instructblip", "gemma3", "smolvlm", "qwen3_5", "internvl", "mllama", "qwen3_vl_moe"]


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_model_reloads_and_trains_one_step(tiny_model_dir, name):
    from transformers import AutoModelForImageTextToText, ProcessorMixin

    family, path = get_family(name), tiny_model_dir(name)
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert model.config.model_type in family.model_types
    processor = family.load_processor(path)
    assert isinstance(processor, ProcessorMixin) and processor.image_processor is not None
    assert processor.chat_template == family.chat_template
    assert len(processor.tokenizer) == model.config.text_config.vocab_size <= 1100
    assert sum(p.numel() for p in model.parameters()) < 400_000

    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    text = processor.apply_chat_template(chat, tokenize=False)
    assert family.image_placeholder in text and family.end_of_turn in text
    inputs = processor(text=[text], images=[Image.new("RGB", (64, 48), "red")], add_special_tokens=False,
                       return_tensors="pt")
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.get_output_embeddings().weight.grad is not None


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_folder_names_the_upstream_processor(tiny_model_dir, name):
    saved = json.loads((tiny_model_dir(name) / "processor_config.json").read_text())
    ours = ("Vlmtune", "Qwen2VLImageText", "Qwen2_5_VLImageText", "Qwen3VLImageText")
    assert not saved["processor_class"].startswith(ours)
    assert saved["processor_class"].endswith("Processor")


def test_tiny_build_is_deterministic_and_seeded(tmp_path):
    from safetensors.torch import load_file

    family = get_family("qwen2_vl")
    a = load_file(family.build_tiny(tmp_path / "a", seed=1) / "model.safetensors")
    b = load_file(family.build_tiny(tmp_path / "b", seed=1) / "model.safetensors")
    c = load_file(family.build_tiny(tmp_path / "c", seed=2) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# (family, size, parameters of the released checkpoint), counted on the meta device from the written config
ARCHS = [("qwen2_vl", "2b", 2.209e9), ("qwen2_vl", "7b", 8.291e9), ("qwen2_5_vl", "3b", 3.755e9),
         ("qwen2_5_vl", "7b", 8.292e9), ("qwen3_vl", "2b", 2.128e9), ("qwen3_vl", "4b", 4.438e9),
         ("qwen3_vl", "8b", 8.767e9), ("qwen3_vl", "32b", 33.357e9), ("llava", "7b", 7.063e9),
         ("llava", "13b", 13.351e9),
         ("instructblip", "7b", 7.914e9), ("gemma3", "4b", 4.300e9), ("gemma3", "12b", 12.187e9),
         ("gemma3", "27b", 27.432e9), ("qwen_vl", "7b", 9.657e9)]


@pytest.mark.parametrize("name, size, params", ARCHS)
def test_full_size_architecture_writes_config_and_processor_only(tmp_path, name, size, params):
    from transformers import AutoConfig, AutoModelForImageTextToText

    family = get_family(name)
    out = family.build_tiny(tmp_path, arch=size)
    assert not (out / "model.safetensors").exists()
    config = AutoConfig.from_pretrained(out)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 0.005, f"{name} {size}: {count:,} parameters"
    processor = family.load_processor(out)
    assert processor.image_processor is not None


def test_unknown_architecture_name(tmp_path):
    with pytest.raises(VlmtuneError, match="known: 2b, 7b"):
        get_family("qwen2_vl").build_tiny(tmp_path, arch="70b")


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("size", [(56, 56), (60, 80), (90, 40), (200, 300), (17, 500)])
def test_image_token_count_matches_the_processor(tiny_model_dir, name, size):
    family = get_family(name)
    fixed = name in ("llava", "instructblip", "gemma3")  # fixed resolution: no data.image_size needed
    processor = family.load_processor(tiny_model_dir(name), None if fixed else DataConfig(image_size=112))
    height, width = size
    out = processor(text=[processor.image_token], images=[Image.new("RGB", (width, height))],
                    add_special_tokens=False, return_tensors="pt")
    # the placeholder becomes the image tokens and whatever the processor wraps them in (SmolVLM: tile markers;
    # Gemma 3: <start_of_image>, <end_of_image> and blank lines)
    assert out["input_ids"].shape[1] == family.image_token_count(height, width, processor)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_dynamic_resolution_settings(tiny_model_dir, name):
    family, path = get_family(name), tiny_model_dir(name)
    token = family.patch_size * family.merge_size  # pixels per image-token side: 28 (Qwen2/2.5-VL), 32 (Qwen3-VL)
    tiny = (2 * token) ** 2  # the tiny checkpoints' min = max pixels
    size = family.load_processor(path, DataConfig(image_size=4 * token)).image_processor.size
    assert (size.shortest_edge, size.longest_edge) == (tiny, (4 * token) ** 2)
    size = family.load_processor(path, DataConfig(image_size=4 * token, max_pixels=5000)).image_processor.size
    assert size.longest_edge == 5000
    size = family.load_processor(path, DataConfig(image_size=token)).image_processor.size
    assert (size.shortest_edge, size.longest_edge) == (token * token, token * token)  # checkpoint min lowered
    size = family.load_processor(path, DataConfig(min_pixels=1000)).image_processor.size
    assert (size.shortest_edge, size.longest_edge) == (1000, tiny)  # tiny checkpoint's max kept
    with pytest.raises(ConfigError, match=f"data.min_pixels={tiny + 1000}"):
        family.load_processor(path, DataConfig(image_size=2 * token, min_pixels=tiny + 1000))
    assert family.image_token_count(448, 448, family.load_processor(path, DataConfig(image_size=448))) == (
        (448 // token) ** 2)


@pytest.mark.parametrize("name", ["llava", "instructblip", "gemma3"])
def test_fixed_resolution_family_takes_sizes_it_meets(tiny_model_dir, name):
    # data.image_size bounds an image's side: the tower's own side or more is met (a preset's 336 px on a 224 px
    # tower), a smaller bound cannot be and is refused with the tower's side; pixel bounds never apply.
    family, path = get_family(name), tiny_model_dir(name)
    side = family.load_processor(path).image_processor.size.get("height") or family.load_processor(
        path).image_processor.crop_size.height
    for image_size in (side, 336):
        family.load_processor(path, DataConfig(image_size=image_size))
    with pytest.raises(ConfigError) as err:
        family.load_processor(path, DataConfig(image_size=side - 1, max_pixels=9000))
    assert f"data.image_size={side - 1}" in str(err.value) and f"set it to {side} or more" in str(err.value)
    assert "data.min_pixels / data.max_pixels" in str(err.value)


def test_load_processor_from_a_folder_without_processor(tmp_path):
    with pytest.raises(VlmtuneError, match="cannot load the qwen2_vl processor"):
        get_family("qwen2_vl").load_processor(tmp_path)


def test_capability_check_names_fields():
    base = {"method": {"name": "qlora", "quantization": {"quantize_vision_tower": True}},
            "data": {"max_pixels": 100000}, "hardware": {"attn_implementation": "flash_attention_2"}}
    config = VlmtuneConfig.model_validate(base)
    problems = get_family("llava").check(config)
    assert len(problems) == 1 and problems[0].startswith("data.min_pixels / data.max_pixels: llava does not support")
    assert get_family("qwen2_vl").check(config) == []
    notes = get_family("qwen2_vl").notes(config)
    assert any(n.startswith("method.quantization.quantize_vision_tower:") for n in notes)
    assert any(n.startswith("hardware.attn_implementation:") for n in notes)
    small = VlmtuneConfig.model_validate({"data": {"image_size": 20}})
    assert get_family("qwen2_5_vl").check(small) == [
        "data.image_size=20: smaller than one image token (28 px = 2x2 patches of 14 px)"]
    assert get_family("qwen3_vl").check(small) == [
        "data.image_size=20: smaller than one image token (32 px = 2x2 patches of 16 px)"]
    assert get_family("llava").check(VlmtuneConfig()) == []
