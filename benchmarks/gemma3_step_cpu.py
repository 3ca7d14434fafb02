"""Gemma 3's training step, the plain transformers + PEFT loop against vlmtune's engine, counted on the CPU:

    .venv/bin/python -m benchmarks.gemma3_step_cpu --out /tmp/g3cpu    # ~5 min on 2 cores

The model is Gemma-3-12B's attention at a small width: 6 decoder layers (5 sliding-window, 1 global, window 1024),
16 query / 8 key-value heads of 256 (GQA 2:1), hidden 256, the real 262,208-token vocabulary; a 2-layer SigLIP at
896 px (64 x 64 = 4,096 patches per image, 256 soft tokens). The data is the F5 workload's (benchmarks/speed:
batch 2 x (896 px image + 512 text) = 775 tokens per sample), the loops are the harness's own (plain.train and
engine_run.train, every layer checkpointed), under torch.profiler with CPU activities for ACTIVE steps after warm-up.

Writes per variant the harness's profile report (profiling.report) and, in `counts.md`, aten operator calls per step
by name for both paths side by side, with the host-sync and mask-building ops picked out. On the CPU nothing syncs
and SDPA has one kernel, so this shows what each path *launches*, not what a GPU waits for or which SDPA backend a
GPU picks (README of benchmarks/results/2026-12-07-gemma3-step/).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, schedule

ARCH = "cpu12b"
ARCH_NUMBERS = {
    "text_config": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 6, "num_attention_heads": 16,
                    "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256, "vocab_size": 262208,
                    "sliding_window": 1024, "layer_types": None, "max_position_embeddings": 131072,
                    "final_logit_softcapping": None, "attn_logit_softcapping": None,
                    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                           "rope_theta": 1000000.0},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 896, "patch_size": 14, "vision_use_head": False},
    "mm_tokens_per_image": 256,
}
ACTIVE = 2

SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::masked_select",
         "aten::equal", "aten::allclose")
MASK_OPS = ("aten::cumsum", "aten::__and__", "aten::__or__", "aten::bitwise_and", "aten::bitwise_or", "aten::le",
            "aten::gt", "aten::lt", "aten::ge", "aten::eq", "aten::where", "aten::arange", "aten::logical_not",
            "aten::bitwise_not", "aten::masked_fill", "aten::masked_fill_", "aten::masked_scatter", "aten::expand",
            "aten::repeat_interleave")


def workload() -> Any:
    from benchmarks.speed.workloads import WORKLOADS

    return replace(WORKLOADS["F5"], name="G3cpu", arch=ARCH, warmup=2, steps=ACTIVE + 2)


def prepare(work: Any) -> tuple[Path, Path]:
    from benchmarks.speed import bench
    from vlmtune.families import get_family

    folder = bench.ROOT / "models" / f"gemma3-{ARCH}"
    if not (folder / "config.json").is_file():
        get_family("gemma3").build_tiny(folder, arch=ARCH_NUMBERS, with_weights=False)
    return bench.prepare(work)


def run(variant_name: str, out: Path) -> dict[str, Any]:
    from benchmarks.speed import bench
    from benchmarks.speed.profiling import ProfilerCallback, _TimedTracer, report

    work = workload()
    variant = next(v for v in work.variants if v.name == variant_name)
    model, path = prepare(work)
    walls: list[float] = []
    found: dict[str, Any] = {}

    def ready(prof: Any) -> None:
        counts: dict[str, float] = defaultdict(float)
        cpu_us: dict[str, float] = defaultdict(float)
        for avg in prof.key_averages():
            counts[avg.key] += avg.count / ACTIVE
            cpu_us[avg.key] += avg.self_cpu_time_total / ACTIVE
        found.update(counts=dict(counts), self_cpu_us=dict(cpu_us))
        (out / f"profile-{variant_name}.txt").write_text(report(prof, f"G3cpu {variant_name}", walls[-ACTIVE:]))

    sched = schedule(skip_first=work.warmup, wait=0, warmup=1, active=ACTIVE, repeat=1)
    with torch.profiler.profile(activities=[ProfilerActivity.CPU], schedule=sched, on_trace_ready=ready) as prof:
        tracer = _TimedTracer(prof, walls)
        if variant.path == "vlmtune":
            from benchmarks.speed.engine_run import train

            result = train(work, variant, model, path, bench.ROOT / "runs" / f"G3cpu-{variant_name}",
                           callbacks=[ProfilerCallback(tracer)])
        else:
            result = bench.run_plain(work, variant, model, path, tracer=tracer)
    found.update(walls=walls[-ACTIVE:], speed=result.get("speed"), tokens_per_step=result.get("tokens_per_step"))
    return found


def table(results: dict[str, dict[str, Any]]) -> str:
    plain, ours = results["plain_gc"], results["vlmtune_gc"]
    aten = sorted({k for r in (plain, ours) for k in r["counts"] if k.startswith("aten::")},
                  key=lambda k: -(ours["counts"].get(k, 0) + plain["counts"].get(k, 0)))
    lines = ["| aten op | plain calls/step | vlmtune calls/step | difference | plain self CPU ms | vlmtune self CPU ms |",
             "|---|---|---|---|---|---|"]
    for key in aten:
        a, b = plain["counts"].get(key, 0), ours["counts"].get(key, 0)
        mark = " (sync)" if key in SYNCS else " (mask)" if key in MASK_OPS else ""
        lines.append(f"| {key}{mark} | {a:.0f} | {b:.0f} | {b - a:+.0f} | "
                     f"{plain['self_cpu_us'].get(key, 0) / 1e3:.1f} | {ours['self_cpu_us'].get(key, 0) / 1e3:.1f} |")
    total = {name: sum(v for k, v in r["counts"].items() if k.startswith("aten::")) for name, r in results.items()}
    head = [f"aten calls per step: plain {total['plain_gc']:.0f}, vlmtune {total['vlmtune_gc']:.0f}",
            f"step wall (profiler on, CPU): plain {[round(w, 2) for w in plain['walls']]} s, "
            f"vlmtune {[round(w, 2) for w in ours['walls']]} s",
            f"vlmtune speed switches: {json.dumps(ours.get('speed'))}", ""]
    return "\n".join(head + lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default="plain_gc,vlmtune_gc")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    results = {}
    for name in args.variants.split(","):
        started = time.perf_counter()
        results[name] = run(name, args.out)
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    (args.out / "counts.json").write_text(json.dumps(results))
    if {"plain_gc", "vlmtune_gc"} <= set(results):
        (args.out / "counts.md").write_text(table(results))
        print(table(results)[:6000])


if __name__ == "__main__":
    main()
