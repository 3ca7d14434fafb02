"""The offline demo: a tiny model learns a visual question-answering task it cannot solve by guessing.

    vlmtune demo --out output/demo

Builds a tiny Qwen2-VL-style model (random weights, trained tokenizer), draws a synthetic data set of coloured
shapes with Pillow whose answers can only be known by looking at the image, splits it, measures exact-match
accuracy on the held-out split, fine-tunes through the same engine as a real run, and measures again.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

DEMO_FAMILY = "qwen2_vl"
# Full fine-tuning of the tiny model: from random weights, adapters alone learn too slowly for a 5-minute demo.
DEMO_TRAINING = {
    "method": {"name": "full", "freeze_vision_tower": False},
    "data": {"max_length": 128},
    "training": {"epochs": 3, "batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 3e-3,
                 "lr_scheduler": "cosine", "warmup_ratio": 0.05, "logging_steps": 10, "eval_steps": None,
                 "save_steps": 10_000, "save_total_limit": 1, "report_to": ["none"]},
    "hardware": {"precision": "fp32", "gradient_checkpointing": False, "use_cpu": True},
}


def run_demo(out: Path, seed: int = 0, n_records: int = 400, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from vlmtune.config.loader import config_from_dict, deep_merge
    from vlmtune.data.split import split_file
    from vlmtune.data.synthetic import make_shapes_vqa
    from vlmtune.errors import VlmtuneError
    from vlmtune.export.predict import load_for_inference, predict_file
    from vlmtune.families import get_family
    from vlmtune.outputs import claim_folder, is_vlmtune_folder
    from vlmtune.outputs import record as record_output
    from vlmtune.train.engine import train

    console = Console()
    start = time.perf_counter()
    out = Path(out)
    # --out may name any folder: the demo writes only into one that is new, empty, or an earlier demo's.
    claim_folder(out, kind="demo", what="the demo", overwrite=False, option="--out",
                 signs=("summary.json", "run/train_log.jsonl"))
    out.mkdir(parents=True, exist_ok=True)
    record_output(out, kind="demo")
    console.rule("[bold]vlmtune demo")
    console.print(f"1/5 building a tiny {DEMO_FAMILY} model (random weights) in {out / 'model'}")
    model_dir = get_family(DEMO_FAMILY).build_tiny(out / "model", seed=seed)
    console.print(f"2/5 drawing {n_records} synthetic visual-QA records in {out / 'data'}")
    data_file = make_shapes_vqa(out / "data", n=n_records, seed=seed)
    train_file, val_file = split_file(data_file, val_ratio=0.2, seed=seed, out_dir=out / "splits")

    console.print("3/5 accuracy before fine-tuning (held-out split)")
    before = predict_file(load_for_inference(model_dir), val_file, out / "predictions_before.jsonl", max_new_tokens=4)

    console.print("4/5 fine-tuning")
    run_dir = out / "run"
    if run_dir.exists():  # the demo's own run from an earlier demo: start over (a real run would be refused)
        if not is_vlmtune_folder(run_dir, "run", signs=("train_log.jsonl",)):
            raise VlmtuneError(f"{run_dir} holds files the demo did not write; choose another --out")
        console.print(f"    (removing the earlier demo run in {run_dir})")
        shutil.rmtree(run_dir)
    data = {"experiment_name": "demo", "output_dir": str(run_dir),
            "model": {"name_or_path": str(model_dir)},
            "data": {"train_path": str(train_file), "val_path": str(val_file)},
            "training": {"seed": seed}}
    config = config_from_dict(deep_merge(deep_merge(DEMO_TRAINING, data), overrides or {}), source="vlmtune demo")
    result = train(config)

    console.print("5/5 accuracy after fine-tuning (held-out split)")
    after = predict_file(load_for_inference(result.final_dir), val_file, out / "predictions_after.jsonl", max_new_tokens=4)

    summary = {
        "accuracy_before": before.accuracy,
        "accuracy_after": after.accuracy,
        "train_loss_first": result.train_loss_first,
        "train_loss_last": result.train_loss_last,
        "steps": result.steps,
        "val_records": after.total,
        "seconds": round(time.perf_counter() - start, 1),
        "model_dir": str(model_dir),
        "final_dir": str(result.final_dir),
        "loss_curve": str(result.output_dir / "loss_curve.png"),
    }
    summary["passed"] = summary["accuracy_after"] >= 0.9 and summary["accuracy_after"] - summary["accuracy_before"] >= 0.3
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    table = Table(title="vlmtune demo: held-out exact-match accuracy")
    for col in ("", "accuracy", "train loss"):
        table.add_column(col)
    table.add_row("before fine-tuning", f"{before.accuracy:.2f}", f"{result.train_loss_first:.3f} (first step)")
    table.add_row("after fine-tuning", f"{after.accuracy:.2f}", f"{result.train_loss_last:.3f} (last step)")
    console.print(table)
    console.print(f"{summary['seconds']:.0f} s in all; summary in {out / 'summary.json'}, "
                  f"loss curve in {summary['loss_curve']}")
    return summary
