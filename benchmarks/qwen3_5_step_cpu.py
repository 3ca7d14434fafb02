"""Qwen3.5's training step on the CPU, the plain transformers + PEFT loop against vlmtune's engine: aten operator calls
per step side by side (the method and code of benchmarks/gemma3_step_cpu.py, with Qwen3.5's layer pattern):

    .venv/bin/python -m benchmarks.qwen3_5_step_cpu --out /tmp/q35cpu    # ~1 min on 2 cores

Why: F7 (Qwen3.5-9B LoRA, both paths on transformers' PyTorch DeltaNet reference) is launch-bound on an H100, and
vlmtune ran it at 0.83x the plain loop in session 14 (1.20x in session 12). If vlmtune launched more operators per step
than the plain loop, that would show here. The model: the family's tiny numbers widened to hidden 256 / MLP 512 with 4
decoder layers, 3 gated DeltaNet + 1 gated attention (the real 3:1 pattern); F7's data (batch 2 x (448 px + 512 text)).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks import gemma3_step_cpu as step

ARCH = "cpu9b"


def numbers() -> dict[str, Any]:
    from vlmtune.families import get_family

    tiny = get_family("qwen3_5").tiny_numbers
    return {**tiny, "text_config": {**tiny["text_config"], "num_hidden_layers": 4, "hidden_size": 256,
                                    "intermediate_size": 512,
                                    "layer_types": ["linear_attention"] * 3 + ["full_attention"]}}


def workload() -> Any:
    from benchmarks.speed.workloads import WORKLOADS

    return replace(WORKLOADS["F7"], name="Q35cpu", arch=ARCH, warmup=2, steps=step.ACTIVE + 2)


def prepare(work: Any) -> tuple[Path, Path]:
    from benchmarks.speed import bench
    from vlmtune.families import get_family

    folder = bench.ROOT / "models" / f"qwen3_5-{ARCH}"
    if not (folder / "config.json").is_file():
        get_family("qwen3_5").build_tiny(folder, arch=numbers(), with_weights=False)
    return bench.prepare(work)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    step.workload, step.prepare = workload, prepare  # the same runner and table, this family's model and data
    step.main(["--out", str(args.out)])


if __name__ == "__main__":
    main()
