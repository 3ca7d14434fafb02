"""Qwen's tokenizer from its `qwen.tiktoken` file, without tiktoken.

The file is tiktoken's BPE format: one `base64(token bytes) rank` per line. tiktoken encodes a pre-token by
repeatedly merging the adjacent pair whose concatenation has the lowest rank (a pre-token that is itself in the
vocabulary is taken whole). A byte-level BPE in `tokenizers` whose merges are ordered by the rank of what they
produce, with `ignore_merges`, does the same, so the file becomes a fast (Rust) tokenizer here: the same ids, no
extra dependency, and the speed transformers' tokenizers have. (transformers converts tiktoken files the same way,
but through tiktoken itself; reading the format takes ten lines.) The parity script (benchmarks/qwen_vl_parity.py)
checks the ids against the original tokenizer on tiktoken.

Special tokens follow the original `tokenization_qwen.py`: right after the file's ranks, `<|endoftext|>`,
`<|im_start|>`, `<|im_end|>`, `<|extra_0|>` ... `<|extra_204|>`, then `<ref>`, `</ref>`, `<box>`, `</box>`,
`<quad>`, `</quad>`, `<img>`, `</img>`, `<imgpad>` (151643 ... 151859 for the released vocabulary). The text is
NFC-normalised first, as the original does.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlmtune.errors import VlmtuneError
from vlmtune.families.qwen_vl_model.configuration import IMAGE_SPECIAL_TOKENS

VOCAB_FILE = "qwen.tiktoken"
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
EXTRA_TOKENS = 205
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                  *(f"<|extra_{i}|>" for i in range(EXTRA_TOKENS)), *IMAGE_SPECIAL_TOKENS)


def read_ranks(path: Path) -> dict[bytes, int]:
    """The BPE ranks of a tiktoken file; a malformed line is an error naming the file and the line."""
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise VlmtuneError(f"cannot read the Qwen-VL vocabulary {path}: {exc}; the model folder needs the Hub "
                           f"checkpoint's {VOCAB_FILE}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise VlmtuneError(f"{path}, line {number}: not a tiktoken line ('<base64 token> <rank>'); the file is "
                               f"damaged, download {VOCAB_FILE} again") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise VlmtuneError(f"{path}: the ranks are not 0..{len(ranks) - 1} without gaps; the file is damaged, "
                           f"download {VOCAB_FILE} again")
    return ranks


def write_ranks(ranks: Mapping[bytes, int], path: Path) -> None:
    lines = (base64.b64encode(token) + b" " + str(rank).encode() for token, rank in
             sorted(ranks.items(), key=lambda item: item[1]))
    path.write_bytes(b"\n".join(lines) + b"\n")


@functools.cache
def _byte_chars() -> dict[int, str]:
    """Byte-level BPE's (GPT-2's) byte -> printable character mapping."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def _unicode(token: bytes) -> str:
    chars = _byte_chars()
    return "".join(chars[b] for b in token)


def build_tokenizer(ranks: Mapping[bytes, int]) -> Any:
    """A `tokenizers.Tokenizer` equal to tiktoken on `ranks` with Qwen's pattern, plus Qwen-VL's special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {_unicode(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], _unicode(left), _unicode(right)))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def load_tokenizer(folder: Path) -> Any:
    """A `PreTrainedTokenizerFast` from `folder/qwen.tiktoken` (roles: eos `<|endoftext|>`, as the checkpoint's
    generation config; pad the same)."""
    from transformers import PreTrainedTokenizerFast

    path = folder / VOCAB_FILE
    if not path.is_file():
        raise VlmtuneError(f"{folder} has no {VOCAB_FILE}: a Qwen-VL model folder needs the Hub checkpoint's "
                           "tokenizer file (download the whole checkpoint, or build a test model with "
                           "`vlmtune tiny-model --family qwen_vl`)")
    return PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(read_ranks(path)), eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=8192)


def train_tiny_ranks(vocab_size: int) -> dict[bytes, int]:
    """A small vocabulary in tiktoken's form, trained here on vlmtune's tiny corpus (no download): the 256 bytes as
    ranks 0..255, then each learned merge's result in the order learned."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from vlmtune.families.tiny import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    to_byte = {char: byte for byte, char in _byte_chars().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        token = bytes(to_byte[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    return ranks
