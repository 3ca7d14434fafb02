"""Calibrate the VRAM estimator on a GPU: `vlmtune train` over a grid of configurations, estimate vs measured peak.

    OUT=/tmp/out bash benchmarks/calibrate_estimator.sh --part grid      # the grid (section "grid" below)
    OUT=/tmp/out bash benchmarks/calibrate_estimator.sh --part cards     # recommended configs, capped to a card
    python benchmarks/calibrate_estimator.py --table RESULTS.jsonl       # re-estimate recorded points (no GPU)

Every point is its own `vlmtune train` process (clean memory statistics) on an architecture with random weights
(`vlmtune tiny-model --arch`), a few steps on data from make_bench_data.py. Per point it records:
- the estimate the engine printed before loading the model (its `memory_preflight` event in train_log.jsonl: sized
  from the encoded data's real lengths, with the inputs, so the point can be re-estimated offline);
- the measured peaks: max_memory_allocated, max_memory_reserved (the engine logs both every step), and the process's
  memory as nvidia-smi shows it (NVML, per process, sampled every 100 ms). The table's nvidia-smi level is the
  reserved peak + the median measured CUDA context (QLoRA's NVML peak is its random 16-bit build, not training).
Each run's saved model is deleted as soon as it ends (a full 2B model is 4.4 GB; the first run filled the disk).
Points run side by side while the sum of their estimates fits the GPU: the numbers are per process, and the
engine's fit check is bypassed with hardware.force_fit because other points hold memory.
`--part cards` runs, for each seed hardware class, the config `vlmtune recommend` writes for it, capped with
hardware.memory_fraction to that card's memory (fit check on), and records whether it trained and whether the next
larger micro-batch (or the next cheaper method) would have fit according to the estimate.
Results go to $OUT: calibration.jsonl, cards.jsonl (one row per point, appended as points finish), table.md,
logs.tar.gz (each run's log, train_log.jsonl and the architectures' configs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
GIB = 1 << 30
CONTEXT_MIB = 769  # memory_anchors.md §0: nvidia-smi minus torch reserved on this H100 / torch 2.11 / CUDA 13
STEPS = 5

# name -> (family, --arch, catalogue model with the same numbers)
MODELS = {
    "q2vl2b": ("qwen2_vl", "2b", "Qwen/Qwen2-VL-2B-Instruct"),
    "q25vl7b": ("qwen2_5_vl", "7b", "Qwen/Qwen2.5-VL-7B-Instruct"),
    "llava7b": ("llava", "7b", "llava-hf/llava-1.5-7b-hf"),
}
# data name -> (image side px, text tokens): A/B for the dynamic-resolution Qwen models, L for LLaVA (fixed 336)
DATA = {"A": (448, 512), "B": (896, 1536), "L": (336, 512)}
# card class -> (catalogue GPU, model, data)
CARDS = {
    "8GB": ("RTX 4060 8GB", "q2vl2b", "A"),
    "16GB": ("RTX 4080 16GB", "q25vl7b", "A"),
    "24GB": ("RTX 4090 24GB", "q25vl7b", "A"),
    "80GB": ("A100 80GB", "q25vl7b", "A"),
}


@dataclass(frozen=True)
class Point:
    model: str
    method: str
    gc: bool
    batch: int
    data: str
    zero: int = 0
    plain: bool = False
    """speed.chunked_loss and speed.frozen_vision_no_grad off: HF's loss and vision tower, as the anchors ran."""

    @property
    def id(self) -> str:
        z = f"-z{self.zero}" if self.zero else ""
        return f"{self.model}-{self.method}-gc{int(self.gc)}-b{self.batch}-{self.data}{z}{'-plain' if self.plain else ''}"


