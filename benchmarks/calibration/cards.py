"""The seed card classes: `vlmtune recommend`'s config for each, trained with the process capped to that card's
memory, and whether the next larger micro-batch (or the next cheaper method) would have fit by the estimate."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.calibration.points import CARDS, CONTEXT_MIB, GIB, MIB, REPO
from benchmarks.calibration.runs import Sampler, child_env, clean, measured_row, run


def torch_total_memory() -> int:
    q = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_properties(0).total_memory)"],
                       capture_output=True, text=True, env=child_env())
    try:
        return int(q.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"no CUDA device: capping as if on 80 GiB ({q.stderr.strip().splitlines()[-1:]})", flush=True)
        return 80 * GIB


def next_fits(inputs: dict, usable: int) -> dict:
    """Estimates of the next larger micro-batch and of the next cheaper method, against the card."""
    from vlmtune.memory import EstimateInputs, estimate

    i = EstimateInputs(**{**inputs, "image_hw": tuple(inputs["image_hw"]), "lora_targets": inputs["lora_targets"]
                          if isinstance(inputs["lora_targets"], str) else tuple(inputs["lora_targets"])})
    out = {}
    patches = i.vit_patches_per_batch // i.batch_size if i.vit_patches_per_batch else None
    bigger = i.with_(batch_size=2 * i.batch_size, vit_patches_per_batch=patches * 2 * i.batch_size if patches else None)
    out["next_batch"] = {"batch_size": bigger.batch_size, "est_total_gib": round(estimate(bigger).peak_total / GIB, 2)}
    cheaper = {"qlora": {"method": "lora"}}.get(i.method) or (
        {"gradient_checkpointing": False} if i.gradient_checkpointing else None)
    if cheaper:
        out["next_cheaper"] = {**cheaper, "est_total_gib": round(estimate(i.with_(**cheaper)).peak_total / GIB, 2)}
    for v in out.values():
        v["fits_card"] = v["est_total_gib"] * GIB <= usable
        v["fits_card_with_margin"] = v["est_total_gib"] * GIB <= usable * 0.9
    return out


def run_cards(names: list[str], work: Path, out: Path, sampler: Sampler) -> None:
    from vlmtune.memory import get_gpu

    total = torch_total_memory()
    for name in names:
        gpu_name, model, data = CARDS[name]
        gpu = get_gpu(gpu_name)
        rec_file = work / f"rec_{name}.yaml"
        q = subprocess.run([sys.executable, "-m", "vlmtune.cli", "recommend", "--gpu", gpu_name, "--model",
                            str(work / model), "--data", str(work / f"data_{model}_{data}" / "train.jsonl"),
                            "--effective-batch", "64", "--json", "-o", str(rec_file)],
                           capture_output=True, text=True, cwd=REPO, env=child_env())
        row: dict = {"card": name, "gpu": gpu_name, "model": model, "usable_gib": round(gpu.usable_bytes / GIB, 2)}
        if q.returncode or not rec_file.is_file():
            row["error"] = (q.stdout + q.stderr)[-2000:]
        else:
            row["recommend"] = json.loads(q.stdout)["summary"]
            fraction = round((gpu.usable_bytes - CONTEXT_MIB * MIB) / total, 4)
            log_dir = work / "cards" / name
            log_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "vlmtune.cli", "train", str(rec_file), "model.random_init=true",
                   f"hardware.memory_fraction={fraction}", "training.max_steps=2", "training.logging_steps=1",
                   "training.save_steps=100000", "training.report_to=[none]", f"output_dir={log_dir}"]
            t0 = time.time()
            proc = run(cmd, log_dir / "stdout.log")
            rc = proc.wait()
            clean(log_dir)
            row.update(fraction=fraction, cap_gib=round(fraction * total / GIB, 2),
                       **measured_row(f"card-{name}", log_dir, proc.pid, rc, sampler, time.time() - t0))
            text = (log_dir / "stdout.log").read_text(errors="replace")
            row["outcome"] = "trained" if rc == 0 else "out of memory" if "out of GPU memory" in text else "failed"
            if row.get("inputs"):
                row["next"] = next_fits(row["inputs"], gpu.usable_bytes)
        with open(out / "cards.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"card {name}: {row.get('recommend')} -> {row.get('outcome')} {row.get('meas_total_mib')} MiB "
              f"(est {row.get('est_total_mib')}); next: {row.get('next')}", flush=True)


