"""What is special about Gemma 3, on its tiny model: the gemma-3-it chat template (system folded into the first user
turn), the image tokens' bidirectional attention (from the token_type_ids the collator passes), sliding-window
layers, packing with the family's own masks (and the transformers mask that makes them needed), and the catalogue /
estimator entries of the 4B / 12B / 27B models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmtune.config.schema import DataConfig, VlmtuneConfig
from vlmtune.data.collate import Collator
from vlmtune.data.processing import IGNORE_INDEX, encode
from vlmtune.data.records import ImagePart, Message, Record, TextPart
from vlmtune.errors import DataError
from vlmtune.families import get_family

FAMILY = get_family("gemma3")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    path = tiny_model_dir("gemma3")
    return AutoModelForImageTextToText.from_pretrained(path).eval(), FAMILY.load_processor(path, DataConfig())


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gemma3") / "a.png"
    Image.new("RGB", (80, 60), "red").save(path)
    return path


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


# gemma-3-*-it's rendering: <bos>, the system text and a blank line at the start of the first user turn, `model` for
# the assistant role, texts trimmed, <start_of_image> per image.
RENDERINGS = [
    ([{"role": "user", "content": [{"type": "image"}, _text("What colour? ")]},
      {"role": "assistant", "content": [_text(" red")]}], False,
     "<bos><start_of_turn>user\n<start_of_image>What colour?<end_of_turn>\n<start_of_turn>model\nred<end_of_turn>\n"),
    ([{"role": "system", "content": [_text("Be brief.")]}, {"role": "user", "content": [_text("Hi")]}], True,
     "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"),
    ([{"role": "system", "content": "Sys"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "user", "content": "c"}], True,
     "<bos><start_of_turn>user\nSys\n\na<end_of_turn>\n<start_of_turn>model\nb<end_of_turn>\n"
     "<start_of_turn>user\nc<end_of_turn>\n<start_of_turn>model\n"),
]


@pytest.mark.parametrize("chat, prompt, expected", RENDERINGS)
def test_template_renders_like_gemma_3_it(tiny, chat, prompt, expected):
    _, processor = tiny
    assert processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt) == expected


def test_labels_cover_the_model_turns_and_end_of_turn_only(tiny, image):
    _, processor = tiny
    record = Record(4, [Message("system", [TextPart("Be brief.")]),
                        Message("user", [ImagePart(image), TextPart("What colour?")]),
                        Message("assistant", [TextPart("Red.")])])
    sample = encode(record, processor, FAMILY, DataConfig())
    tokens = processor.tokenizer.convert_ids_to_tokens(sample.input_ids.tolist())
    labelled = [i for i, label in enumerate(sample.labels.tolist()) if label != IGNORE_INDEX]
    assert tokens[0] == "<bos>" and "<bos>" not in tokens[1:]  # the template's bos, none added by the tokenizer
    assert processor.tokenizer.decode(sample.input_ids[labelled]) == "Red.<end_of_turn>"
    assert labelled == list(range(labelled[0], labelled[-1] + 1))
    assert tokens[labelled[-1]] == "<end_of_turn>" and len(tokens) == labelled[-1] + 2  # the final "\n" unlabelled
    assert processor.tokenizer.decode(sample.input_ids[: labelled[0]]).endswith("<start_of_turn>model\n")
    # token_type_ids mark exactly the soft image tokens, which the model's mask reads
    soft = sample.input_ids == processor.tokenizer.image_token_id
    assert int(soft.sum()) == processor.image_seq_length
    assert torch.equal(sample.sequence["token_type_ids"] == 1, soft)


def test_roles_must_alternate(tiny):
    _, processor = tiny
    record = Record(6, [Message("user", [TextPart("a")]), Message("user", [TextPart("b")]),
                        Message("assistant", [TextPart("c")])])
    with pytest.raises(DataError, match="line 6: .*alternating"):
        encode(record, processor, FAMILY, DataConfig())


def _batch(processor, image: Path) -> dict[str, torch.Tensor]:
    record = Record(1, [Message("user", [TextPart("Look at"), ImagePart(image), TextPart("this picture now.")]),
                        Message("assistant", [TextPart("It is a red picture.")])])
    text = Record(2, [Message("user", [TextPart("Say hello.")]), Message("assistant", [TextPart("hello")])])
    samples = [encode(r, processor, FAMILY, DataConfig()) for r in (record, text)]
    return Collator(processor.tokenizer.pad_token_id)(samples)


def test_image_tokens_attend_to_each_other_both_ways(tiny, image):
    """With the collator's token_type_ids an image's first soft token sees the later ones: its output changes when
    only a later image token's input changes. Under a causal mask it could not (checked with the types zeroed)."""
    model, processor = tiny
    batch = _batch(processor, image)
    assert "token_type_ids" in batch and int(batch["token_type_ids"].sum()) == processor.image_seq_length
    soft = (batch["input_ids"][0] == processor.tokenizer.image_token_id).nonzero().flatten()
    first, last = int(soft[0]), int(soft[-1])

    def hidden(types: torch.Tensor, nudge: bool) -> torch.Tensor:
        def pre_hook(module, args, kwargs):  # only the last image token's input changes (after the image merge)
            return args, {**kwargs, "inputs_embeds": _nudged(kwargs["inputs_embeds"], last, nudge)}

        handle = model.model.language_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            with torch.no_grad():
                out = model(**{**batch, "token_type_ids": types}, output_hidden_states=True)
        finally:
            handle.remove()
        return out.hidden_states[-1][0]

    types = batch["token_type_ids"]
    plain, nudged = hidden(types, False), hidden(types, True)
    assert (plain[first] - nudged[first]).abs().max() > 1e-4, "the first image token does not see the last"
    assert torch.allclose(plain[:first - 1], nudged[:first - 1]), "text before the image saw the image's future"
    causal_plain, causal_nudged = hidden(torch.zeros_like(types), False), hidden(torch.zeros_like(types), True)
    assert torch.allclose(causal_plain[first], causal_nudged[first])  # a causal mask: no way back


