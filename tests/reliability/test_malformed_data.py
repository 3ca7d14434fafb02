"""Malformed data files: every one is refused by `vlmtune data check` (exit 1) with the file, the line and the
cause, never a traceback; training refuses the same files at its data check, before any model weights load."""

from __future__ import annotations

import gzip
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

import vlmtune.methods
from vlmtune.cli.main import main
from vlmtune.errors import DataError
from vlmtune.train.engine import train

USER = {"role": "user", "content": "What colour is it?"}
ANSWER = {"role": "assistant", "content": "red"}


def chat(*messages: dict, **top) -> dict:
    return {"messages": list(messages) or [USER, ANSWER], **top}


def with_image(image: object, **item) -> dict:
    return chat({"role": "user", "content": [{"type": "image", "image": image, **item}, {"type": "text", "text": "?"}]},
                ANSWER)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixel data (a decompression bomb costs nothing to make)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def lines(*items: dict | str | bytes) -> bytes:
    out = []
    for item in items:
        if isinstance(item, dict):
            item = json.dumps(item)
        out.append(item if isinstance(item, bytes) else item.encode("utf-8"))
    return b"\n".join(out) + b"\n"


def good() -> str:
    return json.dumps(chat())


# name: (file bytes, or a function of the folder that writes what it needs and returns the bytes; the line of
# the expected error (0: the whole file); a fragment of its message)
Case = tuple[bytes | Callable[[Path], bytes], int, str]
CASES: dict[str, Case] = {
    # JSON itself
    "truncated JSON": (lines(good(), '{"messages": [{"role": "user", "content": "x"}'), 2, "invalid JSON"),
    "a broken JSON array": (lines("[" + json.dumps(chat()) + " " + json.dumps(chat()) + "]"), 1,
                            "the file is a JSON array (it starts with '['), and it is malformed at line 1"),
    "pretty-printed JSON": (json.dumps(chat(), indent=2).encode() + b"\n", 0, "one JSON object spread over several lines"),
    "a string per line": (lines(good(), '"What colour is it?"'), 2, "got a JSON string"),
    "null record": (lines("null"), 1, "got a JSON null"),
    "a number record": (lines("42"), 1, "got a JSON int"),
    "nested lists": (lines("[[[[]]]]"), 1, "got a JSON array"),
    "deep nesting": (lines('{"messages": ' + "[" * 5000 + "]" * 5000 + "}"), 1, "data.max_json_depth=32"),
    "very deep nesting": (lines("[" * 200_000), 1, "199,999 levels deep: the JSON array is not closed"),
    "a 5,000-digit number": (lines('{"messages": [], "id": ' + "9" * 5000 + "}"), 1, "thousands of digits"),
    "duplicate key": (lines('{"messages": [], "messages": ' + json.dumps([USER, ANSWER]) + "}"), 1, "key given twice"),
    "trailing garbage": (lines(good() + " xyz"), 1, "invalid JSON: Extra data"),
    # bytes and encodings
    "NUL bytes in a line": (lines(good(), b'{"messages": [\x00\x00]}'), 2, "invalid JSON"),
    "a file of NUL bytes": (b"\x00" * 4096, 1, "invalid JSON"),
    "invalid UTF-8": (lines(good(), b'{"messages": "caf\xe9"}'), 2, "not valid UTF-8"),
    "UTF-16 file": (("\ufeff" + good() + "\n").encode("utf-16-le"), 0, "UTF-16"),
    "UTF-16 file without BOM": (lines(good()).decode().encode("utf-16-le"), 0, "looks like UTF-16"),
    "gzip file": (gzip.compress(lines(good())), 0, "gzip-compressed"),
    "CRLF with a bad line": (good().encode() + b"\r\n{bad\r\n" + good().encode() + b"\r\n", 2, "invalid JSON"),
    "CR-only line ends": (good().encode() + b"\r" + good().encode() + b"\r", 1, "invalid JSON"),
    "lone surrogate in text": (lines(good(), '{"messages": [{"role": "user", "content": "a\\ud800b"}, '
                                              '{"role": "assistant", "content": "x"}]}'), 2, "lone UTF-16 surrogate"),
    "lone surrogate in an answer": (lines('{"messages": [{"role": "user", "content": "q"}, '
                                          '{"role": "assistant", "content": "\\udfff"}]}'), 1, "lone UTF-16 surrogate"),
    "lone surrogate in an image path": (lines('{"image": "a\\udc80.png", "conversations": [{"from": "human", '
                                              '"value": "<image>q"}, {"from": "gpt", "value": "a"}]}'), 1, "surrogate"),
    "lone surrogate in a key": (lines('{"messages": [], "k\\ud800": 1}'.replace("[]", json.dumps([USER, ANSWER]))),
                                1, "k\\ud800: vlmtune does not read this field"),
    "lone surrogate in a role": (lines('{"messages": [{"role": "us\\udc00er", "content": "q"}, '
                                       '{"role": "assistant", "content": "a"}]}'), 1, "got 'us\\udc00er'"),
    "huge line": (lines(good(), '{"messages": "' + "x" * (5 << 20) + '"}', good()), 2, "data.max_record_bytes"),
    "huge line without a newline": (lines(good()) + b'{"x": "' + b"y" * (5 << 20), 2, "data.max_record_bytes"),
    "text past what max_length can hold": (
        lines(chat(USER, {"role": "assistant", "content": "word " * 40_000})), 1, "data.max_text_chars"),
    # structure
    "messages is a string": (lines({"messages": "hi"}), 1, "non-empty list"),
    "messages is empty": (lines({"messages": []}), 1, "non-empty list"),
    "null message": (lines(chat(None, USER, ANSWER)), 1, "a message must be an object"),
    "missing role": (lines(chat({"content": "q"}, ANSWER)), 1, "must be one of system, user, assistant"),
    "role is a number": (lines(chat({"role": 1, "content": "q"}, ANSWER)), 1, "must be one of"),
    "content is a number": (lines(chat(USER, {"role": "assistant", "content": 42})), 1, "content must be a string"),
    "content is null": (lines(chat({"role": "user", "content": None}, ANSWER)), 1, "content must be a string"),
    "content is NaN": (lines('{"messages": [{"role": "user", "content": NaN}, {"role": "assistant", "content": "a"}]}'),
                       1, "content must be a string"),
    "empty user content": (lines(chat({"role": "user", "content": "  "}, ANSWER)), 1, "no text and no image"),
    "empty answer": (lines(chat(USER, {"role": "assistant", "content": ""})), 1, "assistant turn has no text"),
    "content item is a string": (lines(chat({"role": "user", "content": ["q"]}, ANSWER)), 1, "content item"),
    "text item with a number": (lines(chat({"role": "user", "content": [{"type": "text", "text": 5}]}, ANSWER)),
                                1, "needs a string 'text'"),
    "unknown item type": (lines(chat({"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}, ANSWER)),
                          1, "unsupported content type"),
    "ShareGPT value is a number": (lines({"conversations": [{"from": "human", "value": 7},
                                                            {"from": "gpt", "value": "a"}]}), 1, "must be a string"),
    "ShareGPT unknown speaker": (lines({"conversations": [{"from": "bot", "value": "q"},
                                                          {"from": "gpt", "value": "a"}]}), 1, "human, gpt, system"),
    "both styles": (lines({**chat(), "conversations": []}), 1, "both 'messages' and 'conversations'"),
    "neither style": (lines({"question": "q", "answer": "a"}), 1, "needs 'messages'"),
    "ends on a user turn": (lines(chat(USER, ANSWER, USER)), 1, "ends on a user turn"),
    "system message later": (lines(chat(USER, {"role": "system", "content": "s"}, ANSWER)), 1, "only come first"),
    "10k turns": (lines(chat(*[USER, ANSWER] * 5000)), 1, "turns, more than data.max_length"),
    # images
    "10k images in one record": (lambda d: _image(d) and lines({"images": ["img.png"] * 10_000, "conversations": [
        {"from": "human", "value": "<image>" * 10_000}, {"from": "gpt", "value": "a"}]}), 1, "more than data.max_length"),
    "image is a text file": (lambda d: _write(d / "notes.png", b"just text\n") or lines(with_image("notes.png")),
                             1, "not a readable image"),
    "truncated PNG": (lambda d: _truncated_png(d) or lines(with_image("cut.png")), 1, "corrupt or truncated"),
    "0-byte image": (lambda d: _write(d / "empty.png", b"") or lines(with_image("empty.png")), 1, "not a readable image"),
    "decompression bomb header": (lambda d: _write(d / "bomb.png", png_header(100_000, 100_000))
                                  or lines(with_image("bomb.png")), 1, "rejected before decoding"),
    "folder as an image": (lambda d: (d / "pics").mkdir() or lines(with_image("pics")), 1, "a folder"),
    "broken symlink": (lambda d: (d / "gone.png").symlink_to(d / "nowhere.png") or lines(with_image("gone.png")),
                       1, "broken symbolic link"),
    "FIFO as an image": (lambda d: os.mkfifo(d / "pipe.png") or lines(with_image("pipe.png")), 1, "not a regular file"),
    "a device as an image": (lines(with_image("/dev/zero")), 1, "not a regular file"),
    "missing image": (lines(with_image("missing.png")), 1, "image file not found"),
    "5,000-character image path": (lines(with_image("x" * 5000 + ".png")), 1, "over the 4,096"),
    "300-character file name": (lines(with_image("y" * 300 + ".png")), 1, "over the 255"),
    "NUL in an image path": (lines(with_image("a\u0000b.png")), 1, "NUL character"),
    "~user that does not exist": (lines(with_image("~no_such_user_here/a.png")), 1, "cannot expand '~'"),
    "http URL": (lines(with_image("https://example.com/a.png")), 1, "is a URL"),
    "image path is a number": (lines(with_image(12)), 1, "non-empty file path string"),
    "two paths in one item": (lines(with_image("a.png", path="b.png")), 1, "give the image once"),
    "image in an answer": (lambda d: _image(d) and lines(chat(USER, {"role": "assistant", "content": [
        {"type": "image", "image": "img.png"}, {"type": "text", "text": "a"}]})), 1, "only appear in user turns"),
    "placeholders and images differ": (lambda d: _image(d) and lines({"image": ["img.png", "img.png"], "conversations": [
        {"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]}), 1, "must match"),
    # the file itself
    "empty file": (b"", 0, "file is empty"),
    "only blank lines": (b"\n \n\t\n\r\n", 0, "file is empty"),
    "random bytes": (bytes(range(256)) * 64, 2, "not valid UTF-8"),
}


@pytest.mark.reliability("data")
def test_harmless_variations_are_accepted(tmp_path: Path, capsys) -> None:
    """CRLF, blank and whitespace-only lines, a byte-order mark on the first line or on any line (files joined with
    `cat`), metadata keys: not errors."""
    bom = b"\xef\xbb\xbf"
    path = tmp_path / "ok.jsonl"
    path.write_bytes(bom + good().encode() + b"\r\n\r\n   \n" + bom + json.dumps(chat(id=3, source="x")).encode()
                     + b"\r\n\t\n" + good().encode())
    assert main(["data", "check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "OK: 3 record(s), 3 ok, 0 bad; 0 error(s), 0 warning(s)" in out and err == ""


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _image(folder: Path) -> bool:
    Image.new("RGB", (8, 8), (200, 0, 0)).save(folder / "img.png")
    return True


def _truncated_png(folder: Path) -> None:
    Image.effect_noise((64, 64), 40).convert("RGB").save(folder / "full.png")
    data = (folder / "full.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])


def make_case(folder: Path, name: str) -> tuple[Path, int, str]:
    content, line, fragment = CASES[name]
    folder.mkdir(parents=True, exist_ok=True)
    data = content(folder) if callable(content) else content
    path = folder / "data.jsonl"
    path.write_bytes(data)
    return path, line, fragment


def assert_refused(path: Path, line: int, fragment: str, out: str, err: str, rc: int) -> None:
    assert rc == 1, (rc, out[-2000:], err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out
    where = f"{path}:{line}: error:" if line else f"{path}: error:"
    problems = [row for row in out.splitlines() if row.startswith(where)]
    assert problems, f"no error at {where}:\n{out[-3000:]}"
    assert any(fragment in row for row in problems), f"{fragment!r} not in:\n" + "\n".join(problems)


@pytest.mark.reliability("data")
@pytest.mark.parametrize("name", list(CASES))
def test_data_check_refuses_it_cleanly(name: str, tmp_path: Path, capsys) -> None:
    path, line, fragment = make_case(tmp_path / "case", name)
    rc = main(["data", "check", str(path)])
    out, err = capsys.readouterr()
    assert_refused(path, line, fragment, out, err, rc)


@pytest.mark.reliability("data")
@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_unreadable_image_and_file(tmp_path: Path, capsys) -> None:
    _image(tmp_path)
    (tmp_path / "img.png").chmod(0)
    path = tmp_path / "data.jsonl"
    path.write_bytes(lines(with_image("img.png")))
    rc = main(["data", "check", str(path)])
    out, err = capsys.readouterr()
    assert_refused(path, 1, "img.png", out, err, rc)
    path.chmod(0)
    rc = main(["data", "check", str(path)])
    out, err = capsys.readouterr()
    assert_refused(path, 0, "cannot open", out, err, rc)


@pytest.mark.reliability("data")
@pytest.mark.parametrize("target", ["folder", "missing"])
def test_the_data_path_itself(target: str, tmp_path: Path, capsys) -> None:
    path = tmp_path if target == "folder" else tmp_path / "nope.jsonl"
    rc = main(["data", "check", str(path)])
    out, err = capsys.readouterr()
    assert_refused(path, 0, "a folder" if target == "folder" else "does not exist", out, err, rc)


@pytest.mark.reliability("data")
def test_a_file_that_changes_after_its_check_is_refused_when_read(tmp_path: Path) -> None:
    """Training reads records back from the file by offset; a file rewritten meanwhile is a DataError, not garbage."""
    from vlmtune.data.records import read_records

    path = tmp_path / "data.jsonl"
    path.write_bytes(lines(good(), chat(USER, {"role": "assistant", "content": "blue"})))
    records = read_records(path)
    assert [r.messages[-1].text for r in records] == ["red", "blue"] and records[1].line == 2
    path.write_bytes(lines("{" * 10, "[]"))
    with pytest.raises(DataError, match=f"{path}:2: the record no longer reads as it did"):
        records[1]


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(name):
        raise AssertionError("the model was loaded although the data check should have stopped the run")

    monkeypatch.setattr(vlmtune.methods, "get_method", refuse)


TRAIN_CASES = [
    "truncated JSON", "a broken JSON array", "UTF-16 file", "lone surrogate in text", "huge line", "deep nesting",
    "text past what max_length can hold", "10k images in one record", "decompression bomb header",
    "5,000-character image path", "broken symlink", "empty answer",
]


@pytest.mark.reliability("data")
@pytest.mark.parametrize("name", TRAIN_CASES)
def test_training_refuses_it_at_its_data_check(name: str, tmp_path: Path, run_config, no_model_loading) -> None:
    path, line, fragment = make_case(tmp_path / "case", name)
    with pytest.raises(DataError) as info:
        train(run_config(data={"train_path": str(path)}))
    where = f"{path}:{line}:" if line else f"{path}: error:"
    message = str(info.value)
    assert where in message and fragment in message, message[-2000:]
