"""Nothing in a record is ignored silently: every field vlmtune does not read is an error naming the line and the
field (or, with data.on_ignored_field=warn, one warning per field counting the records), metadata keys are
accepted, and video is refused whatever the switch says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vlmtune.cli.main import main
from vlmtune.config.schema import DataConfig
from vlmtune.data.check import check_file
from vlmtune.data.records import read_records
from vlmtune.errors import DataError

Q = {"role": "user", "content": "What colour?"}
A = {"role": "assistant", "content": "red"}


def chat(*messages: dict, **top) -> dict:
    return {"messages": list(messages) or [Q, A], **top}


def sharegpt(*turns: dict, **top) -> dict:
    return {"conversations": list(turns) or [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], **top}


def image_item(**extra) -> dict:
    return chat({"role": "user", "content": [{"type": "image", "image": "img.png", **extra},
                                             {"type": "text", "text": "q"}]}, A)


# name: (record, field named by the error, fragment of the advice)
IGNORED = {
    "per-message weight": (chat(Q, {**A, "weight": 0.0}), "messages[1].weight", '"loss_weight": 0'),
    "per-turn ShareGPT weight": (sharegpt({"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "train": 0}),
                                 "conversations[1].train", '"loss": false'),
    "chat_template_kwargs": (chat(chat_template_kwargs={"enable_thinking": False}), "chat_template_kwargs",
                             "default arguments"),
    "resized_height": (image_item(resized_height=280), "messages[0].content[0].resized_height", "data.image_size"),
    "resized_width": (image_item(resized_width=280), "messages[0].content[0].resized_width", "data.image_size"),
    "per-image max_pixels": (image_item(max_pixels=50_000), "messages[0].content[0].max_pixels", "data.max_pixels"),
    "image_url detail": (chat({"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "img.png", "detail": "low"}}, {"type": "text", "text": "q"}]}, A),
        "messages[0].content[0].image_url.detail", "data.image_size"),
    "tools": (chat(tools=[{"type": "function"}]), "tools", "tool calling is not supported"),
    "unknown top-level key": (chat(answer_type="word"), "answer_type", "check the spelling"),
    "misspelt images key": (chat(imgs=["img.png"]), "imgs", "check the spelling"),
    "unknown message key": (chat({**Q, "name": "alice"}, A), "messages[0].name", "check the spelling"),
    "unknown ShareGPT turn key": (sharegpt({"from": "human", "value": "q", "lang": "en"}, {"from": "gpt", "value": "a"}),
                                  "conversations[0].lang", "check the spelling"),
    "unknown text item key": (chat({"role": "user", "content": [{"type": "text", "text": "q", "style": "b"}]}, A),
                              "messages[0].content[0].style", "check the spelling"),
}

VIDEO = {
    "top-level videos": chat(videos=["clip.mp4"]),
    "top-level video": sharegpt(video="clip.mp4"),
    "video content item": chat({"role": "user", "content": [{"type": "video", "video": "clip.mp4"},
                                                            {"type": "text", "text": "q"}]}, A),
    "video_url item": chat({"role": "user", "content": [{"type": "video_url", "video_url": {"url": "c.mp4"}}]}, A),
    "<video> placeholder in ShareGPT": sharegpt({"from": "human", "value": "<video>\nWhat happens?"},
                                                 {"from": "gpt", "value": "a"}),
    "<video> placeholder in chat text": chat({"role": "user", "content": "<video> what?"}, A),
    "video key in a message": chat({**Q, "video": "clip.mp4"}, A),
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    return tmp_path


def write(folder: Path, *records: dict) -> Path:
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.reliability("ignored")
@pytest.mark.parametrize("name", list(IGNORED))
def test_an_ignored_field_is_an_error_naming_it(name: str, folder: Path, capsys) -> None:
    record, field, advice = IGNORED[name]
    path = write(folder, chat(), record)
    assert main(["data", "check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    row = next(r for r in out.splitlines() if r.startswith(f"{path}:2: error: {field}:"))
    assert advice in row and "data.on_ignored_field=warn" in row, row


@pytest.mark.reliability("ignored")
@pytest.mark.parametrize("name", list(IGNORED))
def test_with_the_switch_it_is_one_warning_counting_the_records(name: str, folder: Path) -> None:
    record, field, advice = IGNORED[name]
    path = write(folder, chat(), record, record, chat(), record)
    report = check_file(path, DataConfig(on_ignored_field="warn"))
    assert report.ok and report.summary["records_ok"] == 5
    kind = field.replace("[0]", "[]").replace("[1]", "[]")
    assert report.summary["ignored_fields"] == {kind: 3}
    (warning,) = report.warnings
    assert (warning.line, warning.field) == (2, kind)
    assert "ignored in 3 record(s)" in warning.message and advice in warning.message
    assert len(read_records(path, DataConfig(on_ignored_field="warn"))) == 5  # what training reads agrees
    with pytest.raises(DataError, match=re.escape(f"{path}:2: error: {field}:")):
        read_records(path)  # the default is an error, for training's reading as for the check


@pytest.mark.reliability("ignored")
@pytest.mark.parametrize("name", list(VIDEO))
@pytest.mark.parametrize("switch", ["error", "warn"])
def test_video_is_refused_whatever_the_switch(name: str, switch: str, folder: Path, capsys) -> None:
    path = write(folder, chat(), VIDEO[name])
    assert main(["data", "check", str(path), "--on-ignored-field", switch]) == 1
    out, _ = capsys.readouterr()
    rows = [r for r in out.splitlines() if r.startswith(f"{path}:2: error:")]
    assert any("video is not supported by vlmtune yet" in r for r in rows), out


@pytest.mark.reliability("ignored")
def test_video_names_the_family_when_a_model_is_known(folder: Path, tiny_model_dir, capsys) -> None:
    path = write(folder, chat(), VIDEO["<video> placeholder in ShareGPT"])
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir("qwen2_vl"))]) == 1
    out, _ = capsys.readouterr()
    assert f"{path}:2: error: conversations[0].value: a <video> placeholder in the text: video is not supported " \
           "for qwen2_vl" in out


@pytest.mark.reliability("ignored")
def test_metadata_keys_are_accepted_silently(folder: Path) -> None:
    llava = {"id": "000000033471", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}
    path = write(folder, llava, chat(source="coco", dataset="vqa", metadata={"split": "train", "n": [1, 2]}))
    report = check_file(path)
    assert report.ok and report.warnings == [] and report.summary["ignored_fields"] == {}


@pytest.mark.reliability("ignored")
def test_a_key_given_twice_is_an_error(folder: Path) -> None:
    path = folder / "data.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q", "content": "other"}, '
                    '{"role": "assistant", "content": "a"}]}\n')
    (error,) = check_file(path).errors
    assert error.field == "content" and "JSON keeps only the last value" in error.message


@pytest.mark.reliability("ignored")
def test_training_refuses_an_ignored_field_at_its_data_check(folder: Path, run_config, monkeypatch) -> None:
    import vlmtune.methods
    from vlmtune.train.engine import train

    monkeypatch.setattr(vlmtune.methods, "get_method", lambda name: pytest.fail("the model was loaded"))
    path = write(folder, chat(), chat(tools=[{"type": "function"}]))
    with pytest.raises(DataError, match=re.escape(f"{path}:2: error: tools: tool definitions are not read")):
        train(run_config(data={"train_path": str(path)}))


@pytest.mark.slow
@pytest.mark.reliability("ignored")
def test_train_agrees_with_data_check_and_the_switch(run_config, shapes_data, tmp_path, caplog):
    # A record with a top-level `tools` column: train refuses it as data check does; with the switch it trains,
    # saying how many records carry the field.
    from vlmtune.train.engine import train

    lines = shapes_data[0].read_text().splitlines()
    tagged = [json.dumps({**json.loads(line), "tools": [{"type": "function"}]}) if i < 3 else line
              for i, line in enumerate(lines)]
    data = shapes_data[0].with_name("with_tools.jsonl")  # beside the images the records name
    data.write_text("\n".join(tagged) + "\n")
    config = run_config(out=tmp_path / "run", training={"max_steps": 1}, data={"train_path": str(data)})
    with pytest.raises(DataError, match=r"with_tools.jsonl:1: error: tools:"):
        train(config)
    config = run_config(out=tmp_path / "run2", training={"max_steps": 1},
                        data={"train_path": str(data), "on_ignored_field": "warn"})
    with caplog.at_level("WARNING"):
        result = train(config)
    assert result.steps == 1 and re.search(r"tools.*3 record", caplog.text), caplog.text[-2000:]