def _nudged(embeds: torch.Tensor, position: int, nudge: bool) -> torch.Tensor:
    if not nudge:
        return embeds
    embeds = embeds.clone()
    embeds[0, position] += 0.5
    return embeds


def test_sliding_window_layers_limit_attention(tiny, image):
    """The tiny model's first layer attends within 16 tokens, its second globally, as the real 5:1 pattern mixes
    them: a longer window changes the outputs of tokens more than 16 positions in."""
    from transformers import AutoModelForImageTextToText

    model, processor = tiny
    config = model.config.text_config
    assert config.layer_types == ["sliding_attention", "full_attention"] and config.sliding_window == 16
    assert config.final_logit_softcapping is None  # as Gemma 3; the chunked loss declines any model that soft-caps
    batch = _batch(processor, image)
    assert batch["input_ids"].shape[1] > 2 * config.sliding_window
    wide = AutoModelForImageTextToText.from_config(model.config.__class__.from_dict(
        {**model.config.to_dict(), "text_config": {**config.to_dict(), "sliding_window": 4096}})).eval()
    wide.load_state_dict(model.state_dict())
    with torch.no_grad():
        narrow_out, wide_out = model(**batch).logits[0], wide(**batch).logits[0]
    window = config.sliding_window
    assert torch.allclose(narrow_out[:window], wide_out[:window], atol=1e-5)
    assert not torch.allclose(narrow_out[window + 1:], wide_out[window + 1:], atol=1e-4)


def test_packing_is_accepted_with_the_family_masks():
    config = VlmtuneConfig.model_validate({"model": {"name_or_path": "x"}, "speed": {"packing": True}})
    assert FAMILY.check(config) == []
    assert FAMILY.packed_row_attention == "family_mask" and FAMILY.packed_mask_module == "model"