def grid(with_zero: bool) -> list[Point]:
    """2B: LoRA/QLoRA/full x checkpointing x batch 1/4 x two image sizes and text lengths; 7B likewise without full
    (pure-bf16 AdamW states of 7.7 B trained parameters alone take 61 GiB); LLaVA-1.5 LoRA/QLoRA; all with
    vlmtune's default speed settings, then six points of the plain path (speed off)."""
    p = []
    for gc, b, d in [(1, 1, "A"), (1, 4, "A"), (0, 1, "A"), (0, 4, "A"), (1, 1, "B"), (1, 4, "B"), (0, 1, "B")]:
        p.append(Point("q2vl2b", "lora", bool(gc), b, d))
    for gc, b, d in [(1, 1, "A"), (1, 4, "A"), (0, 1, "A"), (0, 4, "A"), (1, 1, "B"), (1, 4, "B")]:
        p.append(Point("q2vl2b", "qlora", bool(gc), b, d))
    for gc, b, d in [(1, 1, "A"), (1, 4, "A"), (0, 1, "A"), (0, 4, "A"), (1, 1, "B")]:
        p.append(Point("q2vl2b", "full", bool(gc), b, d))
    for gc, b, d in [(1, 1, "A"), (1, 4, "A"), (0, 1, "A"), (0, 4, "A"), (1, 1, "B"), (1, 4, "B")]:
        p.append(Point("q25vl7b", "lora", bool(gc), b, d))
    for gc, b, d in [(1, 1, "A"), (1, 4, "A"), (0, 1, "A"), (1, 1, "B"), (1, 4, "B")]:
        p.append(Point("q25vl7b", "qlora", bool(gc), b, d))
    for gc, b in [(1, 1), (1, 4), (0, 1)]:
        p.append(Point("llava7b", "lora", bool(gc), b, "L"))
    p.append(Point("llava7b", "qlora", True, 1, "L"))
    for m, method, gc, b, d in [("q2vl2b", "lora", 1, 4, "A"), ("q2vl2b", "lora", 0, 1, "B"), ("q2vl2b", "qlora", 1, 4, "A"),
                                ("q2vl2b", "full", 1, 1, "A"), ("q25vl7b", "lora", 1, 1, "A"),
                                ("q25vl7b", "qlora", 1, 1, "B")]:
        p.append(Point(m, method, bool(gc), b, d, plain=True))
    if with_zero:  # single-GPU ZeRO: model states in DeepSpeed's partitions (fp32 master, 16-bit module)
        p += [Point("q2vl2b", "full", True, 1, "A", 2), Point("q2vl2b", "full", True, 1, "A", 3),
              Point("q2vl2b", "lora", True, 4, "A", 2), Point("q2vl2b", "lora", True, 4, "A", 3)]
    return p


# ----------------------------------------------------------------------------------------------------------- setup

def run(cmd: list[str], log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=child_env())


def child_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="4", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join(x for x in (env.get("PYTHONPATH"), str(REPO / "src")) if x)
    return env


def prepare(work: Path, models: set[str], datas: set[tuple[str, str]], tiny: bool) -> None:
    """Architectures (config + processor, no weights) and one data set per (model, data), built in parallel.
    `tiny`: toy models instead (a smoke test of this script on a machine without a GPU; nothing is measured)."""
    procs = []
    for m in models:
        family, arch, _ = MODELS[m]
        if not (work / m / "config.json").is_file():
            size = [] if tiny else ["--arch", arch]
            procs.append(run([sys.executable, "-m", "vlmtune.cli", "tiny-model", "--family", family, *size,
                              "--out", str(work / m)], work / f"build_{m}.log"))
    for p in procs:
        if p.wait():
            raise SystemExit(f"building an architecture failed; see {work}/build_*.log")
    procs = []
    for m, d in datas:
        side, text = DATA[d]
        folder = work / f"data_{m}_{d}"
        if not (folder / "train.jsonl").is_file():
            procs.append(run([sys.executable, str(REPO / "benchmarks/make_bench_data.py"), "--model", str(work / m),
                              "--n", "64", "--image-side", str(side), "--text-tokens", str(text),
                              "--out", str(folder)], work / f"data_{m}_{d}.log"))
    for p in procs:
        if p.wait():
            raise SystemExit(f"making data failed; see {work}/data_*.log")


