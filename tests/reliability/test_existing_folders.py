"""vlmtune never deletes or overwrites what it did not create (export, predict, data split, train), and a full disk
leaves the earlier output as it was (the rule: src/vlmtune/outputs.py).

Each case snapshots the folders it points vlmtune at (every file's bytes, hidden ones included) and compares after.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest

from vlmtune.cli.main import main
from vlmtune.config.schema import VlmtuneConfig
from vlmtune.errors import VlmtuneError
from vlmtune.outputs import MARKER, STAGING_PREFIX, record

overwrite = pytest.mark.reliability("overwrite")
disk = pytest.mark.reliability("disk")


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones too) -> sha256 of its bytes; folders as 'dir'."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        found[name] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def user_folder(root: Path) -> Path:
    """A folder of the user's: a config.json of their own, notes, a subfolder."""
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"mine": true}\n')
    (root / "notes.txt").write_text("do not lose me\n")
    (root / "sub").mkdir()
    (root / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 4)
    return root


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run `vlmtune ARGV...`; (exit code, stderr). An error must be a message, never a traceback."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def no_staging_left(*folders: Path) -> bool:
    return not any(p.name.startswith(STAGING_PREFIX) for f in folders if f.exists() for p in f.rglob("*"))


@pytest.fixture(scope="session")
def red_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmtune.data.synthetic import make_shapes_vqa

    return make_shapes_vqa(tmp_path_factory.mktemp("red"), 8, seed=0, colors=["red"])


@pytest.fixture(scope="session")
def adapter(tiny_model_dir, red_data, tmp_path_factory) -> Path:
    """A LoRA adapter (output_dir/final) of the tiny qwen2_vl model, trained 2 steps once per session."""
    from vlmtune.train.engine import train

    config = VlmtuneConfig.model_validate({
        "output_dir": str(tmp_path_factory.mktemp("adapter-run") / "run"),
        "model": {"name_or_path": str(tiny_model_dir("qwen2_vl"))},
        "data": {"train_path": str(red_data)},
        "method": {"name": "lora"},
        "training": {"max_steps": 2, "batch_size": 4, "logging_steps": 1, "save_steps": 1000,
                     "report_to": ["none"]},
        "hardware": {"precision": "bf16", "use_cpu": True, "gradient_checkpointing": False},
    })
    return train(config).final_dir


@pytest.fixture
def no_loading(monkeypatch):
    """Model loading fails the test: a refusal must come before any weights are read."""
    import vlmtune.export.merge
    import vlmtune.export.predict

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the command should have been refused first")

    monkeypatch.setattr(vlmtune.export.merge, "load_model", refuse)
    monkeypatch.setattr(vlmtune.export.predict, "load_for_inference", refuse)


# ---------------------------------------------------------------- export


@overwrite
def test_export_refuses_a_user_folder_and_leaves_it_byte_for_byte(adapter, tmp_path, capsys, no_loading):
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    code, err = cli(capsys, "export", "--adapter", str(adapter), "--out", str(folder))
    assert code == 2
    assert str(folder) in err and "config.json" in err and "notes.txt" in err and "--overwrite" in err
    assert snapshot(folder) == before


@overwrite
@pytest.mark.parametrize("target", ["base", "adapter", "parent of the adapter", "parent of the base"])
def test_export_never_writes_over_its_inputs_even_with_overwrite(target, adapter, tiny_model_dir, tmp_path, capsys,
                                                                  no_loading):
    base = shutil.copytree(tiny_model_dir("qwen2_vl"), tmp_path / "models" / "base")
    own_adapter = shutil.copytree(adapter, tmp_path / "run" / "final")
    out = {"base": base, "adapter": own_adapter, "parent of the adapter": own_adapter.parent,
           "parent of the base": base.parent}[target]
    before = snapshot(tmp_path)
    code, err = cli(capsys, "export", "--adapter", str(own_adapter), "--base", str(base), "--out", str(out),
                    "--overwrite")
    assert code == 2
    role = "the base model" if "base" in target else "the adapter"
    assert f"{'is' if target in ('base', 'adapter') else 'contains'} {role}" in err
    assert "even with --overwrite" in err
    assert snapshot(tmp_path) == before


