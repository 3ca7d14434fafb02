"""SmolVLM2 specifics: image splitting (tiles + global image) counted exactly against the processor's own output for
many sizes and resize settings, the frames-per-row pixel layout that batches like every other family's, the
"User:/Assistant:" prompt token by token, the pixel shuffle in the connector, the capability map and the speed
switches, full-size architectures against the memory catalogue, and a LoRA result that merges and answers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmtune.config.schema import DataConfig, VlmtuneConfig
from vlmtune.data.collate import Collator
from vlmtune.data.processing import IGNORE_INDEX, count_tokens, encode
from vlmtune.data.records import ImagePart, Message, Record, TextPart
from vlmtune.errors import ConfigError
from vlmtune.families import get_family

FAMILY = get_family("smolvlm")
TILE = 32  # the tiny model's tile (max_image_size) in px; 4 image tokens per frame


@pytest.fixture(scope="module")
def path(tiny_model_dir) -> Path:
    return tiny_model_dir("smolvlm")


@pytest.fixture(scope="module")
def processor(path):
    return FAMILY.load_processor(path, DataConfig())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("smol-images")
    Image.new("RGB", (80, 60), "red").save(folder / "a.png")
    Image.new("RGB", (20, 90), "blue").save(folder / "b.png")
    return folder / "a.png", folder / "b.png"


SIZES = [(56, 56), (60, 80), (90, 40), (200, 300), (17, 500), (500, 17), (510, 600), (33, 31), (1, 1), (64, 63),
         (10, 32), (24, 21), (45, 43), (3000, 40), (301, 299)]


@pytest.mark.parametrize("longest", [None, 20, 32, 100, 160])  # None: the tiny checkpoint's 64 px
@pytest.mark.parametrize("height, width", SIZES)
def test_image_tokens_and_frames_equal_the_processors(path, height, width, longest):
    processor = FAMILY.load_processor(path, DataConfig(image_size=longest))
    out = processor(text=[processor.image_token], images=[Image.new("RGB", (width, height), "green")],
                    add_special_tokens=False, return_tensors="pt")
    ids = out["input_ids"][0]
    frames = FAMILY.frames(height, width, processor)
    assert len(ids) == FAMILY.image_token_count(height, width, processor)
    assert int((ids == processor.image_token_id).sum()) == frames * processor.image_seq_len == frames * 4
    assert out["pixel_values"].shape == (frames, 1, 3, TILE, TILE)  # one frame per row
    assert out["pixel_attention_mask"].shape == (frames, 1, TILE, TILE) and bool(out["pixel_attention_mask"].all())
    text = processor.tokenizer.decode(ids)
    tiles = re.findall(r"<row_(\d)_col_(\d)>", text)
    assert len(tiles) == (frames - 1 if frames > 1 else 0) and text.count("<global-img>") == 1
    if longest is not None and longest <= TILE:
        assert frames == 1  # the image fits one tile: no splitting


def test_tiles_are_counted_as_the_processor_cuts_them(path):
    # transformers' own get_number_of_image_patches rounds the short side before scaling it with the long side's
    # rounding and says 1 x 4 tiles here; the processor cuts 2 x 4 (+ the global image), as image_token_count says
    wide = FAMILY.load_processor(path, DataConfig(image_size=100))
    kwargs = {"size": {"longest_edge": 100}, "max_image_size": {"longest_edge": TILE}}
    assert wide.image_processor.get_number_of_image_patches(10, 32, kwargs) == (5, 1, 4)
    assert FAMILY.frames(10, 32, wide) == 9
    out = wide(text=["<image>"], images=[Image.new("RGB", (32, 10))], return_tensors="pt")
    assert out["pixel_values"].shape[0] == 9


def _conversation(images: tuple[Path, Path]) -> Record:
    a, b = images
    return Record(7, [
        Message("system", [TextPart("Answer in a few words.")]),
        Message("user", [ImagePart(a), TextPart("What colour is the picture?")]),
        Message("assistant", [TextPart("It is red.")]),
        Message("user", [TextPart("And this one?"), ImagePart(b)]),
        Message("assistant", [TextPart("Blue.")]),
    ])


def _expansion(processor, height: int, width: int) -> str:
    out = processor(text=["<image>"], images=[Image.new("RGB", (width, height))], add_special_tokens=False)
    return processor.tokenizer.decode(out["input_ids"][0])


def test_prompt_and_labels_token_by_token(processor, images):
    tok = processor.tokenizer
    sample = encode(_conversation(images), processor, FAMILY, DataConfig())
    rendered = processor.apply_chat_template(_conversation(images).to_chat(), tokenize=False)
    assert rendered == ("<|im_start|>System: Answer in a few words.<end_of_utterance>\n"
                        "User:<image>What colour is the picture?<end_of_utterance>\nAssistant: It is red."
                        "<end_of_utterance>\nUser: And this one?<image><end_of_utterance>\nAssistant: Blue."
                        "<end_of_utterance>\n")
    pieces = [("<|im_start|>System: Answer in a few words.<end_of_utterance>\nUser:" + _expansion(processor, 60, 80)
               + "What colour is the picture?<end_of_utterance>\nAssistant:", False),
              (" It is red.<end_of_utterance>", True),
              ("\nUser: And this one?" + _expansion(processor, 90, 20) + "<end_of_utterance>\nAssistant:", False),
              (" Blue.<end_of_utterance>", True), ("\n", False)]
    ids, labels = [], []
    for text, labelled in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if labelled else [IGNORE_INDEX] * len(piece)
    assert sample.input_ids.tolist() == ids and sample.labels.tolist() == labels
    assert tok.convert_ids_to_tokens(labels[-2]) == "<end_of_utterance>" == tok.eos_token
    assert count_tokens(_conversation(images), processor, FAMILY, DataConfig()) == len(sample)
    frames = FAMILY.frames(60, 80, processor) + FAMILY.frames(90, 20, processor)
    assert frames == 5 + 3 and sample.images["pixel_values"].shape == (frames, 1, 3, TILE, TILE)


def test_batch_of_different_frame_counts_equals_single_samples(path, processor, images):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    a, b = images
    records = [Record(1, [Message("user", [ImagePart(b), TextPart("Colour?")]), Message("assistant", [TextPart("blue")])]),
               _conversation(images)]
    samples = [encode(r, processor, FAMILY, DataConfig()) for r in records]
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    assert batch["pixel_values"].shape[0] == 3 + 8
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
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    assert (patches, config.scale_factor) == (16, 2)
    seen = {}
    model.model.connector.register_forward_hook(lambda m, args, out: seen.update(inp=args[0].shape, out=out.shape))
    with torch.no_grad():
        model.model.get_image_features(torch.randn(1, 3, 3, TILE, TILE))
    assert seen["inp"] == (3, patches, config.vision_config.hidden_size)
    assert seen["out"] == (3, patches // config.scale_factor ** 2, config.text_config.hidden_size)
    assert model.model.connector.modality_projection.proj.in_features == 4 * config.vision_config.hidden_size


def test_image_size_is_the_longest_edge_and_pixel_bounds_are_refused(path):
    assert FAMILY.load_processor(path, DataConfig(image_size=96)).image_processor.size.longest_edge == 96
    assert FAMILY.load_processor(path).image_processor.size.longest_edge == 64
    with pytest.raises(ConfigError, match="sizes images by their longest edge"):
        FAMILY.load_processor(path, DataConfig(max_pixels=5000))
    problems = FAMILY.check(VlmtuneConfig.model_validate({"data": {"min_pixels": 3136}}))
    assert len(problems) == 1 and problems[0].startswith("data.min_pixels / data.max_pixels: smolvlm does not")
    assert FAMILY.check(VlmtuneConfig.model_validate({"speed": {"packing": True}})) == []


def test_speed_switches_that_apply(run_config):
    from vlmtune.methods import get_method
    from vlmtune.speed import apply_speed
    from vlmtune.speed.loss_hook import unwrap_peft
    from vlmtune.speed.varlen_attention import varlen_attention

    config = run_config("smolvlm", "lora")
    model = get_method("lora").load_and_prepare(config, FAMILY)
    setup = apply_speed(model, config, FAMILY)
    try:
        assert {"chunked_loss", "frozen_vision_no_grad", "fused_lora"} <= set(setup.active)
        why = varlen_attention(unwrap_peft(model), FAMILY, "cpu", packed=False, require_kernel=False)
        assert isinstance(why, str) and "cu_seqlens" in why
    finally:
        setup.remove()


def test_qlora_quantizes_only_the_text_model(run_config):
    from vlmtune.methods import get_method

    model = get_method("qlora").load_and_prepare(run_config("smolvlm", "qlora"), FAMILY)
    quantized = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert quantized and all(".model.text_model.layers." in n for n in quantized)


@pytest.mark.parametrize("size, hub_id", [("256m", "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"),
                                          ("500m", "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"),
                                          ("2.2b", "HuggingFaceTB/SmolVLM2-2.2B-Instruct")])
def test_full_size_architectures_count_the_catalogue(tmp_path, size, hub_id):
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.memory.catalogue import lookup_model

    out = FAMILY.build_tiny(tmp_path, arch=size)
    config = AutoConfig.from_pretrained(out)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == lookup_model(hub_id).params
    processor = FAMILY.load_processor(out)
    tile = config.vision_config.image_size
    assert processor.image_processor.max_image_size["longest_edge"] == tile
    assert processor.image_processor.size.longest_edge == 4 * tile
    assert processor.image_seq_len == {"256m": 64, "500m": 64, "2.2b": 81}[size]
    # a square photo at full size: 4 x 4 tiles + the global image
    assert FAMILY.frames(1000, 1000, processor) == 17


@pytest.mark.slow
def test_lora_result_merges_and_answers(run_config, tmp_path):
    from transformers import AutoModelForImageTextToText

    from vlmtune.data.records import read_records
    from vlmtune.export.merge import merge_adapter
    from vlmtune.export.predict import answer, load_for_inference
    from vlmtune.train.engine import train

    config = run_config("smolvlm", "lora", out=tmp_path / "run", lora={"dropout": 0.0, "train_projector": True})
    adapter = train(config).final_dir
    with_adapter = load_for_inference(adapter, device="cpu")
    out = merge_adapter(adapter, tmp_path / "merged", dtype="float32")
    merged = load_for_inference(out, device="cpu")
    assert type(merged.processor).__name__ == "SmolVLMImageTextProcessor"
    records = read_records(config.data.train_path)[:2]
    samples = [encode(r, merged.processor, merged.family, config.data) for r in records]
    batch = Collator(merged.processor.tokenizer.pad_token_id)(samples)
    plain = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits.float(), with_adapter.model.eval()(**batch).logits.float(),
                                   atol=1e-5, rtol=1e-5)
    image, question = records[0].images[0], "What colour is the shape?"
    reply = answer(merged, [image], question, 4)
    assert isinstance(reply, str) and reply == answer(with_adapter, [image], question, 4)


@pytest.mark.parametrize("longest", [20, 64, 100, 160])
def test_estimator_tile_rule_counts_the_processors_frames(path, longest):
    from vlmtune.memory.image_tokens import image_cost

    processor = FAMILY.load_processor(path, DataConfig(image_size=longest))
    rule = {"rule": "tiles", "tile": TILE, "longest_edge": 64, "patch_size": 8, "tokens_per_tile": 4}
    for height, width in SIZES:
        frames = processor(text=["<image>"], images=[Image.new("RGB", (width, height))])["pixel_values"].shape[0]
        cost = image_cost(rule, height, width, image_size=longest)
        assert (cost.llm_tokens, cost.vit_patches) == (4 * frames, 16 * frames), (height, width)
