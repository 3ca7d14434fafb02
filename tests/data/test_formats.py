"""Data where people already have it: every peer format in tests/data/formats/ (small files written in the shape
each tool documents) reads to the exact messages, labels and images expected, the same conversation encodes to the
same input_ids / labels / pixels in every format, and the broken cases are one clear error each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vlmtune.config.schema import DataConfig
from vlmtune.data.check import check_file
from vlmtune.data.embedded import EmbeddedImage
from vlmtune.data.processing import IGNORE_INDEX, encode
from vlmtune.data.records import Message, TextPart, read_records
from vlmtune.errors import DataError
from vlmtune.families import get_family

FORMATS = Path(__file__).parent / "formats"
IMAGES = FORMATS / "images"
RED, BLUE = IMAGES / "red.png", IMAGES / "blue.png"
Q = "What colour is the shape?"

# file (as given to data.train_path), image_root relative to FORMATS (None: beside the file)
SOURCES = {
    "canonical": ("canonical.jsonl", None),
    "llava_v1_5": ("llava_v1_5.json", "images"),
    "llamafactory_mllm_demo": ("dataset_info.json#mllm_demo", None),
    "llamafactory_alpaca": ("dataset_info.json#alpaca_mm", None),
    "llamafactory_v1": ("llamafactory_v1.jsonl", None),
    "swift": ("swift.jsonl", None),
    "trl": ("trl.jsonl", None),
    "qwen_vl_finetune": ("qwen_vl_finetune.json", "images"),
    "qwen_vl_chat": ("qwen_vl_chat.json", None),
    "axolotl": ("axolotl.jsonl", None),
    "openai": ("openai.jsonl", None),
}


def cfg(root: str | None = None, **kw) -> DataConfig:
    return DataConfig(image_root=FORMATS / root if root else None, **kw)


def load(name: str) -> list:
    file, root = SOURCES[name]
    return list(read_records(FORMATS / file, cfg(root)))


def shape(messages: list[Message]) -> list[tuple]:
    """(role, trained, parts) with images as file names, or 'embedded:<file>' for bytes equal to a sample image."""
    def part(p):
        if isinstance(p, TextPart):
            return p.text
        if isinstance(p.path, EmbeddedImage):
            same = [f.name for f in (RED, BLUE) if f.read_bytes() == p.path.data]
            return f"embedded:{same[0] if same else '?'}"
        return p.path.name
    return [(m.role, m.train, [part(p) for p in m.parts]) for m in messages]


FIRST = [("user", True, ["red.png", Q]), ("assistant", True, ["red"])]
EXPECTED_REST = {
    "canonical": [],
    "llava_v1_5": [
        [("user", True, [Q, "blue.png"]), ("assistant", True, ["blue"]), ("user", True, ["Is it dark?"]),
         ("assistant", True, ["No."])],
        [("user", True, ["Name a colour."]), ("assistant", True, ["Green."])],
    ],
    "llamafactory_mllm_demo": [
        [("user", True, ["blue.png", Q]), ("assistant", True, ["blue"]), ("user", True, ["And this one?", "red.png"]),
         ("assistant", True, ["red"])],
    ],
    "llamafactory_alpaca": [
        [("system", True, ["You are terse."]), ("user", True, ["Hi"]), ("assistant", True, ["Hello."]),
         ("user", True, ["blue.png", "Describe the colour.\nOne word."]), ("assistant", True, ["Blue."])],
    ],
    "llamafactory_v1": [
        [("user", True, ["Say hi."]), ("assistant", False, ["hi"]), ("user", True, ["blue.png", Q]),
         ("assistant", True, ["blue"])],
    ],
    "swift": [
        [("system", True, ["You are terse."]), ("user", True, ["blue.png", "Guess the colour."]),
         ("assistant", False, ["green"]), ("user", True, ["Look again."]), ("assistant", True, ["blue"])],
        [("system", True, ["You are terse."]), ("user", True, ["Hi"]), ("assistant", True, ["Hello."]),
         ("user", True, ["blue.png", Q]), ("assistant", True, ["blue"])],
    ],
    "trl": [
        [("user", True, ["blue.png", Q]), ("assistant", False, ["green"]), ("user", True, ["Sure?"]),
         ("assistant", True, ["blue"])],
        [("user", True, ["Name a colour."]), ("assistant", True, ["Green."])],
    ],
    "qwen_vl_finetune": [
        [("user", True, ["red.png", "blue.png", "Which one is blue?"]), ("assistant", True, ["The second."])],
    ],
    "qwen_vl_chat": [
        [("user", True, ["red.png", "blue.png", "Which one is blue?"]), ("assistant", True, ["The second."])],
    ],
    "axolotl": [[("user", True, ["blue.png", Q]), ("assistant", True, ["blue"])]],
    "openai": [[("system", True, ["You are terse."]), ("user", True, ["blue.png", Q]), ("assistant", True, ["blue"])]],
}
EMBEDDED = {"axolotl", "openai"}
"""Formats whose first record embeds red.png as base64 (the same pixels, no file)."""


@pytest.mark.parametrize("name", list(SOURCES))
def test_each_format_reads_to_the_exact_messages(name: str) -> None:
    records = load(name)
    first = [(r, t, ["embedded:red.png" if p == "red.png" and name in EMBEDDED else p for p in parts])
             for r, t, parts in FIRST]
    assert [shape(r.messages) for r in records] == [first] + EXPECTED_REST[name]
    for record in records:
        for image in record.images:
            assert isinstance(image, EmbeddedImage) or image.parent == IMAGES


@pytest.mark.parametrize("name", list(SOURCES))
def test_each_format_passes_data_check_with_its_counts(name: str) -> None:
    file, root = SOURCES[name]
    report = check_file(FORMATS / file, cfg(root))
    assert report.ok, report.format()
    records = load(name)
    s = report.summary
    assert s["records_ok"] == len(records) and s["warnings"] == 0
    assert s["untrained_turns"] == sum(m.role == "assistant" and not m.train for r in records for m in r.messages)
    assert s["system_prompts"] == sum(r.messages[0].role == "system" for r in records)


@pytest.fixture(scope="module")
def qwen(tiny_model_dir):
    family = get_family("qwen2_vl")
    return family, family.load_processor(tiny_model_dir("qwen2_vl"), DataConfig())


def test_the_same_conversation_encodes_identically_in_every_format(qwen) -> None:
    family, processor = qwen
    reference = encode(load("canonical")[0], processor, family, DataConfig())
    for name in SOURCES:
        sample = encode(load(name)[0], processor, family, DataConfig())
        assert torch.equal(sample.input_ids, reference.input_ids), name
        assert torch.equal(sample.labels, reference.labels), name
        assert torch.equal(sample.images["pixel_values"], reference.images["pixel_values"]), name


@pytest.mark.parametrize("name, index, trained", [
    ("swift", 1, ["blue"]), ("llamafactory_v1", 1, ["blue"]), ("trl", 1, ["blue"]),
    ("llamafactory_alpaca", 1, ["Hello.", "Blue."]),
])
def test_untrained_turns_are_unlabelled(qwen, name: str, index: int, trained: list[str]) -> None:
    family, processor = qwen
    sample = encode(load(name)[index], processor, family, DataConfig())
    labelled = sample.labels != IGNORE_INDEX
    spans, current = [], []
    for token, on in zip(sample.input_ids.tolist(), labelled.tolist(), strict=True):
        if on:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    texts = [processor.tokenizer.decode(span) for span in spans + ([current] if current else [])]
    assert texts == [f"{answer}{family.end_of_turn}" for answer in trained]


# --- image root ---------------------------------------------------------------------------------------------------

def test_without_the_image_root_the_error_names_the_path_beside_the_file() -> None:
    report = check_file(FORMATS / "llava_v1_5.json")
    assert not report.ok
    assert any(str(FORMATS / "red.png") in p.message and p.line == 2 for p in report.errors), report.format()


def test_an_image_in_neither_place_names_both(tmp_path: Path) -> None:
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}]))
    report = check_file(data, DataConfig(image_root=IMAGES))
    (error,) = report.errors
    assert (error.line, error.field) == (1, "image")
    assert f"under data.image_root ({IMAGES / 'missing.png'})" in error.message
    assert f"beside the data file ({tmp_path / 'missing.png'})" in error.message


def test_the_image_root_comes_first_then_the_data_folder(tmp_path: Path) -> None:
    shutil.copy(BLUE, tmp_path / "red.png")  # a different file of the same name beside the data
    shutil.copy(BLUE, tmp_path / "only_here.png")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"images": ["red.png", "only_here.png"], "conversations": [
        {"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}]}) + "\n")
    (record,) = read_records(data, DataConfig(image_root=IMAGES))
    assert record.images == [RED, tmp_path / "only_here.png"]


def test_image_root_from_the_command_line(capsys) -> None:
    from vlmtune.cli.main import main

    assert main(["data", "check", str(FORMATS / "llava_v1_5.json"), "--image-root", str(IMAGES)]) == 0
    assert "OK: 3 record(s)" in capsys.readouterr().out


# --- JSON arrays --------------------------------------------------------------------------------------------------

def test_a_malformed_json_array_is_one_error_naming_where(tmp_path: Path) -> None:
    good = json.loads((FORMATS / "llava_v1_5.json").read_text())
    text = json.dumps(good, indent=2)
    broken = text.replace("},\n  {", "}\n  {", 1)  # a missing comma between records 1 and 2
    path = tmp_path / "broken.json"
    path.write_text(broken)
    report = check_file(path, DataConfig(image_root=IMAGES))
    line = broken[: broken.index("}\n  {") + 2].count("\n") + 1
    assert report.summary["errors"] == 1, report.format()
    (error,) = report.errors
    assert error.line == line
    assert "the file is a JSON array" in error.message and "expected ',' or ']' after record 1" in error.message
    assert f"line {line} column 3" in error.message


def test_a_bad_record_inside_an_array_is_one_error_and_the_others_are_read(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[\n {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},\n'
                    ' {"messages": [{"role": "user" "content": "q"}]},\n'
                    ' {"messages": [{"role": "user", "content": "q2"},\n   {"role": "bot", "content": "a"}]},\n'
                    ' "just text",\n'
                    ' {"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]}\n]\n')
    report = check_file(path)
    assert [(p.line, p.field) for p in report.errors] == [(3, ""), (4, "messages[1].role"), (6, "")]
    assert ("invalid JSON in the record starting here: Expecting ',' delimiter at line 3 column 32"
            in report.errors[0].message)
    assert "got a JSON string" in report.errors[2].message
    assert report.summary["records"] == 5 and report.summary["records_ok"] == 2


@pytest.mark.parametrize("text, fragment", [
    ("[\n", "expected record 1 of the array, found the end of the file"),
    ('[\n  {"messages": [', "the file ends inside the record starting at line 2"),
    ('[{"messages": []}\n', "expected ',' or ']' after record 1"),
    ('[{"a": "unterminated}]', "ends inside a string"),
    ("[]", "the JSON array is empty"),
    ('[{"messages": []}] {"x": 1}', "text after the array's closing ']'"),
    ("[{}, ]", "expected record 2 of the array, found ']' (a comma after the last record"),
])
def test_broken_arrays(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "data.json"
    path.write_text(text)
    report = check_file(path)
    assert not report.ok and any(fragment in p.message for p in report.errors), report.format()


def test_an_oversized_record_in_an_array_is_skipped_unread(tmp_path: Path) -> None:
    small = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    big = {"messages": [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "data.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in (small, big, small)) + "\n]\n")
    report = check_file(path, DataConfig(max_record_bytes=1000))
    (error,) = report.errors
    assert error.line == 3 and "over data.max_record_bytes=1,000" in error.message
    assert report.summary["records_ok"] == 2


def test_an_array_is_read_back_by_offset(tmp_path: Path) -> None:
    records = [{"messages": [{"role": "user", "content": f"q{i} \\ \" ] }} [{{"},
                             {"role": "assistant", "content": f"a{i}"}]} for i in range(50)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=1))
    got = read_records(path)
    assert len(got) == 50 and len(got._offsets) == 50
    assert got[37].messages[0].text == 'q37 \\ " ] } [{' and got[-1].messages[1].text == "a49"
    assert [r.messages[1].text for r in got] == [f"a{i}" for i in range(50)]


# --- record styles: errors ----------------------------------------------------------------------------------------

CHAT_Q = {"role": "user", "content": "q"}


@pytest.mark.parametrize("record, field, fragment", [
    ({"messages": [CHAT_Q, {"role": "assistant", "content": "a", "loss": "no"}]}, "messages[1].loss",
     "must be true or false"),
    ({"messages": [CHAT_Q, {"role": "assistant", "content": "a", "loss_weight": 0.5}]}, "messages[1].loss_weight",
     "per-token weights are not supported"),
    ({"messages": [{**CHAT_Q, "loss": True}, {"role": "assistant", "content": "a"}]}, "messages[0].loss",
     "only assistant turns are trained"),
    ({"messages": [CHAT_Q, {"role": "assistant", "content": "a", "loss": False}]}, "", "nothing is learnt"),
    ({"messages": [CHAT_Q, {"role": "assistant", "content": "a"}], "system": "s1", "x": 1}, "x", "check the spelling"),
    ({"messages": [{"role": "system", "content": "s0"}, CHAT_Q, {"role": "assistant", "content": "a"}],
      "system": "s1"}, "system", "give it once"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "base64": "not base64!"}]},
                   {"role": "assistant", "content": "a"}]}, "messages[0].content[0].base64", "not valid base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]},
                   {"role": "assistant", "content": "a"}]}, "messages[0].content[0].image_url.url", "not an image"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "data:image/png,rawbytes"}]},
                   {"role": "assistant", "content": "a"}]}, "messages[0].content[0].image", "must be base64"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q", "value": "q"}]},
                   {"role": "assistant", "content": "a"}]}, "messages[0].content[0]", "give the text once"),
    ({"prompt": "q", "completion": [{"role": "user", "content": "a"}]}, "completion[0].role",
     "a completion holds assistant turns only"),
    ({"prompt": "q", "completion": 5}, "completion", "must be a string"),
    ({"query": "q", "response": "a", "history": [["only one"]]}, "history[0]", "must be a [query, response] pair"),
    ({"instruction": "q", "input": 3, "output": "a"}, "input", "must be a string"),
    ({"messages": [CHAT_Q], "conversations": []}, "", "use one per record"),
    ({"query": "q", "response": "a", "prompt": "q", "completion": "a"}, "", "use one per record"),
])
def test_style_errors_name_the_field(tmp_path: Path, record: dict, field: str, fragment: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n")
    report = check_file(path)
    assert any(p.field == field and fragment in p.message for p in report.errors), report.format()


def test_a_base64_image_that_is_not_an_image_is_an_error_naming_the_record(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "base64": "aGVsbG8="}]},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    report = check_file(path)
    (error,) = report.errors
    assert error.line == 1 and error.field == "image 1 (embedded)"
    assert "embedded image (line 1 messages[0].content[0].base64, 5 bytes) is not a readable image" in error.message


def test_embedded_images_are_never_written(tmp_path: Path, qwen) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FORMATS / "axolotl.jsonl", data)
    shutil.copytree(IMAGES, data / "images")
    before = sorted(p.name for p in data.rglob("*"))
    family, processor = qwen
    for record in read_records(data / "axolotl.jsonl"):
        encode(record, processor, family, DataConfig())
    assert check_file(data / "axolotl.jsonl").ok
    assert sorted(p.name for p in data.rglob("*")) == before


# --- dataset_info.json --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, fragment", [
    ("", "name one as"),
    ("#nope", "has no data set 'nope'; it lists: mllm_demo, alpaca_mm, hub_only"),
    ("#hub_only", "is on a hub (hf_hub_url"),
])
def test_dataset_info_errors(suffix: str, fragment: str) -> None:
    report = check_file(Path(f"{FORMATS / 'dataset_info.json'}{suffix}"))
    (error,) = report.errors
    assert error.line == 0 and fragment in error.message


def test_dataset_info_entry_keys_vlmtune_does_not_read(tmp_path: Path) -> None:
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"d": {"file_name": "x.json", "num_samples": 10},
                                "p": {"file_name": "x.json", "ranking": True}}))
    assert "num_samples not read" in check_file(Path(f"{info}#d")).errors[0].message
    assert "preference data" in check_file(Path(f"{info}#p")).errors[0].message


# --- convert, split -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SOURCES))
def test_convert_writes_what_is_trained_as_jsonl(tmp_path: Path, name: str) -> None:
    from vlmtune.data.convert import convert_file

    file, root = SOURCES[name]
    out = tmp_path / "out" / "converted.jsonl"
    result = convert_file(FORMATS / file, out, cfg(root))
    assert result.records == len(load(name)) and result.images_written == (name in EMBEDDED)
    again = list(read_records(out))  # plain JSONL now: no image root, no dataset_info
    expected = [shape(r.messages) for r in load(name)]
    if name in EMBEDDED:  # the embedded image is now a file of the same bytes beside the output
        (written,) = (out.parent / "converted_images").iterdir()
        assert written.read_bytes() == RED.read_bytes() and written.suffix == ".png"
        expected[0][0] = ("user", True, [written.name, Q])
    assert [shape(r.messages) for r in again] == expected
    assert "loss" in out.read_text() or all(t for r in again for _, t, _ in shape(r.messages))


def test_convert_replaces_only_its_own_output(tmp_path: Path, capsys) -> None:
    from vlmtune.cli.main import main

    out = tmp_path / "data.jsonl"
    out.write_text("mine\n")
    args = ["data", "convert", str(FORMATS / "axolotl.jsonl"), "--out", str(out)]
    assert main(args) == 2 and "not written by vlmtune" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert "wrote" in capsys.readouterr().out and main(args) == 0  # its own output: replaced without the flag
    assert main(["data", "convert", str(FORMATS / "axolotl.jsonl"), "--out", str(FORMATS / "axolotl.jsonl")]) == 2
    assert "is the data being converted" in capsys.readouterr().err


def test_split_asks_for_jsonl(tmp_path: Path) -> None:
    from vlmtune.data.split import split_file

    with pytest.raises(DataError, match=r"this is a JSON array\. Convert it first \(`vlmtune data convert"):
        split_file(FORMATS / "llava_v1_5.json", 0.5, out_dir=tmp_path)


# --- training ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in SOURCES if name != "canonical"])
def test_training_runs_on_each_format(name: str, run_config, tmp_path: Path) -> None:
    from vlmtune.train.engine import train

    file, root = SOURCES[name]
    data = {"train_path": str(FORMATS / file), "image_root": str(FORMATS / root) if root else None}
    config = run_config(out=tmp_path / "run", data=data, training={"max_steps": 2, "batch_size": 1})
    result = train(config)
    assert result.steps == 2


def test_your_own_column_names(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"img": str(RED), "question": Q, "answer": "red", "note": "x"}) + "\n"
                    + json.dumps({"dialog": [{"speaker": "user", "text": Q}, {"speaker": "assistant", "text": "red"}],
                                  "img": [str(BLUE)]}) + "\n")
    config = DataConfig(columns={"instruction": "question", "output": "answer", "images": "img",
                                 "messages": "dialog", "role": "speaker", "content": "text"})
    report = check_file(path, config)
    assert [(p.line, p.field) for p in report.errors] == [(1, "note")]  # an unmapped key is still reported
    path.write_text(path.read_text().replace(', "note": "x"', ""))
    assert [shape(r.messages) for r in read_records(path, config)] == [
        FIRST, [("user", True, ["blue.png", Q]), ("assistant", True, ["red"])]]


def test_unknown_column_keys_are_a_config_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="columns: question not a key vlmtune reads"):
        DataConfig(columns={"question": "q"})


def test_train_takes_the_image_root_as_llava_and_2u1_name_it() -> None:
    import argparse

    from vlmtune.cli import train_cmd

    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    for flag in ("--image-root", "--image_root", "--image_folder"):
        args = parser.parse_args([flag, str(IMAGES), "--train-data", str(FORMATS / "llava_v1_5.json")])
        assert train_cmd.resolve_config(args).data.image_root == IMAGES


def test_a_broken_array_is_not_counted_as_a_record(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_text(json.dumps([good, good])[:-1] + ",]")
    s = check_file(path).summary
    assert (s["records"], s["records_ok"], s["records_bad"], s["errors"]) == (2, 2, 0, 1)
