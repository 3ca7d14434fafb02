"""Helpers for the studio tests: an HTTP client for its JSON endpoints, a tiny training form, a data file with a
broken line."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


class Client:
    def __init__(self, base: str) -> None:
        self.base = base

    def call(self, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.base + path, data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=300) as res:
                return res.status, json.loads(res.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def ok(self, path: str, body: Any = None) -> Any:
        status, data = self.call(path, body)
        assert status == 200, data
        return data


def tiny_form(ws: dict[str, Path], **settings: str) -> dict[str, Any]:
    """A form training the tiny model on the shapes data on the CPU, logging every step."""
    return {"preset": "", "gpu": "RTX 4090", "settings": {
        "model.name_or_path": str(ws["model"]), "data.train_path": str(ws["train"]),
        "output_dir": "runs/tiny", "training.batch_size": "2", "training.max_steps": "6",
        "training.learning_rate": "5e-3", "training.logging_steps": "1", "training.save_steps": "100",
        "training.report_to": "[none]", "hardware.use_cpu": "true", **settings}}


def bad_data(ws: dict[str, Path]) -> Path:
    """Two good records (images by absolute path) and a broken JSON line 2."""
    lines = ws["train"].read_text(encoding="utf-8").splitlines()
    good = [json.loads(line) for line in lines[:2]]
    for record in good:
        for message in record["messages"]:
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part.get("type") == "image":
                    part["image"] = str((ws["data"] / part["image"]).resolve())
    path = ws["work"] / "bad.jsonl"
    path.write_text(json.dumps(good[0]) + "\n{not json\n" + json.dumps(good[1]) + "\n", encoding="utf-8")
    return path
