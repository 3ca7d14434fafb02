from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmtune.data.record_formats import parse_record
from vlmtune.data.records import ImagePart, Message, Record, TextPart, iter_records, parse_line, read_records
from vlmtune.data.split import map_image_paths
from vlmtune.errors import DataError

BASE = Path("/data/set")


def parse(obj: dict, line: int = 1) -> tuple[Record | None, list]:
    return parse_record(obj, line, BASE)


def expected_single() -> Record:
    return Record(
        1,
        [
            Message("user", [ImagePart(BASE / "a.png"), TextPart("What colour?")]),
            Message("assistant", [TextPart("red")]),
        ],
    )


CHAT = {
    "messages": [
        {
            "role": "user",
            "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What colour?"}],
        },
        {"role": "assistant", "content": "red"},
    ]
}
SHAREGPT = {
    "image": "a.png",
    "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}],
}


@pytest.mark.parametrize(
    "obj",
    [
        CHAT,
        SHAREGPT,
        {
            "image": "a.png",
            "conversations": [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "red"}],
        },
        {
            "images": ["a.png"],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            ],
        },
        {
            "images": ["a.png"],
            "messages": [
                {"role": "user", "content": "<image>What colour?"},
                {"role": "assistant", "content": "red"},
            ],
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "a.png"}},
                        {"type": "text", "text": "What colour?"},
                    ],
                },
                {"role": "assistant", "content": "red"},
            ]
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "path": "file:///data/set/a.png"},
                        {"type": "text", "text": "What colour?"},
                    ],
                },
                {"role": "assistant", "content": "red"},
            ]
        },
    ],
    ids=[
        "chat",
        "sharegpt",
        "sharegpt-no-placeholder",
        "trl-images",
        "placeholder-in-messages",
        "image_url",
        "file-uri",
    ],
)
def test_all_styles_parse_to_the_same_record(obj: dict) -> None:
    record, problems = parse(obj)
    assert problems == []
    assert record == expected_single()


def test_multi_image_order_and_placeholders_in_the_middle() -> None:
    obj = {
        "image": ["a.png", "/abs/b.jpg"],
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Compare <image> and <image>."},
            {"from": "gpt", "value": "Same."},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes."},
        ],
    }
    record, problems = parse(obj)
    assert problems == []
    assert record.images == [BASE / "a.png", Path("/abs/b.jpg")]
    assert record.messages[1].parts == [
        TextPart("Compare"),
        ImagePart(BASE / "a.png"),
        TextPart("and"),
        ImagePart(Path("/abs/b.jpg")),
        TextPart("."),
    ]
    chat = record.to_chat()
    assert chat[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert [item["type"] for item in chat[1]["content"]] == ["text", "image", "text", "image", "text"]
    assert "path" not in chat[1]["content"][1]
    assert record.to_chat(with_paths=True)[1]["content"][1] == {"type": "image", "path": str(BASE / "a.png")}


def test_paths_are_resolved_against_the_file_folder(tmp_path: Path, write_jsonl) -> None:
    path = write_jsonl(
        [
            {
                "image": "../imgs/x.png",
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "ok"}],
            }
        ],
        name="sub/d.jsonl",
    )
    (record,) = read_records(path)
    assert record.images == [tmp_path / "imgs" / "x.png"]


