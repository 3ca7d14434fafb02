"""Helpers of benchmarks/gpu_multi.sh (issue 5): the mixed data set, the probe batch, the training worker that keeps
the trained model's logits, the one-GPU reload of the saved adapter, and the resume comparison.

    python benchmarks/multi_gpu.py mixed DATA.jsonl OUT.jsonl          # every second record without its image
    python benchmarks/multi_gpu.py batch MODEL DATA.jsonl BATCH.pt      # 4 records (2 with images), collated
    torchrun --standalone --nproc_per_node N benchmarks/multi_gpu.py worker CONFIG BATCH.pt LOGITS.pt
    python benchmarks/multi_gpu.py reload FINAL BATCH.pt LOGITS.pt      # one GPU: same outputs as in training?
    python benchmarks/multi_gpu.py resume WHOLE_LOG RESUMED_LOG FROM    # same losses after FROM?

`worker` trains through the engine exactly as `torchrun -m vlmtune.train CONFIG` does, then runs the probe batch
through the trained model in the training processes themselves (under ZeRO-3 every rank joins the forward, which
gathers the sharded weights); rank 0 saves the logits. Each check prints one JSON line and exits 1 when it fails.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

GPU_BATCH_DTYPE = torch.bfloat16
"""Floating inputs (pixel values) go in as bf16, the weights' dtype, in both the training processes and the reload."""


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (v.to(device, GPU_BATCH_DTYPE) if v.is_floating_point() else v.to(device)) for k, v in batch.items()
            if k != "labels"}  # without labels: speed.chunked_loss would compute the loss instead of the logits


def mixed(src: str, dst: str) -> None:
    from vlmtune.data.synthetic import text_only_every_second

    text_only_every_second(src, dst, answer=None)


def batch(model: str, data: str, out: str) -> None:
    from vlmtune.config.schema import DataConfig
    from vlmtune.data.collate import Collator
    from vlmtune.data.processing import encode
    from vlmtune.data.records import read_records
    from vlmtune.families import family_for_model

    family = family_for_model(model)
    cfg = DataConfig(image_size=448, max_length=1024)
    processor = family.load_processor(model, cfg)
    samples = [encode(r, processor, family, cfg) for r in read_records(Path(data))[:4]]
    torch.save(Collator(processor.tokenizer.pad_token_id)(samples), out)


def worker(config_path: str, batch_path: str, out_path: str) -> None:
    from transformers import TrainerCallback

    from vlmtune.config.loader import load_config
    from vlmtune.train.engine import train

    class SaveLogits(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            model.eval()
            with torch.no_grad():
                logits = model(**to_device(torch.load(batch_path), device)).logits.float().cpu()
            if os.environ.get("RANK", "0") == "0":
                torch.save(logits, out_path)

    train(load_config(config_path), callbacks=[SaveLogits()])


def reload(final: str, batch_path: str, logits_path: str) -> None:
    from vlmtune.export.predict import load_for_inference

    loaded = load_for_inference(final, device="cuda")
    with torch.no_grad():
        got = loaded.model(**to_device(torch.load(batch_path), torch.device("cuda"))).logits.float().cpu()
    want = torch.load(logits_path)
    diff = (got - want).abs()
    mask = torch.load(batch_path)["attention_mask"].bool()
    result = {
        "check": "reload_on_one_gpu",
        "max_abs_diff": round(diff[mask].max().item(), 5),
        "mean_abs_diff": round(diff[mask].mean().item(), 6),
        "logit_scale": round(want[mask].abs().mean().item(), 4),
        "argmax_agreement": round((got.argmax(-1) == want.argmax(-1))[mask].float().mean().item(), 5),
    }
    # bf16 on both sides, but ZeRO-3's gathered forward and a plain one may sum in different orders
    result["ok"] = result["argmax_agreement"] >= 0.99 and result["mean_abs_diff"] <= 0.02 * result["logit_scale"]
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


def losses(log: str) -> tuple[dict[int, float], dict]:
    rows = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    start = next((r for r in rows if r.get("event") == "start"), {})
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}, start


def resume(whole_log: str, resumed_log: str, from_step: str) -> None:
    whole, _ = losses(whole_log)
    resumed, start = losses(resumed_log)
    steps = sorted(resumed)
    rel = {s: abs(resumed[s] - whole[s]) / abs(whole[s]) for s in steps if s in whole}
    result = {
        "check": "resume",
        "resumed_from": start.get("resumed_from"),
        "processes": start.get("processes"),
        "first_step": steps[0] if steps else None,
        "last_step": steps[-1] if steps else None,
        "max_rel_loss_diff": round(max(rel.values()), 5) if rel else None,
        "whole": {s: round(whole[s], 4) for s in steps if s in whole},
        "resumed": {s: round(resumed[s], 4) for s in steps},
    }
    result["ok"] = bool(steps) and steps[0] == int(from_step) + 1 and result["max_rel_loss_diff"] <= 1e-2
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    commands = {"mixed": mixed, "batch": batch, "worker": worker, "reload": reload, "resume": resume}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])
