"""Malformed config files and impossible settings, through the CLI: each ends in one message, exit 2, no traceback;
an alias bomb, deep nesting or a huge file is refused in little memory and time; every preset still loads."""

from __future__ import annotations

import gzip
import json
import os
import random
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from vlmtune.cli.main import main
from vlmtune.config import list_presets, load_config
from vlmtune.config.presets import preset_text
from vlmtune.config.reading import MAX_BYTES, MAX_DEPTH
from vlmtune.errors import ConfigError


def _billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "\n".join([*lines, f"experiment_name: *a{levels}"]) + "\n"


def _billion_laughs_flow(levels: int) -> str:
    """The same bomb as one flow mapping, for a dotted override's value."""
    parts = ["a0: &a0 [" + ", ".join(["lol"] * 9) + "]"]
    parts += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "{" + ", ".join(parts) + "}"


def _deep_block_yaml(levels: int) -> str:
    return "".join(f"{'  ' * i}k{i}:\n" for i in range(levels)) + "  " * levels + "x: 1\n"


_PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(64))
_TEXT = "training:\n  batch_size: 2\n"

# (id, file name, content, what the message must say). The file name is always checked too.
MALFORMED = [
    ("alias-bomb", "bomb.yaml", _billion_laughs(), ["line", "more than 10,000 values", "alias"]),
    ("alias-bomb-in-merge-keys", "merge.yaml",
     "a: &a {x: 1, y: 2, z: 3}\n" + "".join(f"b{i}: &b{i} {{<<: [*{'a' if i == 0 else f'b{i - 1}'}]}}\n" for i in range(10))
     + "".join(f"c{i}: [{', '.join(['*b9'] * 50)}]\n" for i in range(300)), ["more than 10,000 values"]),
    ("recursive-alias", "recursive.yaml", "a: &a [1, *a]\n", ["line 1", "alias *a", "contains itself"]),
    ("undefined-alias", "undefined.yaml", "experiment_name: *nope\n", ["line 1", "undefined alias"]),
    ("deep-flow-yaml", "deep.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n", ["line 1", f"more than {MAX_DEPTH} levels"]),
    ("deep-block-yaml", "deep_block.yaml", _deep_block_yaml(200), [f"more than {MAX_DEPTH} levels", "line 32"]),
    ("deep-json", "deep.json", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", [f"more than {MAX_DEPTH} levels"]),
    ("deep-json-objects", "objects.json", '{"a": ' * 40 + "1" + "}" * 40, ["line 1", f"more than {MAX_DEPTH} levels"]),
    ("too-large", "large.yaml", "experiment_name: " + "x" * (MAX_BYTES + 10) + "\n", ["1 MiB", "bytes"]),
    ("many-values", "wide.yaml", "a: [" + ",".join(["0"] * 200_000) + "]\n", ["more than 10,000 values"]),
    ("many-values-json", "wide.json", '{"a": [' + ",".join(["0"] * 200_000) + "]}", ["more than 10,000 values"]),
    ("png-renamed", "photo.yaml", _PNG, ["PNG image", "save it as UTF-8 YAML or JSON"]),
    ("gzip-renamed", "packed.yaml", gzip.compress(_TEXT.encode()), ["gzip", "UTF-8"]),
    ("random-bytes", "random.yaml", random.Random(0).randbytes(4096), ["binary data", "UTF-8"]),
    ("utf16-bom", "utf16.yaml", _TEXT.encode("utf-16"), ["UTF-16", "FF FE", "save it as UTF-8"]),
    ("utf16-big-endian", "utf16be.yaml", b"\xfe\xff" + _TEXT.encode("utf-16-be"), ["UTF-16", "FE FF"]),
    ("utf16-no-bom", "utf16le.yaml", _TEXT.encode("utf-16-le"), ["UTF-16", "without a byte-order mark"]),
    ("utf32", "utf32.yaml", _TEXT.encode("utf-32"), ["UTF-32"]),
    ("latin-1", "latin1.yaml", "training:\n  seed: 1\nexperiment_name: caf\xe9\n".encode("latin-1"),
     ["line 3", "0xE9", "Latin-1", "UTF-8"]),
    ("nul-in-text", "nul.yaml", b"training:\n  batch_size: 2\x00\n", ["line 2", "NUL byte"]),
    ("control-character", "control.yaml", "training:\n  seed: 1\x1b\n", ["line 2", "#x001b"]),
    ("duplicate-section", "duplicate.yaml", "training:\n  batch_size: 2\nmethod:\n  name: lora\ntraining:\n  seed: 3\n",
     ["line 5", "'training' appears twice", "lines 1 and 5"]),
    ("duplicate-key-json", "duplicate.json", '{"training": {"seed": 1, "seed": 2}}', ["'seed' appears twice"]),
    ("impossible-date", "date.yaml", "training:\n  seed: 2024-13-01\n", ["line 2", "2024-13-01", "month"]),
    ("5000-digit-integer", "digits.yaml", "training:\n  max_steps: " + "9" * 5000 + "\n",
     ["line 2", "more than 4300 digits"]),
    ("5000-digit-integer-json", "digits.json", '{"training": {"max_steps": ' + "9" * 5000 + "}}",
     ["more than 4300 digits"]),
    ("python-object-tag", "tag.yaml", "experiment_name: !!python/object/apply:os.system [echo hi]\n",
     ["line 1", "python/object/apply:os.system"]),
    ("unclosed-bracket", "unclosed.yaml", "method: [unclosed\n", ["cannot parse"]),
    ("tab-indentation", "tabs.yaml", "training:\n\tbatch_size: 2\n", ["line 2", "cannot parse"]),
    ("two-documents", "two.yaml", "training: {seed: 1}\n---\ntraining: {seed: 2}\n", ["line 2", "single document"]),
    ("top-level-list", "list.yaml", "- training\n- method\n", ["top level must be a mapping", "list"]),
    ("top-level-number-json", "number.json", "42", ["top level must be a mapping", "int"]),
    ("json-trailing-comma", "comma.json", '{"training": {"batch_size": 2,}}', ["line 1", "cannot parse"]),
    ("jsonl-data-as-config", "train.jsonl", '{"messages": []}\n', ["JSONL data file", "--train-data"]),
    ("100k-character-key", "longkey.json", '{"' + "x" * 100_000 + '": 1}', ["unknown field", "xxx..."]),
    ("1024-character-yaml-key", "longkey.yaml", "x" * 2000 + ": 1\n", ["line 1", "cannot parse"]),
]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _assert_one_clean_message(err: str) -> None:
    assert "Traceback" not in err, err
    assert err.startswith("error: "), err
    assert "\n\n" not in err.strip(), err  # one paragraph
    assert len(err) < 3000, f"{len(err)} characters"


@pytest.mark.reliability("config")
@pytest.mark.parametrize(("name", "content", "expected"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_config_is_refused_cleanly(tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    started = time.perf_counter()
    code, err = _run(["train", str(path), "--print-config"], capsys)
    assert code == 2, err
    _assert_one_clean_message(err)
    assert str(path) in err
    for part in expected:
        assert part in err, (part, err)
    assert time.perf_counter() - started < 10


def _unreadable(tmp_path: Path) -> Path:
    path = tmp_path / "secret.yaml"
    path.write_text(_TEXT)
    path.chmod(0)
    return path


def _folder_named_yaml(tmp_path: Path) -> Path:
    (tmp_path / "c.yaml").mkdir()
    return tmp_path / "c.yaml"


def _through_a_file(tmp_path: Path) -> Path:
    (tmp_path / "f.yaml").write_text(_TEXT)
    return tmp_path / "f.yaml" / "c.yaml"


OS_CASES = {
    "missing": (lambda t: t / "missing.yaml", ["not found"]),
    "a-folder": (lambda t: t, ["is a folder", "inside it"]),
    "a-folder-named-yaml": (_folder_named_yaml, ["is a folder"]),
    "through-a-file": (_through_a_file, ["is a file, not a folder"]),
    "name-too-long": (lambda t: t / ("x" * 5000 + ".yaml"), ["too long", "5,0"]),
    "endless-device": (lambda t: Path("/dev/zero"), ["more than 1 MiB"]),
    "unreadable": (_unreadable, ["permission denied"]),
}


@pytest.mark.reliability("config")
@pytest.mark.parametrize("case", list(OS_CASES))
def test_a_config_path_that_cannot_be_read_is_one_message(tmp_path, capsys, case):
    if case == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads any file")
    make, expected = OS_CASES[case]
    path = make(tmp_path)
    code, err = _run(["train", str(path), "--print-config"], capsys)
    assert code == 2, err
    _assert_one_clean_message(err)
    assert str(path)[:100] in err
    for part in expected:
        assert part in err, (part, err)


OVERRIDES = [
    ("override-path-too-deep", ["a" + ".a" * 40 + "=1"], ["nested 41 levels deep"]),
    ("override-alias-bomb", ["experiment_name=" + _billion_laughs_flow(9)], ["more than 10,000 values"]),
    ("override-recursive-alias", ["method.lora.target_modules=&a [q_proj, *a]"], ["contains itself"]),
    ("override-deep-value", ["method.lora.target_modules=" + "[" * 3000 + "]" * 3000], ["more than 32 levels"]),
    ("override-without-value", ["training.learning_rate"], ["gives no value", "training.learning_rate=VALUE"]),
    ("override-without-key", ["=5"], ["not of the form section.field=value"]),
    ("override-into-a-value", ["training.seed=1", "training.seed.x=1"], ["'seed' is a value, not a section"]),
]


@pytest.mark.reliability("config")
@pytest.mark.parametrize(("items", "expected"), [c[1:] for c in OVERRIDES], ids=[c[0] for c in OVERRIDES])
def test_malformed_override_is_refused_cleanly(capsys, items, expected):
    code, err = _run(["train", *items, "--print-config"], capsys)
    assert code == 2, err
    _assert_one_clean_message(err)
    for part in expected:
        assert part in err, (part, err)


# (id, config file content or None, command-line items, what the message must name)
SETTINGS = [
    ("inf-learning-rate", "training:\n  learning_rate: .inf\n", [], ["training.learning_rate", "finite number"]),
    ("nan-learning-rate-flag", None, ["--lr", "nan"], ["training.learning_rate", "finite number"]),
    ("zero-learning-rate", None, ["training.learning_rate=0"], ["training.learning_rate", "greater than 0"]),
    ("negative-learning-rate", None, ["--learning-rate=-1e-4"], ["training.learning_rate", "greater than 0"]),
    ("json-NaN-literal", '{"training": {"weight_decay": NaN}}', [], ["training.weight_decay", "finite number"]),
    ("inf-grad-norm", "training:\n  max_grad_norm: .inf\n", [], ["training.max_grad_norm", "finite number"]),
    ("inf-epochs", None, ["training.epochs=.inf"], ["training.epochs", "finite number"]),
    ("nan-lora-alpha", None, ["--lora-alpha", "nan"], ["method.lora.alpha", "finite number"]),
    ("nan-lora-dropout", None, ["method.lora.dropout=.nan"], ["method.lora.dropout", "finite number"]),
    ("nan-memory-fraction", None, ["--memory-fraction", "nan"], ["hardware.memory_fraction", "finite number"]),
    ("nan-offload-ratio", None, ["distributed.offload_ratio=.nan"], ["distributed.offload_ratio", "finite number"]),
    ("batch-size-zero", "training:\n  batch_size: 0\n", [], ["training.batch_size", "greater than 0 or 'auto'"]),
    ("batch-size-negative", None, ["--batch-size", "-2"], ["training.batch_size", "greater than 0"]),
    ("accumulation-zero", None, ["--gradient-accumulation-steps", "0"], ["training.gradient_accumulation_steps"]),
    ("logging-steps-zero", None, ["training.logging_steps=0"], ["training.logging_steps", "greater than 0"]),
    ("eval-steps-zero", None, ["training.eval_steps=0"], ["training.eval_steps", "greater than 0"]),
    ("save-steps-zero", None, ["training.save_steps=0"], ["training.save_steps", "greater than 0"]),
    ("negative-seed", None, ["training.seed=-1"], ["training.seed", "greater than or equal to 0"]),
    ("empty-model", None, ["model.name_or_path="], ["model.name_or_path"]),
    ("zero-stage-without-deepspeed", None, ["--zero-stage", "3", "--no-deepspeed"],
     ["--no-deepspeed contradicts --zero-stage"]),
    ("offload-without-deepspeed", None, ["--offload", "optimizer", "--no-deepspeed"],
     ["--no-deepspeed contradicts --offload optimizer"]),
    ("deepspeed-file-and-no-deepspeed", None, ["--deepspeed", "ds.json", "--no-deepspeed"],
     ["--no-deepspeed contradicts --deepspeed"]),
    ("zero-stage-ignored-by-a-deepspeed-file", None, ["--deepspeed", "ds.json", "--zero-stage", "3"],
     ["--zero-stage does nothing with --deepspeed FILE"]),
    ("4bit-and-full", None, ["--use-4bit", "method.name=full"], ["method.name=full contradicts --use-4bit", "QLoRA"]),
    ("4bit-and-lora", None, ["--use-4bit", "method.name=lora"], ["method.name=lora contradicts --use-4bit"]),
    ("flag-and-override-disagree", None, ["--lr", "1e-4", "training.learning_rate=3e-4"],
     ["training.learning_rate=3e-4 contradicts --learning-rate"]),
    ("override-given-twice", None, ["method.lora.rank=8", "method.lora.rank=16"],
     ["method.lora.rank is given twice"]),
    ("flash-attention-and-sdpa", None, ["--flash-attn", "hardware.attn_implementation=sdpa"],
     ["contradicts --flash-attn"]),
    ("qlora-in-fp32", None, ["--use-4bit", "hardware.precision=fp32"], ["qlora needs hardware.precision"]),
]


@pytest.mark.reliability("settings")
@pytest.mark.parametrize(("content", "items", "expected"), [c[1:] for c in SETTINGS], ids=[c[0] for c in SETTINGS])
def test_impossible_setting_is_refused(tmp_path, capsys, content, items, expected):
    files = []
    if content is not None:
        files = [tmp_path / ("c.json" if content.startswith("{") else "c.yaml")]
        files[0].write_text(content)
    code, err = _run(["train", *map(str, files), *items, "--print-config"], capsys)
    assert code == 2, err
    _assert_one_clean_message(err)
    for part in expected:
        assert part in err, (part, err)


@pytest.mark.reliability("settings")
def test_every_problem_is_reported_at_once(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  learning_rate: .inf\n  batch_size: 0\n  seed: -5\nmethod:\n  lora:\n    alpha: .nan\n")
    code, err = _run(["train", str(path), "--zero-stage", "2", "--no-deepspeed", "--use-4bit", "method.name=full",
                      "hardware.memory_fraction=.inf", "--print-config"], capsys)
    assert code == 2
    _assert_one_clean_message(err)
    assert "7 configuration problem(s) in " + str(path) in err
    for part in ("training.learning_rate", "training.batch_size", "training.seed", "method.lora.alpha",
                 "hardware.memory_fraction", "--no-deepspeed contradicts", "contradicts --use-4bit"):
        assert part in err, part


@pytest.mark.reliability("settings")
def test_flag_problems_are_reported_with_an_unreadable_file(tmp_path, capsys):
    code, err = _run(["train", str(tmp_path / "missing.yaml"), "--zero-stage", "3", "--no-deepspeed",
                      "=5", "--print-config"], capsys)
    assert code == 2
    assert "3 configuration problem(s)" in err and "not found" in err and "--no-deepspeed" in err


# ---- what must keep working ----

def test_every_preset_still_loads(capsys):
    assert main(["presets", "list"]) == 0
    listed = capsys.readouterr().out
    assert set(list_presets()) <= set(listed.split()) or all(name in listed for name in list_presets())
    for name in list_presets():
        assert main(["train", "--preset", name, "--print-config"]) == 0, name
        assert yaml.safe_load(capsys.readouterr().out)["method"]["name"]


def test_valid_configs_in_every_accepted_form_load(tmp_path):
    preset = preset_text("balanced")
    forms = {
        "plain.yaml": preset,
        "bom.yaml": "\ufeff" + preset,
        "crlf.yaml": preset.replace("\n", "\r\n"),
        "anchors.yaml": "training: &t {seed: 7, batch_size: 2}\nhardware: {precision: bf16}\n",
        "merge.yaml": "x: &base {rank: 8, alpha: 16}\nmethod: {lora: {<<: *base, rank: 4}}\n",
        "config.json": json.dumps(yaml.safe_load(preset)),
    }
    for name, text in forms.items():
        (tmp_path / name).write_text(text, encoding="utf-8", newline="")
    assert load_config(tmp_path / "plain.yaml") == load_config(tmp_path / "bom.yaml") == \
        load_config(tmp_path / "crlf.yaml") == load_config(tmp_path / "config.json")
    assert load_config(tmp_path / "anchors.yaml").training.seed == 7
    with pytest.raises(ConfigError) as info:  # the anchor's own key is still a key; the merged section is valid
        load_config(tmp_path / "merge.yaml")
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith("x: unknown field")
    assert load_config(overrides=["method.lora.target_modules=[q_proj, v_proj]", "training.batch_size=auto"]) \
        .method.lora.target_modules == ["q_proj", "v_proj"]


def test_a_high_learning_rate_is_a_warning_not_an_error(capsys, caplog):
    assert main(["train", "--lr", "0.5", "--print-config"]) == 0
    assert "training.learning_rate=0.5 is far above" in caplog.text


def test_use_4bit_over_a_full_preset_says_so(capsys, caplog):
    caplog.set_level("INFO")
    assert main(["train", "--preset", "full_finetune", "--use-4bit", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["method"]["name"] == "qlora"
    assert "--use-4bit: method.name full (from preset full_finetune) becomes qlora" in caplog.text


# ---- bounded memory and time ----

BOUNDED = {
    "alias-bomb": ("bomb.yaml", _billion_laughs(9)),
    "alias-bomb-12-levels": ("bomb12.yaml", _billion_laughs(12)),
    "deep-yaml": ("deep.yaml", "a: " + "[" * 200_000 + "]" * 200_000),
    "deep-json": ("deep.json", "[" * 500_000 + "]" * 500_000),
    "1-MiB-of-values": ("wide.yaml", "a: [" + ",".join(["0"] * (MAX_BYTES // 2 - 8)) + "]"),
}


@pytest.mark.reliability("memory")
@pytest.mark.parametrize("case", list(BOUNDED))
def test_hostile_config_is_refused_in_bounded_memory_and_time(tmp_path, case, reliability_note):
    name, text = BOUNDED[case]
    path = tmp_path / name
    path.write_text(text)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ConfigError):
            load_config(path)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    reliability_note(f"config {case} ({path.stat().st_size:,} bytes): refused in {seconds:.2f} s, "
                     f"peak {peak / 2**20:.1f} MiB traced")
    assert peak < 64 * 2**20, f"{peak / 2**20:.1f} MiB"
    assert seconds < 10
