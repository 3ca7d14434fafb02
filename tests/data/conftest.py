"""Small helpers for the data tests: images on disk and JSONL files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """Write a small image: make_image("a.png", mode="RGB", size=(8, 8), color=...)."""

    def make(name: str = "img.png", mode: str = "RGB", size: tuple[int, int] = (8, 8), color=None) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, color if color is not None else 0).save(path)
        return path

    return make


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """Write records (dicts are dumped, strings and bytes written as they are) one per line."""

    def write(lines: list, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        chunks = []
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            chunks.append(line if isinstance(line, bytes) else line.encode("utf-8"))
        path.write_bytes(b"\n".join(chunks) + b"\n")
        return path

    return write


@pytest.fixture
def chat() -> Callable[..., dict]:
    """chat(image="img.png", question=..., answer=...) -> a valid chat-style record (image=None: text only)."""

    def make(image: str | None = "img.png", question: str = "What colour?", answer: str = "red") -> dict:
        content: list[dict] = [{"type": "image", "image": image}] if image else []
        content.append({"type": "text", "text": question})
        return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}

    return make
