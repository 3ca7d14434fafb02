"""Qwen-VL specifics: the port loads and saves the Hub layout (config.json, weight names, qwen.tiktoken), gives the
original remote code's numbers (committed fixture, recorded by benchmarks/qwen_vl_parity.py), its tokenizer is
tiktoken's BPE, ChatML with "Picture N:" labels exactly the answers, images are never cut, LoRA target names are
the checkpoint's, the image size rule, capabilities and speed switches, QLoRA and the full-size count."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from qwen_vl_fixture import checkpoint_weights, fixture
from qwen_vl_fixture import images as fixture_images

from vlmtune.config.schema import DataConfig, VlmtuneConfig
from vlmtune.data.processing import IGNORE_INDEX, Dropped, count_tokens, encode, encode_or_drop
from vlmtune.data.records import ImagePart, Message, Record, TextPart
from vlmtune.errors import ConfigError, DataError
from vlmtune.families import family_for_model, get_family


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    family = get_family("qwen_vl")
    return family, family.load_processor(tiny_model_dir("qwen_vl"), DataConfig())


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("qvl-images")
    Image.new("RGB", (80, 60), "red").save(folder / "a.png")
    Image.new("RGB", (40, 90), "blue").save(folder / "b.png")
    return folder / "a.png", folder / "b.png"


def test_tiny_model_is_in_the_hub_layout(tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    path = tiny_model_dir("qwen_vl")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen" and config["architectures"] == ["QWenLMHeadModel"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    assert {"heads", "image_size", "image_start_id", "layers", "mlp_ratio", "output_dim", "patch_size",
            "width"} <= set(config["visual"])
    keys = set(load_file(path / "model.safetensors"))
    assert {"transformer.wte.weight", "transformer.h.1.attn.c_attn.bias", "transformer.h.1.mlp.w2.weight",
            "transformer.ln_f.weight", "lm_head.weight", "transformer.visual.proj",
            "transformer.visual.positional_embedding", "transformer.visual.attn_pool.attn.in_proj_weight",
            "transformer.visual.transformer.resblocks.1.attn.in_proj.weight"} <= keys
    assert all(k.startswith(("transformer.", "lm_head.")) for k in keys)
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "QWenTokenizer"
    assert (path / "qwen.tiktoken").is_file() and family_for_model(path).name == "qwen_vl"
    assert type(AutoModelForImageTextToText.from_pretrained(path)).__name__ == "QwenVLForCausalLM"


def test_port_has_the_released_checkpoints_weight_names():
    """The weight names of a released Qwen-VL-Chat checkpoint (from its safetensors index; committed fixture) are
    exactly the port's, at full size (GPTQ adds zero biases to the no-bias linears of the Int4 repository, which the
    fp16 checkpoint does not have)."""
    from vlmtune.families.qwen_vl_model import QwenVLConfig, QwenVLForCausalLM

    hub = json.loads((Path(__file__).with_name("fixtures") / "qwen_vl_hub_weight_names.json").read_text())
    with torch.device("meta"):
        model = QwenVLForCausalLM(QwenVLConfig())
    names = {re.sub(r"(transformer\.h|resblocks)\.\d+\.", r"\1.N.", k) for k in model.state_dict()}
    assert names == set(hub["names"])
    assert (model.config.num_hidden_layers, model.config.vision_depth) == (hub["language_layers"], hub["vision_blocks"])


def test_port_gives_the_original_remote_codes_numbers(tmp_path):
    """The fixture holds what Qwen-VL-Chat's own modeling_qwen.py / visual.py (transformers 4.32) computed on a
    seeded checkpoint: the training loss (train mode) and logits (eval mode, past the tiny seq_length of 64, so
    dynamic NTK and log-n scaling run). Images go through this port's processor from the same PNGs."""
    from vlmtune.families.qwen_vl_model import QwenVLConfig, QwenVLForCausalLM
    from vlmtune.families.qwen_vl_model.processor import QwenVLImageProcessor

    data = fixture()
    config = QwenVLConfig.from_dict(data["config"])
    model = QwenVLForCausalLM(config).float()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == data["shapes"]  # the Hub's names
    model.load_state_dict(checkpoint_weights(data["shapes"]))
    pixels = QwenVLImageProcessor(config.visual["image_size"])(
        [Image.fromarray(a.numpy()) for a in fixture_images()])["pixel_values"]
    ids = torch.tensor(data["input_ids"])
    per_row = (ids == config.image_pad_id).sum(1) // config.queries  # images in order: a, (a, b)
    order = [0] * int(per_row[0]) + [0, 1][: int(per_row[1])]
    batch = {"input_ids": ids, "attention_mask": torch.tensor(data["attention_mask"]),
             "pixel_values": pixels[order]}
    model.train()
    loss = model(**batch, labels=torch.tensor(data["labels"])).loss
    assert abs(float(loss.detach()) - data["loss"]) / data["loss"] < 1e-5
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits[:, :: data["position_step"]][:, :, data["vocab_columns"]]
    expected = torch.tensor(data["logits"])
    assert float((logits - expected).abs().max() / expected.abs().max()) < 1e-5


