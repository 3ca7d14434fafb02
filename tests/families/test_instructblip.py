"""InstructBLIP specifics: its plain instruction prompt with the 32 (tiny: 4) query tokens before bos, labels on the
answer and </s> only, the Q-Former's own text input (the instruction), the records it refuses and why, the speed
switches that apply, and the 4-bit skip list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmtune.config.schema import DataConfig, VlmtuneConfig
from vlmtune.data.collate import Collator
from vlmtune.data.processing import IGNORE_INDEX, Dropped, count_tokens, encode, encode_or_drop
from vlmtune.data.records import ImagePart, Message, Record, TextPart
from vlmtune.errors import DataError
from vlmtune.families import get_family


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    family = get_family("instructblip")
    return family, family.load_processor(tiny_model_dir("instructblip"), DataConfig())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ib-images")
    Image.new("RGB", (80, 60), "red").save(folder / "a.png")
    Image.new("RGB", (40, 90), "blue").save(folder / "b.png")
    return folder / "a.png", folder / "b.png"


def single(image: Path, question: str = "What colour is the circle?", answer: str = "It is red.",
           system: str | None = "Answer in a few words.", line: int = 7) -> Record:
    messages = [Message("system", [TextPart(system)])] if system else []
    return Record(line, [*messages, Message("user", [TextPart(question), ImagePart(image)]),
                         Message("assistant", [TextPart(answer)])])


def test_input_and_labels_token_by_token(setup, images):
    family, processor = setup
    tok = processor.tokenizer
    sample = encode(single(images[0]), processor, family, DataConfig())
    # [queries] </s>(bos) system \n instruction | answer </s>; the image comes first whatever its place in the content
    prompt = [processor.image_token_id] * processor.num_query_tokens + tok(
        "</s>Answer in a few words.\nWhat colour is the circle?", add_special_tokens=False)["input_ids"]
    answer = tok("It is red.</s>", add_special_tokens=False)["input_ids"]
    assert sample.input_ids.tolist() == prompt + answer
    assert sample.labels.tolist() == [IGNORE_INDEX] * len(prompt) + answer
    assert tok.convert_ids_to_tokens(answer[-1]) == "</s>" == tok.bos_token == tok.eos_token
    assert count_tokens(single(images[0]), processor, family, DataConfig()) == len(sample)
    assert family.image_token_count(60, 80, processor) == processor.num_query_tokens == 4


def test_qformer_reads_the_instruction_only(setup, images):
    family, processor = setup
    sample = encode(single(images[0]), processor, family, DataConfig())
    expected = processor.qformer_tokenizer("What colour is the circle?")
    assert sample.extras["qformer_input_ids"].tolist() == expected["input_ids"]
    assert processor.qformer_tokenizer.convert_ids_to_tokens(expected["input_ids"]) == [
        "[CLS]", "what", "colour", "is", "the", "circle", "?", "[SEP]"]
    assert sample.extras["qformer_attention_mask"].tolist() == [1] * len(expected["input_ids"])
    assert "qformer_input_ids" not in sample.images and "qformer_input_ids" not in sample.sequence


def test_batch_pads_the_qformer_text_and_matches_single_samples(tiny_model_dir, setup, images):
    from transformers import AutoModelForImageTextToText

    family, processor = setup
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("instructblip")).eval()
    samples = [encode(single(images[0], question="Which shape?", system=None), processor, family, DataConfig()),
               encode(single(images[1], question="What colour is the big circle at the top?", answer="Blue."),
                      processor, family, DataConfig())]
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    lengths = [len(s.extras["qformer_input_ids"]) for s in samples]
    assert batch["qformer_input_ids"].shape == (2, max(lengths)) and batch["pixel_values"].shape[0] == 2
    assert batch["qformer_attention_mask"].sum(1).tolist() == lengths
    with torch.no_grad():
        out = model(**batch)
        assert torch.isfinite(out.loss)
        for row, sample in enumerate(samples):
            inputs = sample.model_inputs()
            inputs.pop("labels")
            torch.testing.assert_close(out.logits[row, : len(sample)], model(**inputs).logits[0], atol=1e-4,
                                       rtol=1e-4)
        # the Q-Former text is a real input: another instruction changes what the language model sees
        other = {**batch, "qformer_input_ids": batch["qformer_input_ids"].flip(0),
                 "qformer_attention_mask": batch["qformer_attention_mask"].flip(0)}
        assert (model(**other).logits - out.logits).abs().max() > 1e-4


def test_truncation_never_cuts_the_query_tokens(setup, images):
    family, processor = setup
    record = single(images[0], answer="A red picture with nothing else in it at all.")
    full = encode(record, processor, family, DataConfig())
    cut = encode(record, processor, family, DataConfig(max_length=len(full) - 3))
    assert torch.equal(cut.input_ids, full.input_ids[:-3]) and torch.equal(cut.extras["qformer_input_ids"],
                                                                          full.extras["qformer_input_ids"])
    dropped = encode_or_drop(record, processor, family, DataConfig(max_length=processor.num_query_tokens - 1))
    assert isinstance(dropped, Dropped) and "inside or before an image" in dropped.reason


def _two_images(images) -> Record:
    return Record(3, [Message("user", [ImagePart(images[0]), ImagePart(images[1]), TextPart("Same colour?")]),
                      Message("assistant", [TextPart("No.")])])


@pytest.mark.parametrize("record, message", [
    (_two_images, r"line 3: 2 images in one record, but instructblip takes one image per sample: .*own record"),
    (lambda im: Record(4, [Message("user", [TextPart("Hello?")]), Message("assistant", [TextPart("Hi.")])]),
     r"line 4: instructblip needs exactly one image per record, in the user message .* has 0"),
    (lambda im: Record(5, [Message("user", [ImagePart(im[0]), TextPart("q1")]), Message("assistant", [TextPart("a")]),
                           Message("user", [TextPart("q2")]), Message("assistant", [TextPart("b")])]),
     r"line 5: instructblip takes one instruction and one answer .* user -> assistant -> user -> assistant.*split"),
    (lambda im: Record(6, [Message("system", [ImagePart(im[0])]), Message("user", [TextPart("q")]),
                           Message("assistant", [TextPart("a")])]),
     r"line 6: .*0 of them in the user message"),
])
def test_records_it_cannot_take_are_refused_with_the_reason(setup, images, record, message):
    family, processor = setup
    with pytest.raises(DataError, match=message):
        encode(record(images), processor, family, DataConfig())
    with pytest.raises(DataError, match=message):  # token counting (data check) says the same
        count_tokens(record(images), processor, family, DataConfig())


def test_data_check_names_the_line_of_a_two_image_record(setup, images, tmp_path):
    from vlmtune.data.check import check_file
    from vlmtune.data.tokens import TokenCounter

    family, processor = setup
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": str(images[0])},
                                                       {"type": "text", "text": "Colour?"}]},
                          {"role": "assistant", "content": "red"}]},
            {"messages": [{"role": "user", "content": [{"type": "image", "image": str(images[0])},
                                                       {"type": "image", "image": str(images[1])},
                                                       {"type": "text", "text": "Colours?"}]},
                          {"role": "assistant", "content": "red, blue"}]}]
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = check_file(path, DataConfig(), TokenCounter(processor, family, DataConfig()), family=family.name)
    assert [p.line for p in report.errors] == [2]
    assert "takes one image per sample" in report.errors[0].message


def test_capability_map_refuses_packing_and_image_size():
    family = get_family("instructblip")
    problems = family.check(VlmtuneConfig.model_validate({"speed": {"packing": True},
                                                          "data": {"min_pixels": 3136}}))
    assert len(problems) == 2
    assert problems[0].startswith("data.min_pixels / data.max_pixels: instructblip does not support")
    assert problems[1].startswith("speed.packing: instructblip does not support padding-free packing: ")
    assert family.check(VlmtuneConfig()) == []


def test_qlora_keeps_vision_qformer_and_lm_head_16bit():
    from vlmtune.methods.qlora import skip_modules

    skip = skip_modules(VlmtuneConfig.model_validate({"method": {"name": "qlora"}}), get_family("instructblip"))
    assert skip == ["qformer", "query_tokens", "language_projection", "vision_model", "language_model.lm_head"]


def test_stock_usage_still_puts_the_queries_before_bos(setup, images):
    _, processor = setup
    out = processor(images=Image.open(images[0]), text="What is this?", return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    queries = processor.num_query_tokens
    assert ids[:queries] == [processor.image_token_id] * queries and ids[queries] == processor.tokenizer.bos_token_id
    with pytest.raises(ValueError, match="one image per text"):
        processor(images=[Image.open(images[0])] * 2, text="<image>two?")


def test_speed_switches_that_apply(run_config):
    from vlmtune.methods import get_method
    from vlmtune.speed import apply_speed
    from vlmtune.speed.loss_hook import unwrap_peft
    from vlmtune.speed.varlen_attention import varlen_attention

    config = run_config("instructblip", "lora")
    family = get_family("instructblip")
    model = get_method("lora").load_and_prepare(config, family)
    setup = apply_speed(model, config, family)
    try:
        assert {"chunked_loss", "frozen_vision_no_grad", "fused_lora"} <= set(setup.active)
        # varlen vision attention does not apply on a GPU either: the EVA ViT attends per image, without cu_seqlens
        why = varlen_attention(unwrap_peft(model), family, "cpu", packed=False, require_kernel=False)
        assert isinstance(why, str) and "cu_seqlens" in why
    finally:
        setup.remove()


def test_full_size_architecture_counts_the_released_checkpoint(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.memory.catalogue import lookup_model

    out = get_family("instructblip").build_tiny(tmp_path, arch="7b")
    config = AutoConfig.from_pretrained(out)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == lookup_model("Salesforce/instructblip-vicuna-7b").params
    assert (config.num_query_tokens, config.vision_config.num_hidden_layers, config.vision_config.hidden_size,
            config.qformer_config.num_hidden_layers, config.qformer_config.hidden_size) == (32, 39, 1408, 12, 768)


@pytest.mark.slow
def test_lora_on_the_qformer_trains_and_reloads(run_config):
    from vlmtune.export.predict import load_for_inference
    from vlmtune.train.engine import train

    config = run_config("instructblip", "lora", lora={"adapt_projector": True})
    result = train(config)
    assert result.train_loss_last < result.train_loss_first
    loaded = load_for_inference(result.final_dir, device="cpu")
    adapted = {n.split(".lora_")[0] for n, _ in loaded.model.named_parameters() if ".lora_A." in n}
    qformer = {n for n in adapted if ".qformer." in n}
    # 2 tiny layers x (self q/k/v/out + cross q/k/v/out + 2 + 2 feed-forward) linears, nothing else of the projector
    assert len(qformer) == 2 * 12 and not any("language_projection" in n or "vision_model" in n for n in adapted)
    with pytest.raises(ValueError, match="adapt_projector and train_projector"):
        run_config("instructblip", "lora", lora={"adapt_projector": True, "train_projector": True})
    problems = get_family("llava").check(run_config("llava", "lora", lora={"adapt_projector": True}))
    assert problems == ["method.lora.adapt_projector: llava names no projector layers for adapters (its projector is "
                        "small); use method.lora.train_projector to train it fully"]


def test_estimator_counts_qformer_adapters_like_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vlmtune.memory.catalogue import hf_config, lookup_model
    from vlmtune.memory.params import count_params, lora_params
    from vlmtune.methods.base import linear_names

    family, spec = get_family("instructblip"), lookup_model("Salesforce/instructblip-vicuna-7b")
    assert spec.arch.projector_lora_targets == family.projector_lora_targets
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(hf_config(spec))
    names = linear_names(model, [family.projector_layers_prefix], family.projector_lora_targets)
    peft = get_peft_model(model, LoraConfig(r=16, target_modules=names))
    expected = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert lora_params(count_params(spec), [], 16, (), spec.arch.projector_lora_targets) == expected == 4841472


def test_qlora_quantizes_only_the_language_model(run_config):
    from vlmtune.methods import get_method

    model = get_method("qlora").load_and_prepare(run_config("instructblip", "qlora"), get_family("instructblip"))
    quantized = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert quantized and all(".language_model.model.layers." in n for n in quantized)
    assert not any(".qformer." in n or ".vision_model." in n for n in quantized)
