"""Llama 3.2 Vision (Mllama) specifics, on its tiny model (one cross-attention layer between two self-attention
layers): the cross-attention mask built over the whole sample equals the processor's for the whole text, no BOS
per segment, the prompt and labels token by token, images stacked per sample (batches of 0, 1 and 2 images equal
single samples), the images reaching only the tokens after them, the records the template refuses, the full-size
tiles against the estimator, and the 11B architecture against the catalogue."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmtune.config.schema import DataConfig, VlmtuneConfig
from vlmtune.data.collate import Collator
from vlmtune.data.processing import IGNORE_INDEX, count_tokens, encode
from vlmtune.data.records import ImagePart, Message, Record, TextPart
from vlmtune.errors import ConfigError, DataError
from vlmtune.families import get_family

FAMILY = get_family("mllama")
HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    path = tiny_model_dir("mllama")
    return AutoModelForImageTextToText.from_pretrained(path).eval(), FAMILY.load_processor(path, DataConfig())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("mllama-images")
    Image.new("RGB", (80, 60), "red").save(folder / "a.png")
    Image.new("RGB", (20, 90), "blue").save(folder / "b.png")
    return folder / "a.png", folder / "b.png"


def _two_images(images: tuple[Path, Path]) -> Record:
    a, b = images
    return Record(4, [
        Message("user", [ImagePart(a), TextPart("What colour?")]),
        Message("assistant", [TextPart("red")]),
        Message("user", [TextPart("And this?"), ImagePart(b)]),
        Message("assistant", [TextPart("blue")]),
    ])


def _one_image(images: tuple[Path, Path]) -> Record:
    return Record(2, [Message("user", [TextPart("Look:"), ImagePart(images[1]), TextPart("colour?")]),
                      Message("assistant", [TextPart("blue")])])


def _text_only() -> Record:
    return Record(3, [Message("system", [TextPart("Be brief.")]), Message("user", [TextPart("Say hello.")]),
                      Message("assistant", [TextPart("hello")])])


def test_whole_sample_equals_the_processor_on_the_whole_text(tiny, images):
    _, processor = tiny
    record = _two_images(images)
    sample = encode(record, processor, FAMILY, DataConfig())
    text = processor.apply_chat_template(record.to_chat(), tokenize=False)
    pictures = [Image.open(p).convert("RGB") for p in record.images]
    whole = processor(text=[text], images=[pictures], add_special_tokens=False, return_tensors="pt")
    assert torch.equal(sample.input_ids, whole["input_ids"][0])
    # per segment the second turn would not see the first image; built over the whole sample it does
    assert torch.equal(sample.sequence["cross_attention_mask"], whole["cross_attention_mask"][0])
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(sample.images[key], whole[key][0]), key
    assert sample.images_per_sample and sample.images["pixel_values"].shape == (2, 4, 3, 28, 28)
    mask = sample.sequence["cross_attention_mask"]
    first, second = (sample.input_ids == processor.image_token_id).nonzero().flatten().tolist()
    assert not mask[:first].any()  # <|begin_of_text|> and the header see no image
    tiles = sample.images["aspect_ratio_mask"].sum(-1).tolist()
    assert mask[first:second, 0].sum(-1).unique().tolist() == [tiles[0]] and not mask[first:second, 1].any()
    assert mask[second:, 1].sum(-1).unique().tolist() == [tiles[1]]
    assert mask[second:, 0].sum() == 0  # the second image's turn reads the second image only (Meta's rule)
    assert int((sample.input_ids == processor.tokenizer.bos_token_id).sum()) == 1  # no BOS per segment


def test_prompt_and_labels_token_by_token(tiny, images):
    _, processor = tiny
    tok = processor.tokenizer
    record = _two_images(images)
    sample = encode(record, processor, FAMILY, DataConfig())
    rendered = processor.apply_chat_template(record.to_chat(), tokenize=False)
    assert rendered == ("<|begin_of_text|>" + HEADER.format("user") + "<|image|>What colour?<|eot_id|>"
                        + HEADER.format("assistant") + "red<|eot_id|>" + HEADER.format("user")
                        + "And this?<|image|><|eot_id|>" + HEADER.format("assistant") + "blue<|eot_id|>")
    pieces = [("<|begin_of_text|>" + HEADER.format("user") + "<|image|>What colour?<|eot_id|>"
               + HEADER.format("assistant"), False), ("red<|eot_id|>", True),
              (HEADER.format("user") + "And this?<|image|><|eot_id|>" + HEADER.format("assistant"), False),
              ("blue<|eot_id|>", True)]
    ids, labels = [], []
    for text, labelled in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if labelled else [IGNORE_INDEX] * len(piece)
    assert sample.input_ids.tolist() == ids and sample.labels.tolist() == labels
    assert count_tokens(record, processor, FAMILY, DataConfig()) == len(sample)
    text = encode(_text_only(), processor, FAMILY, DataConfig())
    assert tok.decode(text.input_ids) == ("<|begin_of_text|>" + HEADER.format("system") + "Be brief.<|eot_id|>"
                                          + HEADER.format("user") + "Say hello.<|eot_id|>"
                                          + HEADER.format("assistant") + "hello<|eot_id|>")
    assert text.sequence["cross_attention_mask"].shape == (len(text), 0, 4) and not text.images


def _logits(model, sample) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in sample.model_inputs().items() if k != "labels"}).logits[0]


def test_batches_of_equal_image_counts_equal_single_samples(tiny, images, tmp_path):
    model, processor = tiny
    Image.new("RGB", (20, 20), "green").save(tmp_path / "square.png")
    square = Record(5, [Message("user", [ImagePart(tmp_path / "square.png"), TextPart("colour?")]),
                      Message("assistant", [TextPart("green")])])
    collate = Collator(processor.tokenizer.pad_token_id)
    for records in ([_one_image(images), square], [_text_only(), _text_only()]):
        samples = [encode(r, processor, FAMILY, DataConfig()) for r in records]
        batch = collate(samples)
        with torch.no_grad():
            out = model(**batch).logits
        for row, sample in enumerate(samples):
            torch.testing.assert_close(out[row, : len(sample)], _logits(model, sample), atol=1e-5, rtol=1e-5)
    tiles = [int(encode(r, processor, FAMILY, DataConfig()).images["aspect_ratio_mask"].sum())
             for r in (_one_image(images), square)]
    assert tiles == [4, 1]  # different canvases (1x4 tiles, 1 tile) in one batch


def test_mixed_image_counts_stack_and_pad_per_sample(tiny, images):
    """A batch of 2, 1 and 0 images: image tensors stacked per sample, zero-padded. The sample with the most images
    equals itself alone; the others do not, because transformers' cross-attention lets a row that may see no image
    (text before the first image, a text-only sample) attend uniformly to every tile of its row, padding images
    included (it zeroes only that row's MLP output), as in batches MllamaProcessor pads itself."""
    model, processor = tiny
    samples = [encode(r, processor, FAMILY, DataConfig()) for r in (_two_images(images), _one_image(images),
                                                                      _text_only())]
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    longest = max(len(s) for s in samples)
    assert batch["pixel_values"].shape == (3, 2, 4, 3, 28, 28)
    assert batch["cross_attention_mask"].shape == (3, longest, 2, 4)
    assert batch["aspect_ratio_ids"][1:, 1].tolist() == [0, 0] and not batch["pixel_values"][2].any()
    with torch.no_grad():
        out = model(**batch).logits
    torch.testing.assert_close(out[0, : len(samples[0])], _logits(model, samples[0]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[2, : len(samples[2])], _logits(model, samples[2]), atol=1e-4)
    text_only = Collator(processor.tokenizer.pad_token_id)([samples[2], samples[2]])
    assert "pixel_values" not in text_only and model(**text_only).logits.shape[:2] == (2, len(samples[2]))


def test_the_image_reaches_the_answer(tiny, images, tmp_path):
    model, processor = tiny
    Image.new("RGB", (20, 90), "yellow").save(tmp_path / "other.png")
    other = Record(2, [Message("user", [TextPart("Look:"), ImagePart(tmp_path / "other.png"), TextPart("colour?")]),
                       Message("assistant", [TextPart("blue")])])
    a, b = (encode(r, processor, FAMILY, DataConfig()) for r in (_one_image(images), other))
    answer = a.labels != IGNORE_INDEX
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.allclose(_logits(model, a)[answer], _logits(model, b)[answer], atol=1e-4)


def test_what_the_template_and_the_config_refuse(tiny, tiny_model_dir, images):
    _, processor = tiny
    record = _one_image(images)
    with_system = Record(9, [Message("system", [TextPart("Be brief.")]), *record.messages])
    with pytest.raises(DataError, match="line 9: mllama: .* refuses a system message in a conversation with images"):
        encode(with_system, processor, FAMILY, DataConfig())
    config = VlmtuneConfig.model_validate({"model": {"name_or_path": "x"}, "speed": {"packing": True}})
    problems = FAMILY.check(config)
    assert len(problems) == 1 and "speed.packing" in problems[0] and "own images" in problems[0]
    with pytest.raises(ConfigError, match="data.image_size=20: mllama fits every image into tiles of 28 px"):
        FAMILY.load_processor(tiny_model_dir("mllama"), DataConfig(image_size=20))
    with pytest.raises(ConfigError, match="data.min_pixels / data.max_pixels"):
        FAMILY.load_processor(tiny_model_dir("mllama"), DataConfig(max_pixels=10000))


@pytest.fixture(scope="module")
def full_size(tmp_path_factory) -> Path:
    """Config and processor of the 11B architecture (no weights): 560 px tiles, up to 4."""
    return FAMILY.build_tiny(tmp_path_factory.mktemp("mllama-11b"), arch="11b")


@pytest.mark.parametrize("height, width", [(560, 560), (1080, 1920), (37, 900), (3000, 200), (10, 10),
                                           (1120, 560)])
def test_full_size_tiles_and_the_estimators_rule(full_size, height, width):
    from vlmtune.memory.catalogue import lookup_model
    from vlmtune.memory.image_tokens import image_cost

    processor = FAMILY.load_processor(full_size, DataConfig())
    out = processor(text=["<|image|>"], images=[[Image.new("RGB", (width, height))]], add_special_tokens=False,
                    return_tensors="pt")
    assert out["input_ids"].shape[1] == FAMILY.image_token_count(height, width, processor) == 1
    assert out["pixel_values"].shape == (1, 1, 4, 3, 560, 560)  # always 4 tiles, the unused ones padded
    real = int(out["aspect_ratio_mask"].sum())
    assert 1 <= real <= 4 and out["cross_attention_mask"][0, 0, 0].sum() == real
    cost = image_cost(lookup_model("meta-llama/Llama-3.2-11B-Vision-Instruct").image, height, width)
    patches = (560 // 14) ** 2 + 1
    assert cost.llm_tokens == 1 and cost.vit_patches == 4 * (patches + (-patches) % 8)  # padded to a multiple of 8


def test_the_11b_architecture_is_the_catalogues(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.memory.catalogue import lookup_model
    from vlmtune.memory.params import count_params

    spec = lookup_model("meta-llama/Llama-3.2-11B-Vision-Instruct")
    assert spec.model_type == "mllama" and count_params(spec).total == spec.params
    config = AutoConfig.from_pretrained(FAMILY.build_tiny(tmp_path / "11b", arch="11b"))
    assert config.text_config.cross_attention_layers == [3, 8, 13, 18, 23, 28, 33, 38]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == spec.params
