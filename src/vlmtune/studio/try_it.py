"""Try-it page: a run's adapter (or a model) answering a question about an image, next to its base model, and
`vlmtune predict --data` on a file: the predict command's own functions, models kept loaded between questions."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from vlmtune.studio.cli_args import command_text, parse


class Models:
    """Loaded models by (model, adapter); the most recent few kept (a tiny or a served model is asked again)."""

    KEEP = 2

    def __init__(self) -> None:
        self._loaded: dict[tuple[str, str, float], Any] = {}
        self.lock = threading.Lock()
        """One generation at a time: a model is not shared between threads mid-generate."""

    def get(self, model: str, adapter: str) -> Any:
        from vlmtune.export.predict import load_for_inference

        key = (model, adapter, _written(adapter or model))  # a run trained again is loaded again
        if key not in self._loaded:
            loaded = load_for_inference(model, adapter) if model and adapter else load_for_inference(model or adapter)
            while len(self._loaded) >= self.KEEP:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[key] = loaded
        return self._loaded[key]


def _written(folder: str) -> float:
    """The newest modification time of a local model or adapter folder's files (0 for a hub id)."""
    path = Path(folder)
    if not path.is_dir():
        return 0.0
    return max((f.stat().st_mtime for f in path.iterdir() if f.is_file()), default=0.0)


def _model_args(model: str, adapter: str) -> list[str]:
    return [*(["--model", model] if model else []), *(["--adapter", adapter] if adapter else [])]


def ask(models: Models, model: str, adapter: str, images: list[Path], prompt: str, compare: bool,
        max_new_tokens: int = 64) -> dict[str, Any]:
    """`vlmtune predict --image ... --prompt ...` with the adapter, and (compare) with its base model alone."""
    from vlmtune.export.loading import adapter_base
    from vlmtune.export.predict import answer

    argv = ["predict", *_model_args(model, adapter), *[a for i in images for a in ("--image", str(i))],
            "--prompt", prompt, "--max-new-tokens", str(max_new_tokens)]
    args = parse(argv)
    if not args.model and not args.adapter:
        from vlmtune.errors import VlmtuneError

        raise VlmtuneError("model: pick a run's adapter (RUN/final) or a model folder to ask")
    out: dict[str, Any] = {"command": command_text(argv)}
    with models.lock:
        tuned = models.get(args.model or "", args.adapter or "")
        out["answer"] = answer(tuned, images, prompt, max_new_tokens=max_new_tokens)
        if compare and args.adapter:
            base = args.model or adapter_base(args.adapter)
            base_argv = ["predict", "--model", base, *argv[len(_model_args(model, adapter)) + 1:]]
            out["base_command"] = command_text(base_argv)
            out["base_answer"] = answer(models.get(base, ""), images, prompt, max_new_tokens=max_new_tokens)
    return out


def predict_data(models: Models, model: str, adapter: str, data: Path, out: str = "", overwrite: bool = False,
                 max_new_tokens: int = 64) -> dict[str, Any]:
    """`vlmtune predict --data FILE [--out PATH]`: exact-match accuracy and the wrong answers (predict_file writes
    the predictions file where the CLI would, with its rules for replacing one)."""
    from vlmtune.cli.predict_cmd import predictions_path
    from vlmtune.export.predict import predict_file
    from vlmtune.outputs import check_file

    argv = ["predict", *_model_args(model, adapter), "--data", str(data), *(["--out", out] if out else []),
            "--max-new-tokens", str(max_new_tokens), *(["--overwrite"] if overwrite else [])]
    args = parse(argv)
    path = predictions_path(args)
    check_file(path, what="the predictions", overwrite=overwrite, inputs={"the data file": data})
    with models.lock:
        loaded = models.get(args.model or "", args.adapter or "")
        result = predict_file(loaded, data, path, max_new_tokens=max_new_tokens, overwrite=overwrite)
    rows = [json.loads(line) for line in result.path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"command": command_text(argv), "accuracy": result.accuracy, "total": result.total,
            "correct": result.correct, "predictions": str(result.path),
            "wrong": [r for r in rows if not r.get("correct")][:200]}
