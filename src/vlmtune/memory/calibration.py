"""Compare the estimate with measured runs (the 26 H100 anchor runs, and later our own GPU calibration runs).

A measured run is a dict with the fields of tests/memory/data/h100_anchors.jsonl (one JSON object per line):
case, model, mode (lora | full_bf16 | full_mixed), gc, seq, bs, r, dropout, lora_vit, optim (fused | foreach),
n_patch (vision patches per sample), and the measured peak_alloc_MiB, peak_reserved_MiB, nvml_final_delta_MiB.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.memory.estimator import estimate
from vlmtune.memory.gpus import MIB
from vlmtune.memory.inputs import EstimateInputs


@dataclass(frozen=True)
class AnchorResult:
    case: str
    measured_alloc: float
    measured_reserved: float
    measured_total: float
    predicted_alloc: float
    predicted_reserved: float
    predicted_total: float

    @staticmethod
    def _err(pred: float, meas: float) -> float:
        return 100.0 * (pred - meas) / meas

    @property
    def err_alloc(self) -> float:
        return self._err(self.predicted_alloc, self.measured_alloc)

    @property
    def err_reserved(self) -> float:
        return self._err(self.predicted_reserved, self.measured_reserved)

    @property
    def err_total(self) -> float:
        return self._err(self.predicted_total, self.measured_total)


def run_inputs(run: dict[str, Any]) -> EstimateInputs:
    """The estimate inputs describing a measured run."""
    mode = run["mode"]
    full = mode.startswith("full")
    return EstimateInputs(
        model=run["model"].split("(")[0],
        method="full" if full else "lora",
        lora_rank=run.get("r", 16),
        lora_dropout=run.get("dropout", 0.0),
        adapt_vision_tower=bool(run.get("lora_vit")),
        freeze_vision_tower=not full or run.get("freeze_vit", False),
        batch_size=run["bs"],
        seq_len=run["seq"],
        vit_patches_per_batch=run["n_patch"] * run["bs"],
        gradient_checkpointing=run["gc"],
        precision="fp16" if mode == "full_mixed" else "bf16",
        optimizer="adamw_torch_fused" if run.get("optim", "fused") == "fused" else "adamw_torch",
    )


def compare(runs: list[dict[str, Any]]) -> list[AnchorResult]:
    out = []
    for run in runs:
        b = estimate(run_inputs(run))
        out.append(
            AnchorResult(
                run["case"],
                run["peak_alloc_MiB"],
                run["peak_reserved_MiB"],
                run["nvml_final_delta_MiB"],
                b.peak_allocated / MIB,
                b.peak_reserved / MIB,
                b.peak_total / MIB,
            )
        )
    return out


def read_runs(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def report(results: list[AnchorResult]) -> str:
    """A Markdown table: measured vs predicted (MiB) at the three levels, with the relative errors."""
    lines = [
        "| case | nvidia-smi meas | pred | err | reserved meas | pred | err | allocated meas | pred | err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.case} | {r.measured_total:.0f} | {r.predicted_total:.0f} | {r.err_total:+.1f}% "
            f"| {r.measured_reserved:.0f} | {r.predicted_reserved:.0f} | {r.err_reserved:+.1f}% "
            f"| {r.measured_alloc:.0f} | {r.predicted_alloc:.0f} | {r.err_alloc:+.1f}% |"
        )
    worst = max(results, key=lambda r: abs(r.err_total))
    mean_abs = sum(abs(r.err_total) for r in results) / len(results)
    lines.append(
        f"\nnvidia-smi level: mean |error| {mean_abs:.1f}%, worst {worst.err_total:+.1f}% ({worst.case})"
    )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m vlmtune.memory.calibration tests/memory/data/h100_anchors.jsonl
    import sys

    print(report(compare(read_runs(sys.argv[1]))))