def overrides(point: Point, work: Path, out_dir: Path) -> list[str]:
    side, _ = DATA[point.data]
    items = [
        f"model.name_or_path={work / point.model}", "model.random_init=true",
        f"data.train_path={work / f'data_{point.model}_{point.data}' / 'train.jsonl'}", "data.max_length=4096",
        f"method.name={point.method}", "method.lora.rank=16", "method.lora.alpha=32",
        f"training.batch_size={point.batch}", "training.gradient_accumulation_steps=1",
        f"training.max_steps={STEPS}", "training.logging_steps=1", "training.save_steps=100000",
        "training.report_to=[none]", f"hardware.gradient_checkpointing={str(point.gc).lower()}",
        "hardware.force_fit=true", f"output_dir={out_dir}",
    ]
    if point.model != "llava7b":
        items.append(f"data.image_size={side}")
    if point.zero:
        items += ["distributed.engine=deepspeed", f"distributed.zero_stage={point.zero}"]
    if point.plain:
        items += ["speed.chunked_loss=false", "speed.frozen_vision_no_grad=false"]
    return items


def schedule_bytes(point: Point, work: Path) -> int:
    """What a point may hold at its worst, for packing points side by side: the estimate with the data's nominal
    shape (+15%), and at least the 16-bit random build that QLoRA quantizes from."""
    from vlmtune.config.loader import load_config
    from vlmtune.memory import estimate, inputs_from_config
    from vlmtune.memory.catalogue import lookup_model
    from vlmtune.memory.params import count_params

    config = load_config(None, overrides(point, work, work / "unused"))
    side, text = DATA[point.data]
    tokens = 576 if point.model == "llava7b" else (side // 28) ** 2
    patches = 576 if point.model == "llava7b" else (side // 14) ** 2
    b = estimate(inputs_from_config(config, seq_len=tokens + text, vit_patches_per_batch=patches * point.batch))
    build = 2 * count_params(lookup_model(str(work / point.model))).total + GIB if point.method == "qlora" else 0
    return int(max(b.peak_total * 1.15, build))


# ------------------------------------------------------------------------------------------------------- measuring

class Sampler(threading.Thread):
    """Peak GPU memory per process (NVML, as nvidia-smi shows it) and of the whole device, every 100 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.per_pid: dict[int, int] = {}
        self.device_peak = 0
        self.total = 0
        self.stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
            self.total = int(pynvml.nvmlDeviceGetMemoryInfo(self.handle).total)
        except Exception as exc:  # noqa: BLE001 (fall back to nvidia-smi, said in the log)
            print(f"NVML unavailable ({exc}); sampling nvidia-smi", flush=True)
            self.nvml = None
            try:
                q = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                   capture_output=True, text=True)
                self.total = int(q.stdout.split()[0]) * MIB
            except (OSError, ValueError, IndexError):
                print("no nvidia-smi either: nothing is sampled", flush=True)
                self.stop.set()

    def sample(self) -> tuple[int, dict[int, int]]:
        if self.nvml is not None:
            used = int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
            return used, {int(p.pid): int(p.usedGpuMemory or 0) for p in procs}
        q = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True)
        a = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True)
        pids = {int(x.split(",")[0]): int(x.split(",")[1]) * MIB for x in a.stdout.splitlines() if "," in x}
        return int(q.stdout.split()[0]) * MIB, pids

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                used, pids = self.sample()
            except Exception as exc:  # noqa: BLE001 (a sampler hiccup must not end the grid)
                print(f"sampler: {exc}", flush=True)
                time.sleep(1)
                continue
            self.device_peak = max(self.device_peak, used)
            for pid, value in pids.items():
                self.per_pid[pid] = max(self.per_pid.get(pid, 0), value)
            time.sleep(0.1)


def clean(log_dir: Path) -> None:
    """Drop what a run saved (a full 2B model is 4.4 GB; the machine's disk is small): keep the logs only."""
    import shutil

    for path in log_dir.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def read_log(path: Path) -> dict:
    """The run's estimate (memory_preflight event) and the last memory statistics it logged."""
    out: dict = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "memory_preflight":
            out["preflight"] = rec
        elif rec.get("event") == "start":
            out["start"] = rec
        elif "mem_peak_gib" in rec:
            out["last"] = rec
    return out


def pct(est: float | None, meas: float | None) -> float | None:
    return round(100 * (est - meas) / meas, 2) if est and meas else None


def measured_row(point_id: str, log_dir: Path, pid: int, rc: int, sampler: Sampler, wall: float) -> dict:
    info = read_log(log_dir / "train_log.jsonl")
    pre, last = info.get("preflight", {}), info.get("last", {})
    row: dict = {"id": point_id, "rc": rc, "wall_s": round(wall, 1)}
    if pre.get("estimate_total_gib") is not None:
        row.update(est_alloc_mib=round(pre["estimate_allocated_gib"] * 1024),
                   est_reserved_mib=round(pre["estimate_reserved_gib"] * 1024),
                   est_total_mib=round(pre["estimate_total_gib"] * 1024), est_phase=pre.get("peak_phase"),
                   seq_len=pre.get("seq_len"), vit_patches=pre.get("vit_patches"), inputs=pre.get("inputs"),
                   gpu_free_at_preflight_mib=round(pre["gpu_free_gib"] * 1024))
    if last:
        reserved = last.get("mem_reserved_peak_gib", last.get("mem_reserved_gib"))
        row.update(meas_alloc_mib=round(last["mem_peak_gib"] * 1024), meas_reserved_mib=round(reserved * 1024),
                   steps=last.get("step"))
        # The nvidia-smi level is max_memory_reserved + the CUDA context. NVML's per-process peak gives the context
        # where the process never held more than at its training peak; QLoRA runs first build the 16-bit random
        # model (reset before training), so their NVML peak is that build: the table uses the median context.
        smi = sampler.per_pid.get(pid, 0) // MIB
        row["meas_smi_process_mib"] = smi or None
        row["context_mib"] = smi - row["meas_reserved_mib"] if smi else None
        row["meas_total_mib"] = row["meas_reserved_mib"] + CONTEXT_MIB
    if "start" in info:
        row["total_params"] = info["start"].get("total_params")
        row["trainable_params"] = info["start"].get("trainable_params")
    for level in ("alloc", "reserved", "total"):
        row[f"err_{level}_pct"] = pct(row.get(f"est_{level}_mib"), row.get(f"meas_{level}_mib"))
    if rc:
        text = (log_dir / "stdout.log").read_text(errors="replace") if (log_dir / "stdout.log").is_file() else ""
        row["error"] = "\n".join(text.splitlines()[-25:])
    return row


# ------------------------------------------------------------------------------------------------------------ grid

def run_grid(points: list[Point], work: Path, out: Path, sampler: Sampler, parallel: int, deadline: float) -> None:
    need = {p: schedule_bytes(p, work) for p in points}
    capacity = int(sampler.total * 0.92) or 64 * GIB
    queue = sorted(points, key=lambda p: (p.plain, -need[p]))  # vlmtune's default path first
    running: dict[Point, tuple[subprocess.Popen, float, Path]] = {}
    started = time.time()
    while queue or running:
        for point, (proc, t0, log_dir) in list(running.items()):
            rc = proc.poll()
            over = time.time() - started > deadline + 60
            if rc is None and not over:
                continue
            if rc is None:
                proc.kill()
                rc = proc.wait()
                print(f"killed {point.id} at the deadline", flush=True)
            del running[point]
            clean(log_dir)
            row = {**asdict(point), **measured_row(point.id, log_dir, proc.pid, rc, sampler, time.time() - t0),
                   "concurrent_max": parallel, "catalogue_model": MODELS[point.model][2]}
            with open(out / "calibration.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"done {point.id}: rc {rc}, est {row.get('est_total_mib')} MiB, meas {row.get('meas_total_mib')} "
                  f"MiB ({row.get('err_total_pct')}%), {row['wall_s']} s", flush=True)
        if time.time() - started > deadline:
            for p in queue:
                print(f"not started (deadline): {p.id}", flush=True)
            queue = []
        used = sum(need[p] for p in running)
        for point in list(queue):
            if len(running) >= parallel:
                break
            if running and used + need[point] > capacity:
                continue
            log_dir = work / "runs" / point.id
            log_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "vlmtune.cli", "train", *overrides(point, work, log_dir)]
            running[point] = (run(cmd, log_dir / "stdout.log"), time.time(), log_dir)
            used += need[point]
            queue.remove(point)
            print(f"start {point.id} (needs <= {need[point] / GIB:.1f} GiB; {used / GIB:.1f} GiB scheduled)",
                  flush=True)
        time.sleep(0.5)


# ----------------------------------------------------------------------------------------------------------- cards

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


# ----------------------------------------------------------------------------------------------------------- table

def reestimate(row: dict) -> dict:
    """Estimate a recorded point again with the current estimator (catalogue model with the same numbers)."""
    from vlmtune.memory import EstimateInputs, estimate

    i = dict(row["inputs"])
    i.update(model=row["catalogue_model"], image_hw=tuple(i["image_hw"]), gpu=None)
    i.setdefault("autocast", i["precision"] != "fp32")  # rows recorded before the field: the Trainer autocasts
    if not isinstance(i["lora_targets"], str):
        i["lora_targets"] = tuple(i["lora_targets"])
    b = estimate(EstimateInputs(**i))
    return {"est_alloc_mib": round(b.peak_allocated / MIB), "est_reserved_mib": round(b.peak_reserved / MIB),
            "est_total_mib": round(b.peak_total / MIB), "est_phase": b.peak_phase}


def with_context(rows: list[dict]) -> tuple[list[dict], int]:
    """Rows with meas_total = reserved peak + the median measured CUDA context (NVML minus reserved) of the runs
    whose NVML peak is their training peak (not QLoRA's random 16-bit build)."""
    import statistics

    seen = [r["context_mib"] for r in rows if r.get("context_mib") and r.get("method") != "qlora"]
    context = round(statistics.median(seen)) if seen else CONTEXT_MIB
    out = []
    for r in rows:
        if r.get("meas_reserved_mib") is not None:
            r = {**r, "meas_total_mib": r["meas_reserved_mib"] + context}
        elif r.get("nvml_only"):  # an earlier run's record: its NVML per-process peak is the nvidia-smi level
            r = {**r, "meas_total_mib": r["meas_smi_process_mib"]}
        r["err_total_pct"] = pct(r.get("est_total_mib"), r.get("meas_total_mib"))
        out.append(r)
    return out, context


def _cell(r: dict, level: str) -> str:
    err = r.get(f"err_{level}_pct")
    return (f"{r[f'est_{level}_mib']} | {r.get(f'meas_{level}_mib') or '-'} | "
            + (f"{err:+.1f}%" if err is not None else "-"))


def table(rows: list[dict], again: bool) -> str:
    rows, context = with_context(rows)
    lines = [f"nvidia-smi level = max_memory_reserved + {context} MiB CUDA context (median measured)\n", "| point | method | GC | B | S | patches | est smi | meas smi | err | est reserved | meas reserved | err "
             "| est alloc | meas alloc | err |", "|" + "---|" * 15]
    ok5 = ok10 = n = 0
    for r in rows:
        if r.get("meas_total_mib") is None or not r.get("inputs") or (not again and not r.get("est_total_mib")):
            lines.append(f"| {r['id']} | {r['method']} | | | | | | | failed (rc {r.get('rc')}) | | | | | | |")
            continue
        if again:
            r = {**r, **reestimate(r)}
            for level in ("alloc", "reserved", "total"):
                r[f"err_{level}_pct"] = pct(r[f"est_{level}_mib"], r.get(f"meas_{level}_mib"))
        n += 1
        ok5 += abs(r["err_total_pct"]) <= 5
        ok10 += abs(r["err_total_pct"]) <= 10
        lines.append(
            f"| {r['id']} | {r['method']} | {'on' if r['gc'] else 'off'} | {r['batch']} | {r['seq_len']} "
            f"| {r['vit_patches']} | {_cell(r, 'total')} | {_cell(r, 'reserved')} | {_cell(r, 'alloc')} |")
    lines.append(f"\n{n} measured points: {ok5} within ±5% at the nvidia-smi level, {ok10} within ±10%.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/vlmtune-calibration")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/calib"))
    ap.add_argument("--part", choices=["grid", "cards", "all"], default="all")
    ap.add_argument("--only", help="comma-separated point ids or model names to run (default: all)")
    ap.add_argument("--skip", help="comma-separated point ids already measured")
    ap.add_argument("--cards", default=",".join(CARDS), help="card classes for --part cards")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--deadline", type=float, default=480, help="seconds after which no new point starts")
    ap.add_argument("--table", type=Path, nargs="+", help="print the table of calibration JSONL files, re-estimated "
                    "with the current estimator, and exit")
    ap.add_argument("--tiny", action="store_true", help="toy models: a smoke test of this script without a GPU")
    args = ap.parse_args()
    if args.table:
        rows = [json.loads(x) for path in args.table for x in path.read_text().splitlines() if x.strip()]
        print(table(rows, again=True))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        import deepspeed  # noqa: F401

        with_zero = True
    except ImportError:
        with_zero = False
        print("deepspeed is not installed: the ZeRO points are left out", flush=True)
    points = grid(with_zero) if args.part in ("grid", "all") else []
    if args.only:
        keep = set(args.only.split(","))
        points = [p for p in points if p.id in keep or p.model in keep]
    skip = set(args.skip.split(",")) if args.skip else set()
    points = [p for p in points if p.id not in skip]
    cards = [c for c in args.cards.split(",") if c] if args.part in ("cards", "all") else []
    prepare(args.work, {p.model for p in points} | {CARDS[c][1] for c in cards},
            {(p.model, p.data) for p in points} | {(CARDS[c][1], CARDS[c][2]) for c in cards}, args.tiny)
    sampler = Sampler()
    sampler.start()
    t0 = time.time()
    if cards:  # alone on the GPU: the engine's fit check compares with the free memory
        run_cards(cards, args.work, args.out, sampler)
    if points:
        run_grid(points, args.work, args.out, sampler, args.parallel, args.deadline - (time.time() - t0))
    sampler.stop.set()
    if (args.out / "calibration.jsonl").is_file():
        rows = [json.loads(x) for x in (args.out / "calibration.jsonl").read_text().splitlines()]
        text = table(rows, again=False)
        (args.out / "table.md").write_text(text + "\n")
        print(text)
    with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
        for path in sorted(args.work.glob("*/config.json")) + sorted(args.work.glob("*/*processor_config.json")):
            tar.add(path, arcname=str(path.relative_to(args.work)))
        for path in sorted(args.work.glob("*.log")) + sorted(args.work.glob("rec_*.yaml")):
            tar.add(path, arcname=path.name)
        for sub in ("runs", "cards"):
            for path in sorted((args.work / sub).glob("*/*")):
                if path.name in ("stdout.log", "train_log.jsonl", "config.yaml"):
                    tar.add(path, arcname=str(path.relative_to(args.work)))
    print(f"device peak {sampler.device_peak / GIB:.1f} GiB; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