def test_special_tokens_have_the_original_ids(setup, tiny_model_dir):
    _, processor = setup
    tok = processor.tokenizer
    ranks = sum(1 for line in (tiny_model_dir("qwen_vl") / "qwen.tiktoken").read_bytes().splitlines() if line)
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>", "<|extra_204|>", "<ref>", "</ref>",
             "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"]
    offsets = [0, 1, 2, 3, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216]  # 151643 + offset in the release
    assert [tok.convert_tokens_to_ids(t) for t in names] == [ranks + o for o in offsets]
    config = json.loads((tiny_model_dir("qwen_vl") / "config.json").read_text())
    assert config["visual"]["image_start_id"] == tok.convert_tokens_to_ids("<img>") == processor.image_token_id - 2
    text = "<|im_start|>user\nCafé, 12 shapes!<|im_end|>"
    assert tok.decode(tok(text)["input_ids"]) == text


def _tiktoken_encode(ranks: dict[bytes, int], piece: bytes) -> list[int]:
    """tiktoken's byte-pair merge for one pre-token: merge the adjacent pair of lowest rank until none is left."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [bytes([b]) for b in piece]
    while True:
        pairs = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            return [ranks[p] for p in parts]
        _, i = min(pairs)
        parts[i: i + 2] = [parts[i] + parts[i + 1]]


def test_tokenizer_is_tiktokens_bpe(setup, tiny_model_dir):
    import unicodedata

    import regex

    from vlmtune.families.qwen_vl_model.tokenizer import PATTERN, read_ranks
    from vlmtune.families.tiny import corpus

    _, processor = setup
    ranks = read_ranks(tiny_model_dir("qwen_vl") / "qwen.tiktoken")
    texts = corpus()[::7] + ["  two  spaces\n\n\ttab", "naïve café — 🙂 漢字", "xxxxxxxxxxxxxxxxxxxx abababab",
                             "A\u030a e\u0301"]
    for text in texts:
        text = unicodedata.normalize("NFC", text)
        expected = [i for piece in regex.findall(PATTERN, text) for i in _tiktoken_encode(ranks, piece.encode())]
        assert processor.tokenizer(text, add_special_tokens=False)["input_ids"] == expected, text


def _two_turns(a: Path, b: Path) -> Record:
    return Record(3, [Message("user", [TextPart("Compare "), ImagePart(a), ImagePart(b), TextPart("these.")]),
                      Message("assistant", [TextPart("Red and blue.")]),
                      Message("user", [TextPart("Which is red?")]),
                      Message("assistant", [TextPart("The first.")])])


def test_input_and_labels_token_by_token(setup, pictures):
    family, processor = setup
    tok = processor.tokenizer

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    sample = encode(_two_turns(*pictures), processor, family, DataConfig())
    image = "<img>" + "<imgpad>" * processor.queries + "</img>\n"
    prompt1 = ids("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nCompare "
                  f"Picture 1: {image}Picture 2: {image}these.<|im_end|>\n<|im_start|>assistant\n")
    answer1 = ids("Red and blue.<|im_end|>")
    prompt2 = ids("\n<|im_start|>user\nWhich is red?<|im_end|>\n<|im_start|>assistant\n")
    answer2 = ids("The first.<|im_end|>")
    tail = ids("\n")
    assert sample.input_ids.tolist() == prompt1 + answer1 + prompt2 + answer2 + tail
    assert prompt1.count(processor.image_token_id) == 2 * processor.queries
    hidden = [IGNORE_INDEX]
    assert sample.labels.tolist() == (hidden * len(prompt1) + answer1 + hidden * len(prompt2) + answer2
                                      + hidden * len(tail))
    assert sample.model_inputs()["pixel_values"].shape == (2, 3, 56, 56)
    assert count_tokens(_two_turns(*pictures), processor, family, DataConfig()) == len(sample)
    assert family.image_token_count(60, 80, processor) == processor.queries == 16


def test_truncation_never_cuts_an_image(setup, pictures):
    family, processor = setup
    record = _two_turns(*pictures)
    full = encode(record, processor, family, DataConfig())
    image_end = int((full.input_ids == processor.image_token_id).nonzero()[-1]) + 3  # + </img> and "\n"
    first_answer = int((full.labels != IGNORE_INDEX).nonzero()[0])
    kept = encode(record, processor, family, DataConfig(max_length=first_answer + 2))
    assert kept is not None and kept.input_ids.tolist() == full.input_ids[: first_answer + 2].tolist()
    assert (kept.input_ids == processor.image_token_id).sum() == 2 * processor.queries
    cut = encode_or_drop(record, processor, family, DataConfig(max_length=image_end - 1, on_overflow="drop"))
    assert isinstance(cut, Dropped) and f"the last image ends at token {image_end}" in cut.reason
    with pytest.raises(DataError, match=f"line 3: .* data.max_length={image_end - 1}"):
        encode(record, processor, family, DataConfig(max_length=image_end - 1, on_overflow="error"))


def test_lora_target_sets_use_the_checkpoints_names(setup, run_config, tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    from vlmtune.methods.lora import lora_target_names

    family, _ = setup
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen_vl"))
    per_layer = {"minimal": {"attn.c_attn", "attn.c_proj"}, "attention": {"attn.c_attn", "attn.c_proj"},
                 "all": {"attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"}}
    for kind, leaves in per_layer.items():
        hits = [n for n, _ in model.named_modules() if re.fullmatch(family.lora_target_regex(kind), n)]
        assert {n.split(".", 3)[-1] for n in hits} == leaves and len(hits) == 2 * len(leaves)
        assert all(family.component_of(n) == "language" for n in hits)
    names = lora_target_names(model, run_config("qwen_vl", "lora", lora={"target_modules": ["c_proj", "w1"]}),
                              family)
    assert len(names) == 2 * 3  # c_proj: attention and MLP output layers; w1
    with pytest.raises(ConfigError, match=r"target_modules=\['q_proj', 'v_proj'\] matches no linear layer .* "
                                          r"named: c_attn, c_proj, w1, w2"):
        lora_target_names(model, run_config("qwen_vl", "lora", lora={"target_modules": ["q_proj", "v_proj"]}),
                          family)
    vision = lora_target_names(model, run_config("qwen_vl", "lora", lora={"adapt_vision_tower": True}), family)
    assert {n for n in vision if ".visual." in n} == {
        f"transformer.visual.transformer.resblocks.{i}.{leaf}" for i in range(2)
        for leaf in ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")}


def test_image_size_rule_and_capabilities(tmp_path, caplog):
    family = get_family("qwen_vl")
    out = family.build_tiny(tmp_path / "7b", arch="7b")
    with caplog.at_level(logging.WARNING):
        processor = family.load_processor(out, DataConfig(image_size=336))  # ultra_low_memory's 336 px
    assert processor.image_processor.image_size == 448 and processor.queries == 256
    assert "data.image_size=336 has no effect on qwen_vl" in caplog.text
    with pytest.raises(ConfigError, match="data.min_pixels / data.max_pixels: qwen_vl has no dynamic resolution"):
        family.load_processor(out, DataConfig(max_pixels=100_000))
    problems = family.check(VlmtuneConfig.model_validate(
        {"speed": {"packing": True}, "method": {"lora": {"adapt_projector": True}}}))
    assert problems[0].startswith("speed.packing: qwen_vl does not support padding-free packing: ")
    assert problems[1].startswith("method.lora.adapt_projector: qwen_vl names no projector layers")
    assert family.check(VlmtuneConfig()) == []


def test_speed_switches_that_apply(run_config):
    from vlmtune.methods import get_method
    from vlmtune.speed import apply_speed
    from vlmtune.speed.loss_hook import unwrap_peft
    from vlmtune.speed.varlen_attention import varlen_attention

    family = get_family("qwen_vl")
    config = run_config("qwen_vl", "lora", lora={"train_projector": True})
    model = get_method("lora").load_and_prepare(config, family)
    setup = apply_speed(model, config, family)
    try:
        assert {"chunked_loss", "frozen_vision_no_grad", "fused_lora"} <= set(setup.active)
        why = varlen_attention(unwrap_peft(model), family, "cpu", packed=False, require_kernel=False)
        assert isinstance(why, str)
    finally:
        setup.remove()
    trained = {n.split(".modules_to_save")[0] for n, p in model.named_parameters()
               if p.requires_grad and "modules_to_save" in n}
    assert trained == {"base_model.model.transformer.visual.attn_pool", "base_model.model.transformer.visual.ln_post"}


def test_full_size_architecture_counts_the_released_checkpoint(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.memory.catalogue import lookup_model
    from vlmtune.memory.params import count_params

    family = get_family("qwen_vl")
    config = AutoConfig.from_pretrained(family.build_tiny(tmp_path, arch="7b"))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    spec = lookup_model("Qwen/Qwen-VL-Chat")
    assert sum(p.numel() for p in model.parameters()) == spec.params == 9_656_935_168
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():
        part = family.component_of(name)
        part = "embeddings" if name == "transformer.wte.weight" else part
        parts[part] = parts.get(part, 0) + p.numel()
    assert parts == count_params(spec).parts
    assert (config.visual["layers"], config.visual["width"], config.vision_mlp_width, config.mlp_width,
            config.queries) == (48, 1664, 8192, 11008, 256)


def test_qlora_quantizes_only_the_language_model(run_config):
    from vlmtune.methods import get_method
    from vlmtune.methods.qlora import skip_modules

    family = get_family("qwen_vl")
    skip = skip_modules(VlmtuneConfig.model_validate({"method": {"name": "qlora"}}), family)
    assert skip == [*family.projector_prefixes, "transformer.visual", "lm_head"]
    model = get_method("qlora").load_and_prepare(run_config("qwen_vl", "qlora"), family)
    quantized = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert quantized and all(".transformer.h." in n for n in quantized)


def test_ultra_low_memory_preset_takes_qwen_vl_chat(tmp_path, caplog, monkeypatch):
    """The 8 GB guide's model: its preset's 336 px image bound (for dynamic-resolution families) has no effect on
    Qwen-VL's fixed 448 px / 256 tokens and is not refused; the estimator answers for the hub id offline; a hub id
    that is neither cached nor reachable gets a message saying how to download it."""
    import huggingface_hub.constants

    from vlmtune.cli.main import main
    from vlmtune.config import load_preset
    from vlmtune.errors import VlmtuneError

    family = get_family("qwen_vl")
    folder = family.build_tiny(tmp_path / "chat", arch="7b")
    config = load_preset("ultra_low_memory", model={"name_or_path": str(folder)})
    assert family_for_model(config.model.name_or_path) is family and family.check(config) == []
    with caplog.at_level(logging.WARNING):
        assert family.load_processor(folder, config.data).queries == 256
    assert main(["estimate", "--preset", "ultra_low_memory", "--model", "Qwen/Qwen-VL-Chat"]) == 0
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(VlmtuneError, match="hf download Qwen/Qwen-VL-Chat"):
        family.load_processor("Qwen/Qwen-VL-Chat")
    with pytest.raises(VlmtuneError, match="'./nowhere' .* is not a folder on this machine"):
        family.load_processor("./nowhere")


def test_generation_stops_at_the_chat_stop_words(tiny_model_dir):
    """The Hub's generation_config.json names only <|endoftext|>; the original's chat() also stops at <|im_end|> and
    <|im_start|>, and so does the port's generate."""
    from transformers import AutoModelForImageTextToText

    path = tiny_model_dir("qwen_vl")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    tok = get_family("qwen_vl").load_processor(path).tokenizer
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|im_start|>")]
    assert model.chat_stop_ids == stops
    model.generation_config.eos_token_id = stops[0]
    im_end = torch.tensor([stops[1]])
    model.lm_head.register_forward_hook(lambda module, args, out: out.index_fill(-1, im_end, 1e4))  # always <|im_end|>
    ids = tok("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=stops[0])
    assert out[0, ids.shape[1]:].tolist() == [stops[1]]  # stopped right after <|im_end|>
    with torch.no_grad():  # an explicit eos_token_id is the caller's
        out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=stops[0],
                             eos_token_id=stops[0])
    assert out[0, ids.shape[1]:].tolist() == [stops[1]] * 3
