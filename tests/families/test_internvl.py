"""InternVL3.5 -hf specifics: aspect-ratio tiles (+ thumbnail) counted exactly against the processor's own output for
many sizes and tile bounds, the same count from the memory estimator's rule for the full-size processor, the data
settings that bound the tiles, the ChatML prompt token by token, batches of different tile counts, the pixel
shuffle, and the 8B architecture against the catalogue."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmtune.config.schema import DataConfig
from vlmtune.data.collate import Collator
from vlmtune.data.processing import IGNORE_INDEX, count_tokens, encode
from vlmtune.data.records import ImagePart, Message, Record, TextPart
from vlmtune.errors import ConfigError
from vlmtune.families import get_family

FAMILY = get_family("internvl")
TILE = 32  # the tiny model's tile in px; 4 image tokens per tile


@pytest.fixture(scope="module")
def path(tiny_model_dir) -> Path:
    return tiny_model_dir("internvl")


@pytest.fixture(scope="module")
def processor(path):
    return FAMILY.load_processor(path, DataConfig())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("internvl-images")
    Image.new("RGB", (80, 60), "red").save(folder / "a.png")
    Image.new("RGB", (20, 90), "blue").save(folder / "b.png")
    return folder / "a.png", folder / "b.png"


SIZES = [(56, 56), (60, 80), (90, 40), (200, 300), (17, 500), (500, 17), (33, 31), (1, 1), (64, 63), (10, 32),
         (24, 21), (3000, 40), (301, 299), (32, 64), (64, 32)]


def _processed(processor, height: int, width: int):
    return processor(text=[processor.image_token], images=[Image.new("RGB", (width, height), "green")],
                     add_special_tokens=False, return_tensors="pt")


@pytest.mark.parametrize("bounds", [{}, {"max_pixels": 2 * TILE * TILE}, {"image_size": 64},
                                    {"min_pixels": 3 * TILE * TILE}, {"image_size": TILE}])
@pytest.mark.parametrize("height, width", SIZES)
def test_image_tokens_and_tiles_equal_the_processors(path, height, width, bounds):
    processor = FAMILY.load_processor(path, DataConfig(**bounds))
    out = _processed(processor, height, width)
    ids = out["input_ids"][0]
    tiles = FAMILY.tiles(height, width, processor)
    assert len(ids) == FAMILY.image_token_count(height, width, processor)
    assert int((ids == processor.image_token_id).sum()) == tiles * processor.image_seq_length == tiles * 4
    assert out["pixel_values"].shape == (tiles, 3, TILE, TILE)  # one tile per row
    text = processor.tokenizer.decode(ids)
    assert text.startswith("<img>") and text.endswith("</img>")
    assert tiles == 1 or 3 <= tiles <= processor.image_processor.max_patches + 1  # a grid of 2+ tiles + thumbnail
    if "image_size" in bounds and bounds["image_size"] == TILE:
        assert tiles == 1


def test_data_settings_bound_the_tiles(path):
    assert FAMILY.load_processor(path, DataConfig()).image_processor.max_patches == 4  # the tiny checkpoint's
    assert FAMILY.load_processor(path, DataConfig(max_pixels=2 * TILE * TILE + 5)).image_processor.max_patches == 2
    assert FAMILY.load_processor(path, DataConfig(image_size=3 * TILE)).image_processor.max_patches == 9
    assert FAMILY.load_processor(path, DataConfig(image_size=3 * TILE, max_pixels=TILE * TILE)).image_processor \
        .max_patches == 1
    with pytest.raises(ConfigError, match=r"data.image_size=20: internvl cuts images into 32 px tiles"):
        FAMILY.load_processor(path, DataConfig(image_size=20))
    with pytest.raises(ConfigError, match=r"data.min_pixels=5000 asks for at least 5 tiles .* at most 4"):
        FAMILY.load_processor(path, DataConfig(min_pixels=5000, image_size=2 * TILE))


@pytest.fixture(scope="module")
def full_size(tmp_path_factory) -> Path:
    """Config and processor of the 8B architecture (no weights): 448 px tiles, at most 12, 256 tokens each."""
    return FAMILY.build_tiny(tmp_path_factory.mktemp("internvl-8b"), arch="8b")


@pytest.mark.parametrize("height, width", [(448, 448), (1080, 1920), (37, 900), (3000, 200), (10, 10),
                                           (896, 448), (1344, 1344), (4000, 3000)])
@pytest.mark.parametrize("bounds", [{}, {"max_pixels": 448 * 448 * 4}, {"image_size": 896}, {"min_pixels": 448 * 448 * 3}])
def test_full_size_processor_against_the_estimator(full_size, height, width, bounds):
    from vlmtune.memory.catalogue import lookup_model
    from vlmtune.memory.image_tokens import image_cost

    processor = FAMILY.load_processor(full_size, DataConfig(**bounds))
    tiles = int(_processed(processor, height, width)["pixel_values"].shape[0])
    assert processor.image_seq_length == 256 and FAMILY.tiles(height, width, processor) == tiles
    cost = image_cost(lookup_model("OpenGVLab/InternVL3_5-8B-HF").image, height, width, **bounds)
    assert cost.llm_tokens == 256 * tiles == FAMILY.image_token_count(height, width, processor) - 2
    assert cost.vit_patches == 1024 * tiles


def _conversation(images: tuple[Path, Path]) -> Record:
    a, b = images
    return Record(7, [
        Message("system", [TextPart("Answer in a few words.")]),
        Message("user", [ImagePart(a), TextPart("What colour is the picture?")]),
        Message("assistant", [TextPart("It is red.")]),
        Message("user", [TextPart("And this one?"), ImagePart(b)]),
        Message("assistant", [TextPart("Blue.")]),
    ])


def test_prompt_and_labels_token_by_token(processor, images):
    tok = processor.tokenizer
    sample = encode(_conversation(images), processor, FAMILY, DataConfig())
    rendered = processor.apply_chat_template(_conversation(images).to_chat(), tokenize=False)
    assert rendered == ("<|im_start|>system\nAnswer in a few words.<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\n"
                        "What colour is the picture?<|im_end|>\n<|im_start|>assistant\nIt is red.<|im_end|>\n"
                        "<|im_start|>user\nAnd this one?<IMG_CONTEXT>\n<|im_end|>\n<|im_start|>assistant\nBlue."
                        "<|im_end|>\n")

    def image(height: int, width: int) -> str:
        return "<img>" + "<IMG_CONTEXT>" * 4 * FAMILY.tiles(height, width, processor) + "</img>"

    pieces = [("<|im_start|>system\nAnswer in a few words.<|im_end|>\n<|im_start|>user\n" + image(60, 80)
               + "\nWhat colour is the picture?<|im_end|>\n<|im_start|>assistant\n", False),
              ("It is red.<|im_end|>", True),
              ("\n<|im_start|>user\nAnd this one?" + image(90, 20) + "\n<|im_end|>\n<|im_start|>assistant\n", False),
              ("Blue.<|im_end|>", True), ("\n", False)]
    ids, labels = [], []
    for text, labelled in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if labelled else [IGNORE_INDEX] * len(piece)
    assert sample.input_ids.tolist() == ids and sample.labels.tolist() == labels
    assert count_tokens(_conversation(images), processor, FAMILY, DataConfig()) == len(sample)
    tiles = FAMILY.tiles(60, 80, processor) + FAMILY.tiles(90, 20, processor)
    assert tiles == 5 + 5 and sample.images["pixel_values"].shape == (tiles, 3, TILE, TILE)


def test_batch_of_different_tile_counts_equals_single_samples(path, processor, images):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    _, b = images
    records = [Record(1, [Message("user", [ImagePart(b), TextPart("Colour?")]), Message("assistant", [TextPart("blue")])]),
               _conversation(images)]
    samples = [encode(r, processor, FAMILY, DataConfig()) for r in records]
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    assert batch["pixel_values"].shape[0] == 5 + 10  # 2x2 and 1x4 grids, each + the thumbnail
    with torch.no_grad():
        out = model(**batch)
        for row, sample in enumerate(samples):
            inputs = sample.model_inputs()
            inputs.pop("labels")
            torch.testing.assert_close(out.logits[row, : len(sample)], model(**inputs).logits[0], atol=1e-4,
                                       rtol=1e-4)


def test_pixel_shuffle_turns_a_tiles_patches_into_its_tokens(path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    config = model.config
    patches = (config.vision_config.image_size[0] // config.vision_config.patch_size[0]) ** 2
    assert (patches, config.downsample_ratio, config.image_seq_length) == (16, 0.5, 4)
    seen = {}
    model.model.multi_modal_projector.register_forward_hook(
        lambda m, args, out: seen.update(inp=args[0].shape, out=out.shape))
    with torch.no_grad():
        model.model.get_image_features(torch.randn(3, 3, TILE, TILE))
    width = config.vision_config.hidden_size
    assert seen["inp"] == (3, patches // 4, width * 4)  # 2x2 neighbours' features side by side
    assert seen["out"] == (3, 4, config.text_config.hidden_size)


def test_the_8b_architecture_is_the_catalogues(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.memory.catalogue import lookup_model
    from vlmtune.memory.params import count_params

    spec = lookup_model("OpenGVLab/InternVL3_5-8B-HF")
    assert spec.model_type == "internvl" and count_params(spec).total == spec.params
    config = AutoConfig.from_pretrained(FAMILY.build_tiny(tmp_path / "8b", arch="8b"))
    assert config.image_seq_length == 256 and config.text_config.model_type == "qwen3"
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == spec.params
