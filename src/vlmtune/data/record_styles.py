"""The record styles vlmtune reads, one per tool that people bring data from, each parsed into the same turns.

A record's style is the one whose key it has (two are an error): `messages` (chat: HF / OpenAI, ms-swift,
LLaMA-Factory, axolotl, TRL), `conversations` (ShareGPT / LLaVA / Qwen), `completion` (TRL prompt-completion),
`response` (ms-swift query-response) and `instruction` (alpaca, LLaMA-Factory's default). Every style reads the
metadata keys and the keys listed in its `keys`; any other key is reported (`fields`).

- TRL: `prompt` (a string, or a list of chat messages) and `completion` (the same); only the completion is
  trained on, as TRL's `completion_only_loss` does (assistant turns inside the prompt are context).
- ms-swift: `query`, `response`, `history` (`[[query, response], ...]`, all trained on) and `system`.
- alpaca: `instruction` and `input` (joined by a newline into the user turn, as LLaMA-Factory does), `output`,
  `history` and `system`.
Images come from the top-level `images` (or `image`), placed by `<image>` placeholders or, without any, at the start
of the first user turn, in every style.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.data import fields
from vlmtune.data.record_formats import (
    Turn,
    _chat,
    _Collector,
    _preview,
    _sharegpt,
    add_system,
    message_turns,
    place_images,
)
from vlmtune.data.records import TextPart


@dataclass(frozen=True)
class Style:
    name: str
    key: str
    """The key that marks a record of this style."""
    keys: frozenset[str]
    """Every top-level key it reads."""
    parse: Callable[[dict[str, Any], Path, _Collector], list[Turn]]


def _text_turn(value: Any, where: str, role: str, out: _Collector, required: bool = True) -> Turn | None:
    if value is None and not required:
        return None
    if not isinstance(value, str):
        out.error(where, f"must be a string, got {_preview(value)}")
        return Turn(where, role)
    part = out.text(value, where)
    return Turn(where, role, [part] if part else [])


def _history(obj: dict[str, Any], out: _Collector) -> list[Turn]:
    """`history`: earlier [query, response] pairs, oldest first."""
    history = obj.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        out.error("history", 'must be a list of [query, response] pairs, e.g. [["Hi", "Hello!"]]')
        return []
    too_many = out.rules.too_many(2 * len(history), "turns")
    if too_many:
        out.error("history", too_many)
        return []
    turns: list[Turn] = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            out.error(f"history[{i}]", f"must be a [query, response] pair, got {_preview(pair)}")
            continue
        for j, role in enumerate(("user", "assistant")):
            turn = _text_turn(pair[j], f"history[{i}][{j}]", role, out)
            if turn is not None:
                turns.append(turn)
    return turns


def _side(obj: dict[str, Any], key: str, role: str, base_dir: Path, out: _Collector) -> list[Turn]:
    value = obj.get(key)
    if isinstance(value, list):
        return message_turns(value, key, base_dir, out)
    turn = _text_turn(value, key, role, out)
    return [turn] if turn else []


def _trl(obj: dict[str, Any], base_dir: Path, out: _Collector) -> list[Turn]:
    prompt = _side(obj, "prompt", "user", base_dir, out)
    completion = _side(obj, "completion", "assistant", base_dir, out)
    for turn in prompt:
        turn.train = turn.role != "assistant"  # the prompt is context, as TRL's completion_only_loss has it
    for turn in completion:
        if turn.role != "assistant":
            out.error(f"{turn.where}.role", "a completion holds assistant turns only; move other turns to 'prompt'")
    turns = prompt + completion
    place_images(obj, turns, base_dir, out)
    return turns


def _swift(obj: dict[str, Any], base_dir: Path, out: _Collector) -> list[Turn]:
    turns = _history(obj, out)
    for key, role in (("query", "user"), ("response", "assistant")):
        turn = _text_turn(obj.get(key), key, role, out)
        if turn is not None:
            turns.append(turn)
    place_images(obj, turns, base_dir, out)
    add_system(obj, turns, out)
    return turns


def _alpaca(obj: dict[str, Any], base_dir: Path, out: _Collector) -> list[Turn]:
    turns = _history(obj, out)
    instruction = _text_turn(obj.get("instruction"), "instruction", "user", out)
    extra = obj.get("input")
    if extra is not None and not isinstance(extra, str):
        out.error("input", f"must be a string, got {_preview(extra)}")
    elif extra and instruction is not None and instruction.parts and isinstance(instruction.parts[0], TextPart):
        instruction.parts[0] = TextPart(instruction.parts[0].text + "\n" + extra)
    if instruction is not None:
        turns.append(instruction)
    answer = _text_turn(obj.get("output"), "output", "assistant", out)
    if answer is not None:
        turns.append(answer)
    place_images(obj, turns, base_dir, out)
    add_system(obj, turns, out)
    return turns


STYLES: tuple[Style, ...] = (
    Style("chat", "messages", frozenset({"messages", "system"}) | fields.IMAGE_KEYS, _chat),
    Style("ShareGPT / LLaVA", "conversations", frozenset({"conversations", "system"}) | fields.IMAGE_KEYS, _sharegpt),
    Style("TRL prompt-completion", "completion", frozenset({"prompt", "completion"}) | fields.IMAGE_KEYS, _trl),
    Style("ms-swift query-response", "response", frozenset({"query", "response", "history", "system"})
          | fields.IMAGE_KEYS, _swift),
    Style("alpaca", "instruction", frozenset({"instruction", "input", "output", "history", "system"})
          | fields.IMAGE_KEYS, _alpaca),
)
