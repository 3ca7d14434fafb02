"""Hub ids load like in every HF tool (issue 20 item 1), against a local server speaking the hub's protocol
(fake_hub.py): family detection, weights and processor through the HF cache, `model.revision`, HF_HUB_OFFLINE, and a
message within seconds when the hub is unreachable. Each check runs in a subprocess: huggingface_hub reads
HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE when it is imported, as it does for a user."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fake_hub import FakeHub

REPO_ID = "tiny-org/tiny-qwen2-vl"


def _python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def _vlmtune(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmtune.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def revisions(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """main: the tiny Qwen2-VL; v1: the same model whose config.json carries a marker."""
    v1 = tmp_path_factory.mktemp("rev-v1") / "model"
    shutil.copytree(tiny_model_dir("qwen2_vl"), v1)
    config = json.loads((v1 / "config.json").read_text())
    (v1 / "config.json").write_text(json.dumps({**config, "vlmtune_test_revision": "v1"}))
    return {"main": tiny_model_dir("qwen2_vl"), "v1": v1}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RESOLVE = """
import json, sys
from vlmtune.errors import VlmtuneError
from vlmtune.families import family_for_model
from vlmtune.hub import model_folder
out = {"family": family_for_model(sys.argv[1]).name, "family_v1": family_for_model(sys.argv[1], "v1").name}
for key, rev in (("main", None), ("v1", "v1")):
    folder = model_folder(sys.argv[1], rev)
    out[key] = [str(folder), json.loads((folder / "config.json").read_text()).get("vlmtune_test_revision")]
for key, (name, rev) in {"bad_rev": (sys.argv[1], "nope"), "bad_repo": ("tiny-org/missing", None)}.items():
    try:
        model_folder(name, rev)
    except VlmtuneError as exc:
        out[key] = str(exc)
print(json.dumps(out))
"""


def test_family_weights_and_revision_through_the_hub(revisions, tmp_path):
    with FakeHub({REPO_ID: revisions}) as hub:
        res = subprocess.run([sys.executable, "-c", RESOLVE, REPO_ID], env=hub.env(tmp_path), capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["family"] == out["family_v1"] == "qwen2_vl"
        cache = tmp_path / "hf-home" / "hub" / "models--tiny-org--tiny-qwen2-vl" / "snapshots"
        assert out["main"] == [str(cache / hub.commit(REPO_ID, "main")), None]
        assert out["v1"] == [str(cache / hub.commit(REPO_ID, "v1")), "v1"]  # model.revision pins the commit
        assert (cache / hub.commit(REPO_ID, "main") / "model.safetensors").is_file()
        assert "no revision 'nope'" in out["bad_rev"] and "model.revision" in out["bad_rev"]
        assert "no model 'tiny-org/missing'" in out["bad_repo"] and "typos" in out["bad_repo"]
        assert ("GET", f"/api/models/{REPO_ID}/revision/v1") in hub.requests


def test_unreachable_hub_is_a_message_within_seconds(tmp_path):
    env = FakeHub({}).env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n')
    code = f"""
import time, sys
import vlmtune.families, vlmtune.train.engine, vlmtune.methods  # imports are not the hub's time
from vlmtune.cli.main import main
for extra in ([], ["model.family=qwen2_vl"]):
    t = time.monotonic()
    rc = main(["train", "--model", "{REPO_ID}", "--train-data", "{data}", "output_dir={tmp_path / 'run'}", *extra])
    print("RESULT", rc, round(time.monotonic() - t, 1), file=sys.stderr)
"""
    res = _python(code, env)
    results = [line.split() for line in res.stderr.splitlines() if line.startswith("RESULT")]
    assert len(results) == 2, res.stderr[-3000:]
    for _, rc, seconds in results:  # with and without family detection (model.family)
        assert rc == "2" and float(seconds) < 10, res.stderr[-3000:]
    assert res.stderr.count("cannot reach the Hugging Face Hub at http://127.0.0.1") == 2
    assert "hf download tiny-org/tiny-qwen2-vl" in res.stderr and "Traceback" not in res.stderr
    assert "Retrying" not in res.stderr


def test_offline_without_the_model_in_the_cache(tmp_path):
    env = FakeHub({}).env(tmp_path, HF_HUB_OFFLINE="1")
    res = _python(f"from vlmtune.families import family_for_model\nfamily_for_model('{REPO_ID}')", env)
    assert res.returncode != 0
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE=1" in res.stderr


@pytest.mark.slow
def test_train_and_predict_by_hub_id(revisions, shapes_data, tmp_path):
    """`vlmtune train --model OWNER/NAME` downloads through the hub into HF_HOME and trains; `predict --adapter`
    finds that base in the adapter and loads it from the cache, offline too (no request reaches the hub)."""
    train, val = shapes_data
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "model": {"name_or_path": REPO_ID},
        "data": {"train_path": str(train)}, "method": {"name": "lora"},
        "training": {"max_steps": 2, "batch_size": 2, "logging_steps": 1, "save_steps": 100, "report_to": ["none"]},
        "hardware": {"precision": "fp32", "use_cpu": True},
    }))
    with FakeHub({REPO_ID: revisions}) as hub:
        env = hub.env(tmp_path, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        res = _vlmtune(["train", str(config)], env)
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
        meta = json.loads((tmp_path / "run" / "final" / "vlmtune.json").read_text())
        assert meta["base_model"] == REPO_ID and meta["family"] == "qwen2_vl"
        assert any(path.endswith("/model.safetensors") for _, path in hub.requests)
        seen = len(hub.requests)
        started = time.monotonic()
        res = _vlmtune(["predict", "--adapter", str(tmp_path / "run" / "final"), "--data", str(val),
                        "--out", str(tmp_path / "pred")], {**env, "HF_HUB_OFFLINE": "1"})
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
        assert (tmp_path / "pred" / "predictions.jsonl").is_file() and time.monotonic() - started < 120
        assert len(hub.requests) == seen  # offline: the cache alone


def test_data_check_without_a_model_asks_no_hub(shapes_data, tmp_path, monkeypatch, capsys):
    """No --model: the default model is not fetched (nor named as if the user had chosen it)."""
    import huggingface_hub.constants

    from vlmtune import hub
    from vlmtune.cli.main import main

    def no_hub(*args: object) -> None:
        raise AssertionError("asked the hub")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "_revision", no_hub)
    assert main(["data", "check", str(shapes_data[0])]) == 0
    out = capsys.readouterr().out
    assert "token lengths were not checked (no model named). Pass --model" in out and "Qwen" not in out
