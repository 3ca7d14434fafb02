"""Image-token rules against the real transformers image processors (built offline, PIL backend)."""

from __future__ import annotations

import pytest
from PIL import Image

from vlmtune.memory.catalogue import lookup_model
from vlmtune.memory.image_tokens import image_cost, smart_resize

SIZES = [(448, 448), (1080, 1920), (1344, 1344), (37, 900), (3000, 200), (10, 10), (4000, 3000)]


def _qwen_patches(processor, height: int, width: int) -> int:
    grid = processor(images=[Image.new("RGB", (width, height))], return_tensors="np")["image_grid_thw"][0]
    return int(grid[0] * grid[1] * grid[2])


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("limits", [{}, {"max_pixels": 1003520}, {"image_size": 448}, {"min_pixels": 200704}])
def test_qwen2_vl_rule_matches_the_processor(height, width, limits):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rule = lookup_model("Qwen/Qwen2-VL-2B-Instruct").image
    cost = image_cost(rule, height, width, **limits)
    low = limits.get("min_pixels", rule["min_pixels"])
    high = limits.get("max_pixels") or (
        limits["image_size"] ** 2 if "image_size" in limits else rule["max_pixels"]
    )
    processor = Qwen2VLImageProcessorPil(min_pixels=low, max_pixels=high)
    assert cost.vit_patches == _qwen_patches(processor, height, width)
    assert cost.llm_tokens == cost.vit_patches // 4


@pytest.mark.parametrize("height,width", SIZES)
def test_qwen3_vl_rule_matches_the_processor(height, width):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rule = lookup_model("Qwen/Qwen3-VL-4B-Instruct").image
    processor = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, size={"shortest_edge": 65536, "longest_edge": 16777216}
    )
    assert image_cost(rule, height, width).vit_patches == _qwen_patches(processor, height, width)


def test_documented_examples():
    rule = lookup_model("Qwen/Qwen2-VL-7B-Instruct").image
    assert image_cost(rule, 448, 448).llm_tokens == 256
    assert image_cost(rule, 1080, 1920).llm_tokens == 2691
    assert image_cost(rule, 1080, 1920, max_pixels=1003520).llm_tokens == 1222
    assert image_cost(lookup_model("Qwen/Qwen3-VL-2B-Instruct").image, 448, 448).llm_tokens == 196
    assert smart_resize(1080, 1920, 28, 3136, 1003520) == (728, 1316)


@pytest.mark.parametrize("height,width", SIZES)
def test_llava_is_576_tokens_whatever_the_size(height, width):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    pixels = processor(images=[Image.new("RGB", (width, height))], return_tensors="np")["pixel_values"]
    config_patch = 14
    cost = image_cost(lookup_model("llava-hf/llava-1.5-7b-hf").image, height, width)
    assert cost.llm_tokens == (pixels.shape[-2] // config_patch) * (pixels.shape[-1] // config_patch) == 576


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize(
    "model,longest,tile",
    [("HuggingFaceTB/SmolVLM-Instruct", 1536, 384), ("HuggingFaceTB/SmolVLM-256M-Instruct", 2048, 512)],
)
def test_smolvlm_tiles_match_the_processor(height, width, model, longest, tile):
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    processor = Idefics3ImageProcessorPil(
        size={"longest_edge": longest}, max_image_size={"longest_edge": tile}
    )
    frames = processor(images=[[Image.new("RGB", (width, height))]], return_tensors="np")[
        "pixel_values"
    ].shape[1]
    rule = lookup_model(model).image
    cost = image_cost(rule, height, width)
    assert cost.llm_tokens == frames * rule["tokens_per_tile"]
    assert cost.vit_patches == frames * (tile // rule["patch_size"]) ** 2
