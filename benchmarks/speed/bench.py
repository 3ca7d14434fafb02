"""Issue #6 speed harness: the same model on the same batches through the plain reference path, the plain path with
Liger kernels (when liger-kernel imports) and vlmtune's engine; tokens/s, peak allocated / reserved, nvidia-smi-level
memory, ratios to the reference, MFU. Run on the GPU machine from the repo root (benchmarks/speed/run.sh does):

    python3 -m benchmarks.speed.bench suite --part 1 --out $OUT     # W1 + the correctness check
    python3 -m benchmarks.speed.bench suite --part 2 --out $OUT     # W3 + W4
    python3 -m benchmarks.speed.bench suite --part 3 --out $OUT     # W2 + W5
    python3 -m benchmarks.speed.bench table $OUT/results.jsonl      # the table again

Every variant runs in its own process (clean peaks, its own CUDA context in the nvidia-smi figure) and appends one
JSON line to $OUT/results.jsonl; its log and nvidia-smi trace go to $OUT/logs/<workload>-<variant>.{log,smi}.

    python3 -m benchmarks.speed.bench suite --only W1x --out $OUT   # ablation of W1's no-GC gap (not in a part)
    python3 -m benchmarks.speed.bench profile W1 vlmtune_nogc --out $OUT   # where the step time goes (profiling.py)
    python3 -m benchmarks.speed.bench syncs W1 vlmtune_nogc --out $OUT     # which lines sync (sync_sources.py)

Unsloth's FastVisionModel (issue 21, variants `unsloth_*`, unsloth_run.py) runs where its wheels are installed and a
GPU is visible (run.sh UNSLOTH=1), else it is skipped with the reason. A variant whose process fails or times out
still appends a line to results.jsonl: its reason (the log's last exception line) and the log's tail.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.speed.workloads import FROM_DISK, MAX_LENGTH, PEAK_OF, SMOKE, WORKLOADS, Workload

ROOT = Path(os.environ.get("BENCH_ROOT", "/tmp/vlmtune-speed"))


def prepare(work: Workload) -> tuple[Path, Path]:
    from benchmarks.speed.data import model_dir, write_data

    model = model_dir(ROOT / "models", work.family, work.arch)
    records = work.records or work.batch * (work.warmup + work.steps) + 8
    folder = (
        ROOT
        / "data"
        / f"{work.family}-{work.image_side}-{work.text_tokens}-{'spread' if work.spread else 'fixed'}"
    )
    path = write_data(
        folder,
        model,
        work.family,
        records,
        work.image_side,
        work.text_tokens,
        work.spread,
        MAX_LENGTH[work.spread],
    )
    return model, path


def run_one(workload: str, variant_name: str, out: Path) -> dict[str, Any]:
    """One (workload, variant) in this process; returns and appends its result line."""
    from benchmarks.speed.measure import device_name

    work = WORKLOADS[workload]
    variant = next(v for v in work.variants if v.name == variant_name)
    if variant.path == "unsloth":  # before anything imports transformers or PEFT: Unsloth patches them on import
        from benchmarks.speed.unsloth_run import import_first

        import_first()
    if variant.warmup is not None:
        work = replace(work, warmup=variant.warmup)
    variant = resolved_overrides(variant, workload, out)
    model, path = prepare(work)
    if variant.steps is not None and not SMOKE:  # after prepare: the same records (a long run takes several passes)
        work = replace(work, steps=variant.steps)
    started = time.time()
    if variant.path == "vlmtune":
        from benchmarks.speed.engine_run import train

        result = train(work, variant, model, path, ROOT / "runs" / f"{workload}-{variant_name}")
    else:
        result = run_plain(work, variant, model, path)
    result.update(
        workload=workload,
        variant=variant_name,
        round=int(os.environ.get("BENCH_ROUND", "0")),
        path=variant.path,
        gc=variant.gc,
        device=device_name(),
        seconds=round(time.time() - started, 1),
        versions=_versions(),
    )
    if work.mfu and "tokens_per_second" in result:
        from transformers import AutoConfig

        from benchmarks.speed.measure import mfu

        config = AutoConfig.from_pretrained(model)
        result["mfu"] = round(
            mfu(config, work.method, work.image_side, work.text_tokens, result["tokens_per_second"]), 4
        )
    with open(out / "results.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(result) + "\n")
    return result


def resolved_overrides(variant: Any, workload: str, out: Path) -> Any:
    """`variant` with its placeholders filled: FROM_DISK by the architecture's weights folder, each memory cap of
    PEAK_OF (AT_PLAIN_PEAK, AT_UNSLOTH_PEAK) by the fraction of this GPU that its variant (plain_gc, unsloth_gc) of
    the same round reserved at its peak (results.jsonl); a clear failure where either is missing."""
    disk = [k for k, v in variant.overrides.items() if v == FROM_DISK]
    if disk:
        from benchmarks.speed.unsloth_run import weights_dir

        folder = weights_dir(WORKLOADS[workload], ROOT)
        if not (folder / "config.json").is_file():
            raise SystemExit(f"{folder}: no weights on disk for {workload} {variant.name} (the suite writes them first)")
        variant = replace(variant, overrides={**variant.overrides, **{k: str(folder) for k in disk}})
    caps = {k: PEAK_OF[v] for k, v in variant.overrides.items() if isinstance(v, str) and v in PEAK_OF}
    if not caps:
        return variant
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    filled = {}
    for key, source in caps.items():
        peak = peak_reserved(out / "results.jsonl", workload, source, int(os.environ.get("BENCH_ROUND", "0")))
        if peak is None:
            raise SystemExit(f"{workload} {variant.name}: needs {source}'s peak reserved memory from the same round "
                             f"in {out / 'results.jsonl'}; run {source} before it")
        filled[key] = round(peak * 2**30 / total, 4)
        print(f"{variant.name}: capped at {source}'s peak reserved {peak:.2f} GiB = memory_fraction {filled[key]}",
              flush=True)
    return replace(variant, overrides={**variant.overrides, **filled})


def peak_reserved(results: Path, workload: str, variant: str, round_: int) -> float | None:
    """The last peak_reserved_gib that `variant` of `workload` recorded in round `round_` of `results`."""
    lines = results.read_text().splitlines() if results.exists() else []
    peaks = [
        line["peak_reserved_gib"]
        for line in map(json.loads, filter(None, lines))
        if line.get("workload") == workload and line.get("variant") == variant and line.get("round", 0) == round_
        and "peak_reserved_gib" in line
    ]
    return peaks[-1] if peaks else None


def run_plain(work: Workload, variant: Any, model: Path, path: Path, tracer: Any = None) -> dict[str, Any]:
    """The plain (or Liger, or Unsloth's) path on the workload's encoded batches; `tracer`: the profiler's phase
    marker. Unsloth's model (unsloth_run.build, from the weights `bench weights` wrote) trains in the same loop."""
    from benchmarks.speed.data import data_config, encoded_dataset
    from benchmarks.speed.plain import train as plain_train
    from vlmtune.data.collate import Collator
    from vlmtune.families import get_family

    family = get_family(work.family)
    data_cfg = data_config(MAX_LENGTH[work.spread], work.image_side, work.spread, work.family)
    samples = encoded_dataset(path, model, work.family, data_cfg)
    pad = family.load_processor(model, data_cfg).tokenizer.pad_token_id
    targets = family.lora_target_regex("all")
    built, extra = None, {}
    if variant.path == "unsloth":
        from benchmarks.speed import unsloth_run

        weights = unsloth_run.weights_dir(work, ROOT)
        if not (weights / "config.json").is_file():
            raise FileNotFoundError(f"{weights}: no weights for Unsloth to load (the suite writes them first)")
        started = time.time()
        built, extra = unsloth_run.build(work, variant, weights, targets)
        extra["model_load_seconds"] = round(time.time() - started, 1)
        print(json.dumps({"unsloth_model": extra}), flush=True)
    result = plain_train(
        work,
        variant,
        str(model),
        targets,
        samples,
        Collator(pad),
        work.warmup + work.steps,
        tracer=tracer,
        model=built,
    )
    return {**result, **extra}


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    for name in ("bitsandbytes", "liger_kernel", "unsloth", "unsloth_zoo", "trl"):
        # Unsloth's packages only where the process imported them (importing Unsloth late patches a loaded model)
        if name in sys.modules or (name in ("bitsandbytes", "liger_kernel") and importlib.util.find_spec(name)):
            module = __import__(name)
            found[name] = getattr(module, "__version__", "installed")
    # Qwen3.5's DeltaNet kernels: transformers uses them wherever they import (both paths alike)
    for name, dist in (("fla", "flash-linear-attention"), ("causal_conv1d", "causal-conv1d")):
        if importlib.util.find_spec(name):
            try:
                found[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                found[dist] = "installed"
    return found


def _sampled(
    cmd: list[str], log_path: Path, smi_path: Path, timeout: float, env: dict[str, str] | None = None
) -> tuple[int | str, float | None]:
    """Run `cmd` while nvidia-smi samples the GPU's used memory every 100 ms; (exit code, peak GiB)."""
    with open(smi_path, "w") as smi_out, open(log_path, "w") as log:
        try:
            sampler: subprocess.Popen | None = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=smi_out,
                stderr=subprocess.DEVNULL,
            )
        except OSError:
            sampler = None
        apps = None
        if sampler is not None:  # which processes hold GPU memory (a context each), every 2 s: the harness's runs show
            # ~0.6 GiB more at the nvidia-smi level than `vlmtune train`'s (session 9); this says whose it is
            apps = subprocess.Popen(
                ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader",
                 "-lms", "2000"],
                stdout=open(smi_path.with_suffix(".apps"), "w"),
                stderr=subprocess.DEVNULL,
            )
        try:
            code: int | str = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        for proc in (sampler, apps):
            if proc is not None:
                proc.terminate()
                proc.wait()
    used = [int(x) for x in smi_path.read_text().split() if x.isdigit()]
    return code, (round(max(used) / 1024, 3) if used else None)


