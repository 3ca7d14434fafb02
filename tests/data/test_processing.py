"""Encoding records: exact label masks per family, token counts, truncation that never splits an image, and
collation of mixed batches that the models accept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmtune.config.schema import DataConfig
from vlmtune.data.collate import Collator
from vlmtune.data.processing import IGNORE_INDEX, Dropped, count_tokens, encode, encode_or_drop
from vlmtune.data.records import ImagePart, Message, Record, TextPart
from vlmtune.errors import DataError, VlmtuneError
from vlmtune.families import get_family

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "gemma3", "smolvlm", "qwen3_5", "internvl", "qwen_vl"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (80, 60), "red").save(folder / "a.png")
    Image.new("RGBA", (40, 90), (0, 0, 255, 255)).save(folder / "b.png")
    return folder / "a.png", folder / "b.png"


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    """name -> (family, processor); processors are read-only in these tests."""
    return {name: (get_family(name), get_family(name).load_processor(tiny_model_dir(name), DataConfig()))
            for name in FAMILIES}


def conversation(images: tuple[Path, Path], line: int = 7) -> Record:
    """System prompt, two user turns with an image each, two assistant answers."""
    a, b = images
    return Record(line, [
        Message("system", [TextPart("Answer in a few words.")]),
        Message("user", [ImagePart(a), TextPart("What colour is the picture?")]),
        Message("assistant", [TextPart("It is red.")]),
        Message("user", [TextPart("And this one?"), ImagePart(b)]),
        Message("assistant", [TextPart("Blue, mostly.")]),
    ])


def text_only(line: int = 9, answer: str = "Hello there.") -> Record:
    return Record(line, [Message("user", [TextPart("Say hello.")]), Message("assistant", [TextPart(answer)])])


def labelled_runs(sample, tokenizer) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(sample.input_ids.tolist(), sample.labels.tolist(), strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("name", FAMILIES)
def test_labels_are_exactly_the_assistant_turns(setup, images, name):
    family, processor = setup[name]
    sample = encode(conversation(images), processor, family, DataConfig())
    assert sample is not None and sample.line == 7
    eot = family.end_of_turn
    lead = " " if name == "smolvlm" else ""  # SmolVLM's prompt ends "Assistant:", the answer's space is labelled
    assert labelled_runs(sample, processor.tokenizer) == [f"{lead}It is red.{eot}", f"{lead}Blue, mostly.{eot}"]
    image_tokens = sample.input_ids == processor.image_token_id
    counts = [family.image_token_count(60, 80, processor), family.image_token_count(90, 40, processor)]
    # Gemma 3's count also holds what its processor wraps the image tokens in (<start/end_of_image>, blank lines)
    soft = 2 * processor.image_seq_length if name == "gemma3" else sum(counts)
    if name == "internvl":  # its count also holds <img> and </img>; image tokens: tiles x image_seq_length
        soft = (family.tiles(60, 80, processor) + family.tiles(90, 40, processor)) * processor.image_seq_length
    if name == "smolvlm":  # its count also holds the tile markers; image tokens: frames x image_seq_len
        soft = (family.frames(60, 80, processor) + family.frames(90, 40, processor)) * processor.image_seq_len
    assert int(image_tokens.sum()) == soft
    assert (sample.labels[image_tokens] == IGNORE_INDEX).all()
    assert (sample.sequence["attention_mask"] == 1).all()
    assert all(v.shape == sample.input_ids.shape for v in sample.sequence.values())
    assert count_tokens(conversation(images), processor, family, DataConfig()) == len(sample)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "smolvlm"])  # tiles: tests/families/test_smolvlm.py
def test_decoded_input_is_the_rendered_conversation(setup, images, name):
    family, processor = setup[name]
    record = conversation(images)
    sample = encode(record, processor, family, DataConfig())
    rendered = processor.apply_chat_template(record.to_chat(), tokenize=False)
    decoded = processor.tokenizer.decode(sample.input_ids)
    token = processor.image_token
    decoded = decoded.replace(getattr(processor, "full_image_sequence", token), token)  # Gemma 3's expansion
    for wrapper in (getattr(processor, "start_image_token", ""), getattr(processor, "end_image_token", "")):
        decoded = decoded.replace(wrapper, "") if wrapper else decoded  # InternVL's <img> ... </img>
    while token + token in decoded:
        decoded = decoded.replace(token + token, token)
    assert decoded == rendered


def test_qwen_sample_carries_mm_token_type_ids(setup, images):
    family, processor = setup["qwen2_vl"]
    sample = encode(conversation(images), processor, family, DataConfig())
    types = sample.sequence["mm_token_type_ids"]
    assert torch.equal(types == 1, sample.input_ids == processor.image_token_id)
    assert set(sample.images) == {"pixel_values", "image_grid_thw"} and sample.images["image_grid_thw"].shape[0] == 2


@pytest.mark.parametrize("name", FAMILIES)
def test_truncation_cuts_text_after_the_last_image(setup, images, name):
    family, processor = setup[name]
    a, _ = images
    record = Record(3, [Message("user", [ImagePart(a), TextPart("Describe it.")]),
                        Message("assistant", [TextPart("A red picture with nothing else in it at all.")])])
    full = encode(record, processor, family, DataConfig())
    image_end = int((full.input_ids == processor.image_token_id).nonzero()[-1]) + 1
    limit = len(full) - 4
    cut = encode(record, processor, family, DataConfig(max_length=limit))
    assert len(cut) == limit and torch.equal(cut.input_ids, full.input_ids[:limit])
    assert torch.equal(cut.labels, full.labels[:limit]) and (cut.labels != IGNORE_INDEX).any()
    assert torch.equal(cut.images["pixel_values"], full.images["pixel_values"])

    for limit in (image_end - 1, image_end - 3, 5):  # inside or before the image span
        dropped = encode_or_drop(record, processor, family, DataConfig(max_length=limit))
        assert isinstance(dropped, Dropped) and dropped.line == 3 and "inside or before an image" in dropped.reason
        assert encode(record, processor, family, DataConfig(max_length=limit)) is None
        with pytest.raises(DataError, match="line 3: .*data.max_length"):
            encode(record, processor, family, DataConfig(max_length=limit, on_overflow="error"))


def test_qwen_cut_between_image_pads_and_vision_end_is_an_overflow(setup, images):
    family, processor = setup["qwen2_vl"]
    a, _ = images
    record = Record(4, [Message("user", [ImagePart(a)]), Message("assistant", [TextPart("red")])])
    full = encode(record, processor, family, DataConfig())
    last_pad = int((full.input_ids == processor.image_token_id).nonzero()[-1])
    assert isinstance(encode_or_drop(record, processor, family, DataConfig(max_length=last_pad + 1)), Dropped)


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_without_labels_after_truncation_is_dropped(setup, name):
    family, processor = setup[name]
    record = text_only()
    full = encode(record, processor, family, DataConfig())
    first_label = int((full.labels != IGNORE_INDEX).nonzero()[0])
    dropped = encode_or_drop(record, processor, family, DataConfig(max_length=first_label))
    assert isinstance(dropped, Dropped) and "no assistant token left" in dropped.reason


def test_bad_conversations_fail_loudly(setup, images):
    family, processor = setup["qwen2_vl"]
    a, _ = images
    with pytest.raises(DataError, match="line 2: .*starts with an assistant"):
        encode(Record(2, [Message("assistant", [TextPart("hi")])]), processor, family, DataConfig())
    with pytest.raises(DataError, match="assistant message with an image"):
        encode(Record(2, [Message("user", [TextPart("q")]), Message("assistant", [ImagePart(a)])]),
               processor, family, DataConfig())
    literal = Record(2, [Message("user", [TextPart("what is <|image_pad|>?")]),
                         Message("assistant", [TextPart("x")])])
    with pytest.raises(DataError, match="literal"):
        encode(literal, processor, family, DataConfig())


def test_template_that_is_not_prefix_stable_is_rejected(tiny_model_dir):
    family = get_family("qwen2_vl")
    processor = family.load_processor(tiny_model_dir("qwen2_vl"))
    # renders only the last turn's content in full: earlier renders are not prefixes of later ones
    processor.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                               "{{ m['content'][0]['text'] if loop.last else '...' }}<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    record = Record(5, [Message("user", [TextPart("q1")]), Message("assistant", [TextPart("a1")]),
                        Message("user", [TextPart("q2")]), Message("assistant", [TextPart("a2")])])
    with pytest.raises(VlmtuneError, match="not prefix-stable"):
        encode(record, processor, family, DataConfig())


@pytest.mark.parametrize("name", FAMILIES)
def test_mixed_batch_runs_and_matches_single_samples(tiny_model_dir, setup, images, name):
    from transformers import AutoModelForImageTextToText

    family, processor = setup[name]
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir(name)).eval()
    samples = [encode(text_only(answer="Hi."), processor, family, DataConfig()),
               encode(conversation(images), processor, family, DataConfig()),
               encode(text_only(answer="A longer hello to you."), processor, family, DataConfig())]
    collator = Collator(processor.tokenizer.pad_token_id)
    batch = collator(samples)
    length = max(len(s) for s in samples)
    assert batch["input_ids"].shape == (3, length)
    assert batch["labels"][0, len(samples[0]):].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == [len(s) for s in samples]
    with torch.no_grad():
        out = model(**batch)
        assert torch.isfinite(out.loss)
        for row, sample in enumerate(samples):  # right padding changes nothing for the real tokens
            single = model(**sample.model_inputs()).logits[0]
            torch.testing.assert_close(out.logits[row, : len(sample)], single, atol=1e-4, rtol=1e-4)
    text_batch = collator([samples[0], samples[2]])
    assert "pixel_values" not in text_batch
    model.train()
    loss = model(**text_batch).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_collator_pads_to_a_multiple_and_rejects_mismatched_samples(setup, images):
    family, processor = setup["qwen2_vl"]
    sample = encode(text_only(), processor, family, DataConfig())
    batch = Collator(0, pad_to_multiple_of=16)([sample])
    assert batch["input_ids"].shape[1] % 16 == 0 and batch["input_ids"].shape[1] >= len(sample)
    llava, llava_processor = setup["llava"]
    other = encode(text_only(), llava_processor, llava, DataConfig())  # no mm_token_type_ids
    with pytest.raises(ValueError, match="different per-token tensors"):
        Collator(0)([sample, other])


@pytest.mark.parametrize("name", FAMILIES)
def test_a_cut_before_the_markup_closing_an_image_is_an_overflow(setup, images, name):
    """A cut right after the last image token, before what the processor puts after it (Gemma 3's <end_of_image>,
    SmolVLM's closing <fake_token_around_image>, InternVL's and Qwen-VL's </img>), drops the record even when an
    earlier answer would leave labels to train on; a cut just past that markup keeps it."""
    family, processor = setup[name]
    a, _ = images
    record = Record(5, [Message("user", [TextPart("Hello, who are you?")]),
                        Message("assistant", [TextPart("An assistant that looks at pictures.")]),
                        Message("user", [ImagePart(a), TextPart("Describe it.")]),
                        Message("assistant", [TextPart("A red picture.")])])
    if family.record_problem(record):
        pytest.skip(f"{name} takes no such record: {family.record_problem(record)}")
    full = encode(record, processor, family, DataConfig())
    ids = full.input_ids
    last = int((ids == processor.image_token_id).nonzero()[-1])
    tail = 0  # what follows the image tokens up to the first token a text-only rendering would also have
    closing = {processor.tokenizer.convert_tokens_to_ids(t) for t in
               ("<end_of_image>", "<fake_token_around_image>", "</img>", "<|vision_end|>") if t in processor.tokenizer.get_vocab()}
    while last + 1 + tail < len(ids) and int(ids[last + 1 + tail]) in closing:
        tail += 1
    if tail == 0:
        pytest.skip(f"{name}'s processor closes no image with markup")
    dropped = encode_or_drop(record, processor, family, DataConfig(max_length=last + 1))
    assert isinstance(dropped, Dropped) and "inside or before an image" in dropped.reason
    from vlmtune.data.processing import _image_tail

    span = _image_tail(processor, family)  # the processor's whole expansion after the image (Gemma 3: + "\n\n")
    assert span >= tail
    kept = encode(record, processor, family, DataConfig(max_length=last + 1 + span))
    assert kept is not None and int(kept.input_ids[last + tail]) in closing
