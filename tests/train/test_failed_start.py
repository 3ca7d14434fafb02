"""A run that fails before training starts leaves nothing behind in the folder it created (no stray config.yaml for
the next run to trip over); one that started keeps its log for the post-mortem; a folder that existed is not removed."""

from __future__ import annotations

import pytest
from transformers import TrainerCallback

from vlmtune.errors import DataError, VlmtuneError
from vlmtune.train.engine import train


def test_a_run_that_never_started_removes_its_new_folder(run_config, tmp_path):
    config = run_config("qwen2_vl", "lora", out=tmp_path / "run")
    missing = config.model_copy(update={"data": config.data.model_copy(update={"train_path": tmp_path / "nope.jsonl"})})
    with pytest.raises((DataError, VlmtuneError)):
        train(missing)
    assert not (tmp_path / "run").exists()


def test_an_existing_folder_and_its_files_stay(run_config, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    config = run_config("qwen2_vl", "lora", out=folder)
    missing = config.model_copy(update={"data": config.data.model_copy(update={"train_path": tmp_path / "nope.jsonl"})})
    with pytest.raises((DataError, VlmtuneError)):
        train(missing, overwrite=True)
    assert (folder / "notes.txt").read_text() == "keep me"


class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("boom at step 1")


@pytest.mark.slow
def test_a_run_that_started_keeps_its_log(run_config, tmp_path):
    config = run_config("qwen2_vl", "lora", out=tmp_path / "run")
    with pytest.raises(RuntimeError, match="boom"):
        train(config, callbacks=[Boom()])
    assert '"event": "start"' in (tmp_path / "run" / "train_log.jsonl").read_text()
    assert (tmp_path / "run" / "config.yaml").is_file()
