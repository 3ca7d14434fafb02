from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmtune.config.schema import DataConfig
from vlmtune.data.check import TokenCount, check_file
from vlmtune.data.records import Record
from vlmtune.errors import DataError


@pytest.fixture
def messy_file(tmp_path: Path, make_image, write_jsonl, chat) -> Path:
    make_image("img.png")
    make_image("cmyk.jpg", mode="CMYK", color=(0, 255, 255, 0))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return write_jsonl(
        [
            chat(),  # 1 ok
            '{"messages": [{"role": "user", "content": "x"}',  # 2 JSON syntax
            {"prompt": "x", "answer": "y"},  # 3 no messages
            {
                "messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]
            },  # 4 role
            {"messages": [{"role": "user", "content": "x"}]},  # 5 no assistant turn
            {
                "messages": [
                    {"role": "user", "content": "x"},  # 6 image in assistant turn
                    {
                        "role": "assistant",
                        "content": [{"type": "image", "image": "img.png"}, {"type": "text", "text": "y"}],
                    },
                ]
            },
            chat(image="missing.png"),  # 7 missing image
            chat(image="broken.png"),  # 8 corrupt image
            {
                "image": ["img.png", "img.png"],
                "conversations": [  # 9 placeholder count
                    {"from": "human", "value": "<image> what?"},
                    {"from": "gpt", "value": "a"},
                ],
            },
            b'{"messages": "caf\xe9"}',  # 10 not UTF-8
            chat(image="cmyk.jpg"),  # 11 ok, converted
            "",  # 12 blank: skipped
            chat(answer="blue"),  # 13 ok
        ]
    )


def test_every_kind_of_problem_is_reported_with_its_line(messy_file: Path) -> None:
    report = check_file(messy_file)
    assert not report.ok
    by_line = {p.line: p for p in report.errors}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    expected = {
        2: "invalid JSON",
        3: "needs 'messages'",
        4: "must be one of",
        5: "no assistant turn",
        6: "only appear in user turns",
        7: "not found",
        8: "not a readable image",
        9: "must match",
        10: "not valid UTF-8",
    }
    for line, fragment in expected.items():
        assert fragment in by_line[line].message, (line, by_line[line])
    assert by_line[4].field == "messages[0].role"
    assert by_line[7].field == "image 1 (missing.png)"
    s = report.summary
    assert (s["records"], s["records_ok"], s["records_bad"]) == (12, 3, 9)
    assert s["errors"] == 9 and s["warnings"] == 0
    assert s["converted_modes"] == {"CMYK": 1}
    assert s["images"] == 5 and s["images_bad"] == 2 and s["unique_images"] == 4
    assert s["turns"] == 6 and s["assistant_turns"] == 3


def test_format_and_raise(messy_file: Path) -> None:
    report = check_file(messy_file)
    text = report.format()
    assert "FAILED" in text and f"{messy_file}:10: error:" in text
    assert "converted to RGB (not errors): CMYK x1" in text
    with pytest.raises(DataError) as info:
        report.raise_if_errors()
    assert f"{messy_file}:2:" in str(info.value)
    assert json.loads(json.dumps(report.to_dict()))["summary"]["records_bad"] == 9


def test_a_clean_file_passes(tmp_path: Path, make_image, write_jsonl, chat) -> None:
    make_image("img.png")
    report = check_file(write_jsonl([chat(), chat(answer="blue")]))
    assert report.ok and report.errors == [] and report.warnings == []
    report.raise_if_errors()
    assert "OK: 2 record(s), 2 ok, 0 bad" in report.format()


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    report = check_file(tmp_path / "empty.jsonl")
    assert not report.ok and report.errors[0].line == 0 and "empty" in report.errors[0].message
    report = check_file(tmp_path / "missing.jsonl")
    assert not report.ok and "does not exist" in report.errors[0].message


def fake_lengths(table: dict[int, int | tuple[int, int]]):
    return lambda record: table[record.line]


def test_token_lengths_over_max_length(tmp_path: Path, make_image, write_jsonl, chat) -> None:
    make_image("img.png")
    path = write_jsonl([chat()] * 4)
    lengths = fake_lengths({1: 10, 2: 50, 3: TokenCount(60, 40), 4: (20, 8)})
    report = check_file(path, DataConfig(max_length=32), lengths)
    assert report.ok, report.format()
    assert [(p.line, p.severity) for p in report.warnings] == [(2, "warning"), (3, "warning")]
    assert "truncated" in report.warnings[0].message and "dropped" in report.warnings[1].message
    s = report.summary
    assert s["over_max_length"] == 1 and s["image_overflow"] == 1
    assert s["tokens"] == {"p50": 20, "p90": 60, "p99": 60, "max": 60, "min": 10, "mean": 35.0}
    assert "p50 20, p90 60" in report.format()

    strict = check_file(path, DataConfig(max_length=32, on_overflow="error"), lengths)
    assert not strict.ok and [p.line for p in strict.errors] == [3]


def test_every_record_dropped_is_an_error(tmp_path: Path, make_image, write_jsonl, chat) -> None:
    make_image("img.png")
    report = check_file(write_jsonl([chat()] * 2), DataConfig(max_length=8), lambda r: (30, 20))
    assert not report.ok and report.errors[0].line == 0 and "none is left" in report.errors[0].message


def test_token_length_failure_is_a_problem_on_that_line(
    tmp_path: Path, make_image, write_jsonl, chat
) -> None:
    make_image("img.png")

    def boom(record: Record) -> int:
        if record.line == 2:
            raise ValueError("processor says no")
        return 5

    report = check_file(write_jsonl([chat(), chat()]), token_length=boom)
    assert [(p.line, "processor says no" in p.message) for p in report.errors] == [(2, True)]


def test_bad_records_are_not_measured(messy_file: Path) -> None:
    seen: list[int] = []
    check_file(messy_file, token_length=lambda r: seen.append(r.line) or 1)
    assert seen == [1, 11, 13]


def test_long_reports_are_cut_at_50_problems(tmp_path: Path, write_jsonl) -> None:
    report = check_file(write_jsonl(['{"messages": '] * 120))
    assert report.summary["errors"] == 120 and len(report.errors) == 120
    text = report.format()
    assert text.count(": error:") == 50 and "... and 70 more problem(s)" in text


def test_each_image_file_is_opened_once(tmp_path: Path, make_image, write_jsonl, chat, monkeypatch) -> None:
    import vlmtune.data.check as check_module

    make_image("img.png")
    calls: list[Path] = []
    real = check_module.decode_image
    monkeypatch.setattr(check_module, "decode_image", lambda p, mp: calls.append(p) or real(p, mp))
    report = check_file(write_jsonl([chat()] * 5))
    assert report.ok and len(calls) == 1 and report.summary["images"] == 5
