"""Tiny offline models: a family's architecture at toy size, a byte-level BPE tokenizer trained here on a built-in
corpus, the family's image processor and chat template, written with `save_pretrained` so that they load through
the same `from_pretrained` path as a real checkpoint. Nothing is downloaded.

The per-family numbers live in each descriptor (`tiny_config`, `tiny_processor`); this module is the shared part.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.errors import VlmtuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from vlmtune.families.base import FamilyDescriptor

TINY_VOCAB_SIZE = 1024

# A GPT-4-style pre-tokenizer pattern: words, single digits, punctuation runs, newlines and spaces split apart. A
# newline is its own pre-token, so text tokenized in pieces at line starts matches text tokenized whole.
_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_COLOURS = "red green blue yellow orange purple black white grey pink brown cyan".split()
_SHAPES = "circle square triangle star rectangle diamond hexagon cross ellipse line".split()
_PLACES = "left right top bottom middle centre corner edge above below beside inside".split()
_WORDS = (
    "the a an is are was were be been this that these those it its there here what which who where when why how "
    "many much some any all each every one two three four five six seven eight nine ten zero yes no not and or but "
    "of in on at to from with by for about into over under between through picture image photo shown shows see "
    "look answer question colour color shape size small large big tiny number count object objects background "
    "describe description contains contain has have do does did can could would should will please tell me you "
    "your my our we they he she his her them user assistant system helpful model data train training test value "
    "text word words sentence letter letters first second third last next other same different more less most "
    "very quite only also just then than so because if while after before again once always never sometimes "
    "hello thanks sure here okay correct wrong true false good bad best new old long short high low light dark "
    "bright pale day night time year world people thing things way part place case point fact hand eye eyes"
).split()

_CHAT_LINES = [  # default system prompts of the chat templates, so they stay short in tokens
    "You are a helpful assistant.",
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What is in the picture? ASSISTANT: A shape.",
] * 20


def corpus() -> list[str]:
    """A few thousand short sentences: the demo's visual-QA vocabulary plus common English words and digits."""
    lines = [" ".join(_WORDS[i:i + 12]) + "." for i in range(0, len(_WORDS), 6)]
    for colour, shape, place in itertools.product(_COLOURS, _SHAPES, _PLACES[:6]):
        lines.append(f"What colour is the {shape}? The {shape} is {colour}.")
        lines.append(f"Which shape is {colour}? A {colour} {shape} at the {place}.")
        lines.append(f"There is a {colour.capitalize()} {shape.capitalize()} in the {place} of the image.")
    for n in range(120):
        lines.append(f"How many objects are there? {n} objects, {n % 10} {_SHAPES[n % 10]}s and {n * 7 % 100}%.")
    lines += [word.upper() + ": " + word.capitalize() + "!" for word in _WORDS]
    return lines + _CHAT_LINES


def train_tokenizer(special_tokens: tuple[str, ...], roles: Mapping[str, str], add_bos: bool = False,
                    vocab_size: int = TINY_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus()`; `special_tokens` get ids 0..n-1 and are never split."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    if add_bos:
        bos = roles["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles)


def overlay(base: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
    """`base` with `override` merged in, nested dicts merged key by key."""
    merged = dict(base)
    for key, value in (override or {}).items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = overlay(merged[key], value)
        else:
            merged[key] = value
    return merged


@contextmanager
def random_weights(seed: int, device: str = "cpu") -> Iterator[None]:
    """Build modules inside this block with seeded random weights, without touching the caller's RNG state. On a GPU
    (`device` "cuda") the weights are built there in bf16: a full-size architecture in seconds instead of minutes of
    CPU initialisation in fp32 (benchmarks that load their random weights from disk, as a user loads real ones)."""
    import torch

    cuda = device != "cpu"
    if cuda and not torch.cuda.is_available():
        raise VlmtuneError(f"--device {device}: no CUDA GPU is visible here; build on the CPU (--device cpu)")
    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[torch.device(device).index or 0] if cuda else []), torch.device(device):
        torch.manual_seed(seed)
        if cuda:
            torch.set_default_dtype(torch.bfloat16)
        try:
            yield
        finally:
            torch.set_default_dtype(dtype)


def build_tiny(family: FamilyDescriptor, out_dir: Path, arch: Mapping[str, Any] | None, *, seed: int = 0,
               with_weights: bool = True, device: str = "cpu") -> Path:
    """Write `family`'s tiny model (or `arch`) to `out_dir`; see `FamilyDescriptor.build_tiny`."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    tokenizer = train_tokenizer(family.tiny_special_tokens, family.tiny_token_roles, family.tiny_add_bos)
    token_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in family.tiny_special_tokens}
    config = family.tiny_config(token_ids, len(tokenizer), arch)
    config.architectures = [MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)].__name__]
    processor = family.tiny_processor(tokenizer, config, full_size=arch is not None)
    roles = family.tiny_token_roles
    generation = GenerationConfig(
        bos_token_id=token_ids.get(roles.get("bos_token", "")),
        eos_token_id=[token_ids[roles["eos_token"]]] + [token_ids[t] for t in family.tiny_extra_eos],
        pad_token_id=token_ids[roles["pad_token"]],
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    if with_weights:
        with random_weights(seed, device):  # in the block's dtype (bf16 on a GPU), whatever the config says
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.get_default_dtype())
            family.tiny_init(model)
        model.generation_config = generation
        model.save_pretrained(out_dir)
    else:
        config.save_pretrained(out_dir)
        generation.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