def round_order(variants: list[Any], rounds: int, alternate: bool = False) -> list[tuple[int, Any]]:
    """(round, variant) in run order: each round runs every variant, in the workload's order, or with `alternate`
    (BENCH_ORDER=alternate) every second round backwards (A B, B A, ...), so that a variant that runs first in a
    warm-up-sensitive machine state (a fresh page cache, clocks) does so in half the rounds only: the paired ratios
    of the two orders show the order effect."""
    out: list[tuple[int, Any]] = []
    for r in range(rounds):
        out += [(r, v) for v in (variants[::-1] if alternate and r % 2 else variants)]
    return out


def suite(part: int, out: Path, only: list[str] | None, budget_s: float) -> None:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.time()
    liger = importlib.util.find_spec("liger_kernel") is not None
    chosen = set(filter(None, os.environ.get("BENCH_VARIANTS", "").split(",")))  # e.g. plain_gc,vlmtune_lean
    if (part == 1 and not only) or (
        only and "check" in only
    ):  # first: it decides whether the rest means anything
        _check(out, min(budget_s, 240.0))
    unsloth_why: list[str | None] = []  # why Unsloth's variants cannot run here, asked once when one comes up
    # --only's order is the run order (the budget cuts the last ones)
    works = [WORKLOADS[n] for n in only if n in WORKLOADS] if only else list(WORKLOADS.values())
    for work in works:
        if not only and work.part != part:
            continue
        prepare(work)  # model folder + data once, outside the timed processes
        rounds = int(os.environ.get("BENCH_REPEATS", "1"))  # every variant again, per round
        alternate = os.environ.get("BENCH_ORDER", "same") == "alternate"
        for round_, variant in round_order(work.variants, rounds, alternate):
            if chosen and variant.name not in chosen:
                continue
            if variant.path == "liger" and not liger:
                print(f"{work.name} {variant.name}: skipped, liger-kernel does not import here", flush=True)
                continue
            if variant.path == "unsloth":
                from benchmarks.speed import unsloth_run

                if not unsloth_why:
                    unsloth_why.append(unsloth_run.unavailable())
                if unsloth_why[0]:
                    print(f"{work.name} {variant.name}: skipped, {unsloth_why[0]}", flush=True)
                    continue
            left = budget_s - (time.time() - started)
            if left < 45:
                print(
                    f"{work.name} {variant.name}: skipped, {left:.0f} s of the time budget left", flush=True
                )
                continue
            name = f"{work.name}-{variant.name}"
            timeout = left
            if variant.path == "unsloth" or FROM_DISK in variant.overrides.values():
                if not _unsloth_weights(work, logs, left):
                    _failed(out, work.name, variant, round_, "weights", logs / f"{work.name}-weights.log")
                    continue
            if variant.path == "unsloth":
                timeout = min(budget_s - (time.time() - started), unsloth_run.TIMEOUT_S)
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.speed.bench",
                "one",
                work.name,
                variant.name,
                "--out",
                str(out),
            ]
            if rounds > 1:
                name += f"-r{round_}"
            os.environ["BENCH_ROUND"] = str(round_)  # the child records it in its result line
            if os.environ.get("BENCH_INDUCTOR_CACHE", "per-run") == "per-run":
                # torch.compile from nothing in every run, as a user's first run: inductor's on-disk caches
                # (compiled graphs, Triton kernels) would otherwise carry one variant's compilation into the next
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(ROOT / "inductor-cache" / f"{name}")
            env = unsloth_run.child_env(name, ROOT) if variant.path == "unsloth" else None
            code, peak = _sampled(cmd, logs / f"{name}.log", logs / f"{name}.smi", timeout, env)
            print(
                f"{name}: exit {code}, nvidia-smi peak over the whole process (model build included) {peak} GiB, "
                f"{time.time() - started:.0f} s elapsed",
                flush=True,
            )
            if code != 0:
                print(f"{name}: {_failed(out, work.name, variant, round_, code, logs / f'{name}.log')}", flush=True)
            with open(out / "smi_peaks.jsonl", "a") as fh:
                fh.write(
                    json.dumps(
                        {
                            "workload": work.name,
                            "variant": variant.name,
                            "smi_process_peak_gib": peak,
                            "exit": code,
                        }
                    )
                    + "\n"
                )
    table(out / "results.jsonl")


