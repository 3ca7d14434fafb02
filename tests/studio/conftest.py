"""A studio server on a free port in a thread, over a workspace folder that opens the tiny model and the shapes
data too (roots: workspace, model folder, data folder)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from studio_client import Client


@pytest.fixture
def workspace(tmp_path: Path, tiny_model_dir, shapes_data, monkeypatch) -> dict[str, Path]:
    """The folders the studio opens; the working directory is the workspace (as `vlmtune studio` chdirs there)."""
    train, val = shapes_data
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return {"work": work, "model": tiny_model_dir("qwen2_vl"), "train": train, "val": val, "data": train.parent}


@pytest.fixture
def studio(workspace):
    from vlmtune.studio.paths import Roots
    from vlmtune.studio.server import make_server

    server, app = make_server(Roots.of([workspace["work"], workspace["model"], workspace["data"]]), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = Client(f"http://127.0.0.1:{app.port}")
    client.app = app
    yield client
    server.shutdown()
    server.server_close()
    app.runs.stop_all(wait=30)
    shutil.rmtree(app.state_dir, ignore_errors=True)