@pytest.mark.parametrize(
    "obj, field, fragment",
    [
        ([1, 2], "", "JSON object"),
        ({"text": "hi"}, "", "needs 'messages'"),
        ({"messages": []}, "messages", "non-empty list"),
        (
            {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "messages[0].role",
            "must be one of",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, "", "no assistant turn"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
            "messages[1]",
            "no text",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y"},
                    {"role": "user", "content": "z"},
                ]
            },
            "messages[2]",
            "ends on a user turn",
        ),
        ({"messages": [{"role": "assistant", "content": "y"}]}, "messages[0]", "starts with an assistant"),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {
                        "role": "assistant",
                        "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "y"}],
                    },
                ]
            },
            "messages[1]",
            "only appear in user turns",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "y"},
                ]
            },
            "messages[1]",
            "only come first",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "image": "https://x.org/a.png"}]},
                    {"role": "assistant", "content": "y"},
                ]
            },
            "messages[0].content[0].image",
            "URL",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "video", "video": "a.mp4"}]},
                    {"role": "assistant", "content": "y"},
                ]
            },
            "messages[0].content[0]",
            "video is not supported",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}]},
                    {"role": "assistant", "content": "y"},
                ]
            },
            "messages[0].content",
            "without a path",
        ),
        (
            {
                "image": ["a.png", "b.png"],
                "conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}],
            },
            "image",
            "must match",
        ),
        (
            {"conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}]},
            "images",
            "must match",
        ),
        (
            {
                "image": "a.png",
                "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "<image> y"}],
            },
            "conversations[1]",
            "only appear in user turns",
        ),
        (
            {"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]},
            "conversations[0].from",
            "human, gpt, system",
        ),
        ({"messages": [], "conversations": []}, "", "both"),
    ],
)
def test_schema_problems_name_the_field(obj, field: str, fragment: str) -> None:
    record, problems = parse(obj, line=7)
    assert record is None
    errors = [p for p in problems if p.severity == "error"]
    assert any(p.field == field and fragment in p.message for p in errors), errors
    assert all(p.line == 7 for p in problems)


def test_several_problems_in_one_record_are_all_reported() -> None:
    obj = {"messages": [{"role": "bot", "content": 3}, {"role": "assistant", "content": [{"type": "x"}]}]}
    _, problems = parse(obj)
    assert {p.field for p in problems} >= {
        "messages[0].role",
        "messages[0].content",
        "messages[1].content[0].type",
    }


def test_placeholder_without_images_in_chat_style_is_a_warning() -> None:
    obj = {"messages": [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "y"}]}
    record, problems = parse(obj)
    assert record is not None
    assert [p.severity for p in problems] == ["warning"]


def test_parse_line_reports_json_syntax() -> None:
    record, problems = parse_line('{"messages": [', 4, BASE)
    assert record is None
    assert problems[0].line == 4 and "invalid JSON" in problems[0].message


def test_read_records_raises_listing_every_problem(write_jsonl, chat) -> None:
    path = write_jsonl([chat(), "{bad", chat(), '{"messages": []}', ""])
    with pytest.raises(DataError) as info:
        read_records(path)
    text = str(info.value)
    assert f"{path}:2:" in text and f"{path}:4:" in text and "2 problem(s)" in text


def test_iter_records_validates_before_yielding(write_jsonl, chat) -> None:
    good = write_jsonl([chat(), "", chat(answer="blue")], name="good.jsonl")
    assert [r.line for r in iter_records(good)] == [1, 3]
    bad = write_jsonl([chat(), "{bad"], name="bad.jsonl")
    it = iter_records(bad)
    with pytest.raises(DataError):
        next(it)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        read_records(tmp_path / "empty.jsonl")


def test_map_image_paths_touches_only_image_paths() -> None:
    obj = {
        "id": 3,
        "images": ["a.png"],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "b.png"},
                    {"type": "text", "text": "c.png"},
                    {"type": "image_url", "image_url": {"url": "d.png", "detail": "low"}},
                ],
            },
            {"role": "assistant", "content": "e.png"},
        ],
    }
    mapped = map_image_paths(obj, lambda s: "X/" + s)
    assert mapped["images"] == ["X/a.png"] and mapped["id"] == 3
    content = mapped["messages"][0]["content"]
    assert content[0]["image"] == "X/b.png" and content[1]["text"] == "c.png"
    assert content[2]["image_url"] == {"url": "X/d.png", "detail": "low"}
    assert mapped["messages"][1]["content"] == "e.png"
    assert obj["images"] == ["a.png"], "the input is not modified"
    sharegpt = map_image_paths({"image": "a.png", "conversations": []}, lambda s: s.upper())
    assert sharegpt["image"] == "A.PNG"
    assert json.dumps(mapped)
