"""What is special about Qwen3-VL, on its tiny model: the Instruct chat template, interleaved M-RoPE, DeepStack, and
the image-token rule (16 px patches) of the full-size processor against the memory estimator's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmtune.config.schema import DataConfig
from vlmtune.data.processing import encode
from vlmtune.data.records import ImagePart, Message, Record, TextPart
from vlmtune.errors import DataError
from vlmtune.families import get_family

FAMILY = get_family("qwen3_vl")
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    path = tiny_model_dir("qwen3_vl")
    return AutoModelForImageTextToText.from_pretrained(path).eval(), FAMILY.load_processor(path, DataConfig())


def _chat(*turns: tuple[str, list[dict]]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


# The Instruct models' rendering of plain conversations: ChatML, no default system prompt, no <think> tags.
RENDERINGS = [
    (_chat(("user", [{"type": "image"}, _text("What colour?")]), ("assistant", [_text("red")])), False,
     f"<|im_start|>user\n{IMAGE}What colour?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"),
    (_chat(("system", [_text("Be brief.")]), ("user", [_text("Hi"), {"type": "image"}])), True,
     f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi{IMAGE}<|im_end|>\n<|im_start|>assistant\n"),
    (_chat(("user", "plain string"), ("assistant", "answer"), ("user", [_text("again")])), True,
     "<|im_start|>user\nplain string<|im_end|>\n<|im_start|>assistant\nanswer<|im_end|>\n"
     "<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"),
]


@pytest.mark.parametrize("chat, prompt, expected", RENDERINGS)
def test_template_renders_like_the_instruct_models(tiny, chat, prompt, expected):
    _, processor = tiny
    assert processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt) == expected


def test_image_outside_a_user_message_is_refused(tiny, tmp_path):
    """The official template drops images from system messages; the sample would lose them silently."""
    _, processor = tiny
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    record = Record(3, [Message("system", [ImagePart(Path(tmp_path / "a.png")), TextPart("Look.")]),
                        Message("user", [TextPart("Colour?")]), Message("assistant", [TextPart("red")])])
    with pytest.raises(DataError, match="line 3: .* rendered 0 image token"):
        encode(record, processor, FAMILY, DataConfig())


def test_tiny_model_has_interleaved_mrope(tiny):
    """Height and width take every third rotary frequency (T H W T H W ... T), not contiguous blocks."""
    model, _ = tiny
    rope = model.config.text_config.rope_parameters
    assert rope["mrope_interleaved"] and min(rope["mrope_section"]) > 0
    half = model.config.text_config.head_dim // 2
    assert sum(rope["mrope_section"]) == half
    rotary = model.model.language_model.rotary_emb
    x = torch.zeros(1, dtype=torch.float32)
    base = torch.full((3, 1, 1), 5)
    cos, _ = rotary(x, base)
    for row, offset in ((1, 1), (2, 2)):
        moved = base.clone()
        moved[row] = 11
        changed = (rotary(x, moved)[0] != cos)[0, 0, :half].nonzero().flatten().tolist()
        assert changed == list(range(offset, 3 * rope["mrope_section"][row], 3)), (row, changed)


def test_deepstack_features_reach_the_language_model(tiny):
    """The DeepStack mergers are live in the tiny model: zeroing them changes the logits of an image sample."""
    model, processor = tiny
    assert 0 < len(model.config.vision_config.deepstack_visual_indexes) <= model.config.text_config.num_hidden_layers
    assert FAMILY.component_of("model.visual.deepstack_merger_list.0.linear_fc2.weight") == "projector"
    text = processor.apply_chat_template(_chat(("user", [{"type": "image"}, _text("Colour?")])), tokenize=False)
    inputs = processor(text=[text], images=[Image.new("RGB", (70, 50), "red")], add_special_tokens=False,
                       return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
        saved = {n: p.clone() for n, p in model.model.visual.deepstack_merger_list.named_parameters()}
        for name, param in model.model.visual.deepstack_merger_list.named_parameters():
            if "linear_fc2" in name:
                param.zero_()
        after = model(**inputs).logits
        for name, param in model.model.visual.deepstack_merger_list.named_parameters():
            param.copy_(saved[name])
    assert (before - after).abs().max() > 1e-4


@pytest.mark.parametrize("limits", [{}, {"image_size": 448}, {"max_pixels": 1003520}, {"min_pixels": 200704}])
def test_full_size_processor_matches_the_estimators_rule(tmp_path, limits):
    """The released checkpoints' processor (64 to 16384 tokens, 32 px per token side) as the family builds it for
    benchmarks, against the memory catalogue's rule, on sizes from tiny to beyond the pixel cap."""
    from vlmtune.memory.catalogue import lookup_model
    from vlmtune.memory.image_tokens import image_cost

    processor = FAMILY.load_processor(FAMILY.build_tiny(tmp_path, arch="8b"), DataConfig(**limits))
    rule = lookup_model("Qwen/Qwen3-VL-8B-Instruct").image
    for height, width in [(448, 448), (1080, 1920), (37, 900), (10, 10)]:
        cost = image_cost(rule, height, width, **limits)
        out = processor(text=[processor.image_token], images=[Image.new("RGB", (width, height))],
                        return_tensors="pt")
        tokens = int((out["input_ids"] == processor.image_token_id).sum())
        assert tokens == cost.llm_tokens == FAMILY.image_token_count(height, width, processor), (height, width)
        assert int(out["image_grid_thw"].prod()) == cost.vit_patches


@pytest.mark.parametrize("size", [(1000, 4), (3, 700)])
def test_image_too_thin_for_the_processor_is_a_data_error(tiny, tmp_path, size):
    """transformers' smart_resize raises a bare ValueError past a 200:1 aspect ratio; training (encode), token
    counting (`data check --model`), a lazy data set's first pass (survey) and predict refuse the record first,
    naming the image and its size."""
    from vlmtune.data.processing import count_tokens
    from vlmtune.data.survey import survey
    from vlmtune.errors import VlmtuneError
    from vlmtune.export.predict import generate_answer

    model, processor = tiny
    thin, ok = tmp_path / "thin.png", tmp_path / "ok.png"
    Image.new("RGB", size, "red").save(thin)
    Image.new("RGB", (800, 4), "red").save(ok)  # 200:1 exactly: the processor takes it
    ask = [Message("user", [ImagePart(ok), ImagePart(thin), TextPart("Colour?")])]
    record = Record(3, [*ask, Message("assistant", [TextPart("red")])])
    width, height = size
    for run in (lambda: encode(record, processor, FAMILY, DataConfig()),
                lambda: count_tokens(record, processor, FAMILY, DataConfig()),
                lambda: survey(record, processor, FAMILY, DataConfig())):
        with pytest.raises(DataError, match=rf"line 3: image 2 \(.*thin.png\) is {width}x{height} px"):
            run()
    with pytest.raises(VlmtuneError, match=f"cannot ask qwen3_vl this: image 2 .* is {width}x{height} px"):
        generate_answer(model, processor, ask, family=FAMILY)
    assert encode(Record(4, [Message("user", [ImagePart(ok)]), record.messages[-1]]), processor, FAMILY,
                  DataConfig()) is not None