def _unsloth_weights(work: Workload, logs: Path, left: float) -> bool:
    """The checkpoint Unsloth loads, written once per architecture in its own process (`bench weights`), outside
    the measured processes' nvidia-smi peaks; False when that failed (its log says why)."""
    from benchmarks.speed.unsloth_run import weights_dir

    if (weights_dir(work, ROOT) / "config.json").is_file():
        return True
    started = time.time()
    cmd = [sys.executable, "-m", "benchmarks.speed.bench", "weights", work.name]
    with open(logs / f"{work.name}-weights.log", "w") as log:
        try:
            code: int | str = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, timeout=max(1.0, left - 45)
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    print(f"{work.name} weights on disk (Unsloth, capped QLoRA): exit {code}, {time.time() - started:.0f} s", flush=True)
    return code == 0


def _reason(log: Path) -> tuple[str, list[str]]:
    """A failed process's reason (its last exception line, else its last line) and its log's last lines."""
    lines = [line.rstrip() for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    tail = lines[-15:]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|NotFound\w*)\b.*", line.strip()):
            return line.strip()[:600], tail
    return (lines[-1][:600] if lines else "no output"), tail


def _failed(out: Path, workload: str, variant: Any, round_: int, code: int | str, log: Path) -> str:
    """A result line for a variant that did not finish: the reason instead of measurements."""
    reason, tail = _reason(log)
    if code == "timeout":
        reason = f"timed out (the suite's budget, or BENCH_UNSLOTH_TIMEOUT_S for Unsloth); last line: {reason}"
    row = {
        "workload": workload,
        "variant": variant.name,
        "round": round_,
        "path": variant.path,
        "gc": variant.gc,
        "exit": code,
        "error": reason,
        "log_tail": tail,
    }
    with open(out / "results.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
    return f"failed: {reason}"


def _check(out: Path, timeout: float) -> None:
    started = time.time()
    prepare(WORKLOADS["W1"])
    cmd = [sys.executable, "-m", "benchmarks.speed.check", "--out", str(out)]
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with open(out / "logs" / "check.log", "w") as log:
        try:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    print(f"correctness check: exit {code}, {time.time() - started:.0f} s", flush=True)


def table(path: Path) -> None:
    from benchmarks.speed.report import print_report

    print_report(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("suite")
    s.add_argument("--part", type=int, choices=[1, 2, 3, 4, 5, 6], default=1)
    s.add_argument("--only", default="", help="comma-separated workloads and/or `check` (overrides --part)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--budget-s", type=float, default=540.0)
    o = sub.add_parser("one")
    o.add_argument("workload")
    o.add_argument("variant")
    o.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("profile", help="torch.profiler over a few steps of one variant; a text report")
    p.add_argument("workload")
    p.add_argument("variant")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--trace", action="store_true", help="also write the Chrome trace (large)")
    y = sub.add_parser("syncs", help="where one step's host-device syncs come from (CUDA sync debug mode)")
    y.add_argument("workload")
    y.add_argument("variant")
    y.add_argument("--out", type=Path, required=True)
    w = sub.add_parser("weights", help="write the workload's random weights for Unsloth to load (unsloth_run.py)")
    w.add_argument("workload")
    t = sub.add_parser("table")
    t.add_argument("results", type=Path)
    args = ap.parse_args()
    if args.cmd == "suite":
        suite(args.part, args.out, [w for w in args.only.split(",") if w] or None, args.budget_s)
    elif args.cmd == "profile":
        from benchmarks.speed.profiling import profile_one

        print(profile_one(args.workload, args.variant, args.out, args.trace).read_text())
    elif args.cmd == "syncs":
        from benchmarks.speed.sync_sources import syncs_one

        print(syncs_one(args.workload, args.variant, args.out).read_text())
    elif args.cmd == "weights":
        from benchmarks.speed.unsloth_run import write_weights

        began = time.time()
        work = WORKLOADS[args.workload]
        prepare(work)
        print(f"{write_weights(work, ROOT)}: {time.time() - began:.1f} s")
    elif args.cmd == "one":
        print(json.dumps(run_one(args.workload, args.variant, args.out)))
    else:
        table(args.results)


if __name__ == "__main__":
    main()