@overwrite
def test_export_into_the_current_folder(adapter, tmp_path, capsys, monkeypatch):
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    code, err = cli(capsys, "export", "--adapter", str(adapter), "--out", ".")
    assert code == 0, err
    assert (here / "config.json").is_file() and (here / MARKER).is_file()
    assert no_staging_left(here, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing written next to it

    # Again into the same (now an export): allowed, replaced in place.
    code, err = cli(capsys, "export", "--adapter", str(adapter), "--out", ".")
    assert code == 0, err


@overwrite
def test_export_into_the_current_folder_refuses_cleanly(adapter, tmp_path, capsys, monkeypatch, no_loading):
    project = user_folder(tmp_path / "project")
    monkeypatch.chdir(project)
    code, err = cli(capsys, "export", "--adapter", str(adapter), "--out", ".")
    assert code == 2 and str(project) in err and "--overwrite" in err

    shutil.copytree(adapter, project / "adapter")  # the adapter lives under the current folder
    before = snapshot(project)
    code, err = cli(capsys, "export", "--adapter", "adapter", "--out", ".", "--overwrite")
    assert code == 2 and "contains the adapter" in err
    assert snapshot(project) == before


@overwrite
def test_export_replaces_only_its_own_files(adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli(capsys, "export", "--adapter", str(adapter), "--out", str(out))[0] == 0
    first = snapshot(out)
    (out / "README.md").write_text("my notes about this model\n")
    (out / "eval").mkdir()
    (out / "eval" / "scores.csv").write_text("a,b\n1,2\n")

    # A shard an earlier export wrote and this one does not (listed in the marker), and a user's look-alike.
    (out / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    record(out, ["model-00002-of-00002.safetensors"], by="export")
    (out / "model-00003-of-00003.safetensors").write_bytes(b"the user's")

    # An earlier export: written again without --overwrite, the user's files kept, its own stale shard gone.
    code, err = cli(capsys, "export", "--adapter", str(adapter), "--out", str(out))
    assert code == 0, err
    assert not (out / "model-00002-of-00002.safetensors").exists()
    assert (out / "model-00003-of-00003.safetensors").read_bytes() == b"the user's"
    assert (out / "README.md").read_text() == "my notes about this model\n"
    assert (out / "eval" / "scores.csv").read_text() == "a,b\n1,2\n"
    assert set(first) <= set(snapshot(out))

    # A file of the export that the user edited is theirs now: refused without --overwrite, untouched.
    edited = json.loads((out / "config.json").read_text()) | {"note": "edited by hand"}
    (out / "config.json").write_text(json.dumps(edited))
    before = snapshot(out)
    code, err = cli(capsys, "export", "--adapter", str(adapter), "--out", str(out))
    assert code == 2 and "config.json" in err and "--overwrite" in err
    assert snapshot(out) == before

    code, err = cli(capsys, "export", "--adapter", str(adapter), "--out", str(out), "--overwrite")
    assert code == 0, err
    assert "note" not in json.loads((out / "config.json").read_text())
    assert (out / "README.md").read_text() == "my notes about this model\n"
    assert (out / "eval" / "scores.csv").read_text() == "a,b\n1,2\n"
    assert no_staging_left(out)


@overwrite
def test_export_overwrite_into_a_user_folder_keeps_every_other_file(adapter, tmp_path, capsys):
    folder = user_folder(tmp_path / "mine")
    code, err = cli(capsys, "export", "--adapter", str(adapter), "--out", str(folder), "--overwrite")
    assert code == 0, err
    assert (folder / "notes.txt").read_text() == "do not lose me\n"
    assert (folder / "sub" / "weights.bin").read_bytes() == bytes(range(256)) * 4
    assert "mine" not in json.loads((folder / "config.json").read_text())  # the one it writes, replaced as asked


@overwrite
def test_export_to_a_file_path_is_refused(adapter, tmp_path, capsys, no_loading):
    target = tmp_path / "model.bin"
    target.write_bytes(b"mine")
    code, err = cli(capsys, "export", "--adapter", str(adapter), "--out", str(target), "--overwrite")
    assert code == 2 and "is a file" in err
    assert target.read_bytes() == b"mine"


# ---------------------------------------------------------------- predict


def predict(capsys, tiny_model_dir, data: Path, *extra: str) -> tuple[int, str]:
    return cli(capsys, "predict", "--model", str(tiny_model_dir("qwen2_vl")), "--data", str(data),
               "--max-new-tokens", "1", *extra)


@overwrite
def test_predict_out_is_a_jsonl_file_or_a_folder(tiny_model_dir, red_data, tmp_path, capsys):
    code, err = predict(capsys, tiny_model_dir, red_data, "--out", str(tmp_path / "results"))
    assert code == 0, err
    assert (tmp_path / "results").is_dir()
    assert len((tmp_path / "results" / "predictions.jsonl").read_text().splitlines()) == 8

    code, err = predict(capsys, tiny_model_dir, red_data, "--out", str(tmp_path / "scores" / "run1.jsonl"))
    assert code == 0, err
    assert len((tmp_path / "scores" / "run1.jsonl").read_text().splitlines()) == 8

    # Its own file, written again without --overwrite.
    code, err = predict(capsys, tiny_model_dir, red_data, "--out", str(tmp_path / "scores" / "run1.jsonl"))
    assert code == 0, err
    assert no_staging_left(tmp_path)


@overwrite
def test_predict_refuses_a_file_it_did_not_write(tiny_model_dir, red_data, tmp_path, capsys, monkeypatch):
    mine = tmp_path / "results.jsonl"
    mine.write_text('{"my": "labels"}\n')
    with monkeypatch.context() as m:
        m.setattr("vlmtune.export.predict.load_for_inference", lambda *a, **k: pytest.fail("model loaded"))
        code, err = predict(capsys, tiny_model_dir, red_data, "--out", str(mine))
    assert code == 2 and str(mine) in err and "--overwrite" in err
    assert mine.read_text() == '{"my": "labels"}\n'

    code, err = predict(capsys, tiny_model_dir, red_data, "--out", str(mine), "--overwrite")
    assert code == 0, err
    assert len(mine.read_text().splitlines()) == 8


@overwrite
def test_predict_never_writes_over_its_data_file(tiny_model_dir, red_data, tmp_path, capsys, no_loading):
    data = shutil.copy(red_data, tmp_path / "val.jsonl")
    before = Path(data).read_bytes()
    code, err = predict(capsys, tiny_model_dir, Path(data), "--out", str(data), "--overwrite")
    assert code == 2 and "is the data file" in err
    assert Path(data).read_bytes() == before


# ---------------------------------------------------------------- data split


@overwrite
@pytest.mark.parametrize("name", ["train.jsonl", "val.jsonl"])
def test_split_never_writes_over_its_input(name, red_data, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    source = Path(shutil.copy(red_data, folder / name))
    before = snapshot(folder)
    code, err = cli(capsys, "data", "split", str(source), "--out", str(folder), "--overwrite")
    assert code == 2 and "is the file being split" in err
    assert snapshot(folder) == before


@overwrite
def test_split_refuses_existing_outputs_it_did_not_write(red_data, tmp_path, capsys):
    out = tmp_path / "splits"
    out.mkdir()
    (out / "val.jsonl").write_text('{"hand": "picked"}\n')
    code, err = cli(capsys, "data", "split", str(red_data), "--out", str(out))
    assert code == 2 and "val.jsonl" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["val.jsonl"]
    assert (out / "val.jsonl").read_text() == '{"hand": "picked"}\n'

    assert cli(capsys, "data", "split", str(red_data), "--out", str(out), "--overwrite")[0] == 0
    first = (out / "train.jsonl").read_text()
    # Its own split, written again (another seed) without --overwrite.
    assert cli(capsys, "data", "split", str(red_data), "--out", str(out), "--seed", "7")[0] == 0
    assert (out / "train.jsonl").read_text() != first
    # ...unless the user edited it since.
    (out / "train.jsonl").write_text(first + "\n")
    code, err = cli(capsys, "data", "split", str(red_data), "--out", str(out))
    assert code == 2 and "train.jsonl" in err
    assert (out / "train.jsonl").read_text() == first + "\n"
    assert no_staging_left(out)


# ---------------------------------------------------------------- train


def train_config(run_config, out: Path, tmp_path: Path, steps: int = 1) -> Path:
    from vlmtune.config.loader import save_config

    config = run_config(out=out, training={"max_steps": steps, "logging_steps": 1})
    return save_config(config, tmp_path / "configs" / "run.yaml")


@overwrite
def test_train_refuses_a_user_folder_and_overwrite_deletes_nothing(run_config, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("do not lose me\n")
    (folder / "results").mkdir()
    (folder / "results" / "table.csv").write_text("a,b\n")
    before = snapshot(folder)
    config = train_config(run_config, folder, tmp_path)

    code, err = cli(capsys, "train", str(config))
    assert code == 2 and str(folder) in err and "notes.txt" in err and "--overwrite" in err
    assert snapshot(folder) == before

    code, err = cli(capsys, "train", str(config), "--overwrite")
    assert code == 0, err
    after = snapshot(folder)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing of the user's changed or deleted
    assert (folder / "final" / "adapter_config.json").is_file()

    # It is a run folder now: training again into it (its checkpoints cleaned up) needs no flag.
    for checkpoint in folder.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    code, err = cli(capsys, "train", str(config))
    assert code == 0, err
    assert (folder / "notes.txt").read_text() == "do not lose me\n"


@overwrite
def test_train_into_a_fresh_or_empty_folder_needs_no_flag(run_config, tmp_path, monkeypatch):
    import vlmtune.methods
    from vlmtune.train.engine import train

    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "run"):
        seen = []

        def stop(name, out=out, seen=seen):  # the model would load now: the folder was accepted and written
            seen.append((out / "config.yaml").is_file() and (out / MARKER).is_file())
            pytest.fail("stop: the folder was accepted")

        monkeypatch.setattr(vlmtune.methods, "get_method", stop)
        with pytest.raises(pytest.fail.Exception, match="the folder was accepted"):
            train(run_config(out=out))
        assert seen == [True]
    # a run stopped before its start removes the folder it created, not one that was there
    assert (tmp_path / "empty").is_dir() and not (tmp_path / "new" / "run").exists()


@overwrite
@pytest.mark.parametrize("where", ["the base model", "the training data"])
def test_train_never_uses_a_folder_holding_its_inputs(where, run_config, tiny_model_dir, shapes_data, tmp_path):
    from vlmtune.train.engine import train

    model = shutil.copytree(tiny_model_dir("qwen2_vl"), tmp_path / "models" / "model")
    (tmp_path / "project").mkdir()
    data = Path(shutil.copy(shapes_data[0], tmp_path / "project" / "train.jsonl"))
    out = model if where == "the base model" else tmp_path / "project"
    config = run_config(out=out, model={"name_or_path": str(model)}, data={"train_path": str(data)})
    before = snapshot(tmp_path)
    with pytest.raises(VlmtuneError, match=f"(is|contains) {where}"):
        train(config, overwrite=True)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- full disk


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


class SafetensorError(Exception):
    """What safetensors raises from Rust (not an OSError)."""


@disk
@pytest.mark.parametrize("error", ["oserror", "safetensors"])
def test_export_disk_full_keeps_the_earlier_export(error, adapter, tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils

    out = tmp_path / "merged"
    assert cli(capsys, "export", "--adapter", str(adapter), "--out", str(out))[0] == 0
    (out / "README.md").write_text("mine\n")
    before = snapshot(out)

    def fill_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # part of the file made it to disk
        if error == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fill_disk)
    code, err = cli(capsys, "export", "--adapter", str(adapter), "--out", str(out))
    assert code == 2
    assert "disk is full" in err and str(out) in err and "needs about" in err
    assert snapshot(out) == before
    assert no_staging_left(out)

    fresh = tmp_path / "new" / "merged"
    code, err = cli(capsys, "export", "--adapter", str(adapter), "--out", str(fresh))
    assert code == 2 and "disk is full" in err
    assert not (tmp_path / "new").exists()  # the folders it made for the export are gone again


class FillingFile(io.TextIOWrapper):
    """A text file on a disk that fills after `room` characters (each file opened gets its own room)."""

    room = 300

    def write(self, text: str) -> int:
        self.room -= len(text)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(text)


def filling_open(path, mode="r", encoding=None):
    if "w" not in mode:
        return open(path, mode, encoding=encoding)
    return FillingFile(open(path, "wb"), encoding=encoding)


@disk
def test_split_disk_full_keeps_the_earlier_split(red_data, tmp_path, capsys, monkeypatch):
    import vlmtune.data.split

    out = tmp_path / "splits"
    assert cli(capsys, "data", "split", str(red_data), "--out", str(out))[0] == 0
    before = snapshot(out)
    monkeypatch.setattr(vlmtune.data.split, "open", filling_open, raising=False)
    code, err = cli(capsys, "data", "split", str(red_data), "--out", str(out), "--seed", "5")
    assert code == 2 and "disk is full" in err and str(out) in err
    assert snapshot(out) == before
    assert no_staging_left(out)


@disk
def test_predict_disk_full_keeps_the_earlier_predictions(tiny_model_dir, red_data, tmp_path, capsys, monkeypatch):
    import vlmtune.export.predict

    out = tmp_path / "predictions.jsonl"
    assert predict(capsys, tiny_model_dir, red_data, "--out", str(out))[0] == 0
    before = snapshot(tmp_path)
    monkeypatch.setattr(vlmtune.export.predict, "open", filling_open, raising=False)
    code, err = predict(capsys, tiny_model_dir, red_data, "--out", str(out))
    assert code == 2 and "disk is full" in err and "predictions" in err
    assert snapshot(tmp_path) == before