def _vision_masks(text_config, token_types: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """The (length, length) boolean masks Gemma 3 builds for one row with no attention_mask and no cache."""
    from transformers.models.gemma3.modeling_gemma3 import (
        create_masks_for_vision_model,
        get_block_sequence_ids_for_mask,
    )

    masks = create_masks_for_vision_model(
        config=text_config, inputs_embeds=torch.zeros(1, token_types.shape[0], text_config.hidden_size),
        attention_mask=None, past_key_values=None, position_ids=positions[None],
        block_sequence_ids=get_block_sequence_ids_for_mask(token_types[None]))
    causal = torch.ones(len(token_types), len(token_types), dtype=torch.bool).tril()
    return {kind: causal if mask is None else mask[0, 0] for kind, mask in masks.items()}


def _packed(samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token types, positions) of one packed row: the samples concatenated, positions restarting per sample."""
    return torch.cat(samples), torch.cat([torch.arange(len(s)) for s in samples])


def _alone(text_config, samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each sample's own masks (transformers, unpacked) on the diagonal: what a packed row's masks must be."""
    alone = [_vision_masks(text_config, s, torch.arange(len(s))) for s in samples]
    return {kind: torch.block_diag(*(m[kind].int() for m in alone)).bool() for kind in alone[0]}


def test_packed_masks_are_each_sample_alone(tiny):
    """The family's masks for a packed row equal transformers' masks for each sample unpacked, on the diagonal:
    samples longer than the sliding window (16), images at different offsets, a text-only sample, and an image
    block longer than the window (unpacked, its bidirectional attention is cut by the window too)."""
    model, _ = tiny
    config = model.config.text_config
    text, image = torch.zeros, torch.ones
    samples = [torch.cat([text(2), image(4), text(16)]).long(),
               text(18).long(),
               torch.cat([text(1), image(4), text(3), image(4), text(12)]).long(),
               torch.cat([text(2), image(20), text(3)]).long()]
    assert all(len(s) > config.sliding_window for s in samples)
    types, positions = _packed(samples)
    masks = FAMILY.packed_attention_masks({"position_ids": positions[None], "token_type_ids": types[None]}, config)
    expected = _alone(config, samples)
    assert masks.keys() == expected.keys() == {"full_attention", "sliding_attention"}
    for kind, mask in masks.items():
        assert mask.shape == (1, 1, len(types), len(types)) and mask.dtype == torch.bool
        assert torch.equal(mask[0, 0], expected[kind]), kind
    assert FAMILY.packed_attention_masks({"token_type_ids": types[None]}, config) is None  # not a packed batch


def test_transformers_packed_sliding_mask_is_wrong(tiny):
    """Why the family builds its own packed masks (see the family module's docstring): for a packed row (positions
    restarting per sample, token types concatenated) transformers 5.23's full-attention mask is each sample's own
    mask on the diagonal, but its sliding-window mask reads the image blocks at each sample's positions (the first
    sample's image layout). When this test fails, transformers builds the packed sliding mask right, and gemma3
    could leave packed rows to it."""
    model, _ = tiny
    samples = [torch.tensor([0, 0, 1, 1, 1, 1, 0, 0, 0, 0]),  # an image at offset 2
               torch.zeros(8, dtype=torch.long),  # text only
               torch.tensor([0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0])]  # two images at other offsets
    packed = _vision_masks(model.config.text_config, *_packed(samples))
    expected = _alone(model.config.text_config, samples)
    assert torch.equal(packed["full_attention"], expected["full_attention"])
    wrong = (packed["sliding_attention"] != expected["sliding_attention"]).nonzero().tolist()
    assert [12, 13] in wrong, "the text-only sample no longer gets the first sample's image block"
    assert [19, 21] in wrong, "the third sample's first image keeps its bidirectional attention now"
    assert all(18 <= q < 30 and 18 <= k < 30 or 10 <= q < 18 and 10 <= k < 18 for q, k in wrong)  # within a sample


def test_pan_and_scan_stays_off(tiny_model_dir, tmp_path):
    import shutil

    path = Path(shutil.copytree(tiny_model_dir("gemma3"), tmp_path / "m"))
    processor = FAMILY.load_processor(path)
    processor.image_processor.do_pan_and_scan = True
    processor.save_pretrained(path)
    assert FAMILY.load_processor(path).image_processor.do_pan_and_scan is False


def test_catalogue_matches_the_architectures(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.memory.catalogue import lookup_model
    from vlmtune.memory.params import count_params

    for size in ("4b", "12b", "27b"):
        spec = lookup_model(f"google/gemma-3-{size}-it")
        assert spec.model_type == "gemma3" and count_params(spec).total == spec.params
        config = AutoConfig.from_pretrained(FAMILY.build_tiny(tmp_path / size, arch=size))
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == spec.params, size
