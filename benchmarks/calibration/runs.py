"""Running the points on the GPU: models and data, one `vlmtune train` per point with NVML sampling, the grid
(side by side while the estimates fit) and the capped seed cards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.calibration.points import CONTEXT_MIB, DATA, GIB, MIB, MODELS, REPO, STEPS, Point
from benchmarks.calibration.table import pct

# ----------------------------------------------------------------------------------------------------------- setup

def run(cmd: list[str], log: Path | None = None, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
    env = {**child_env(), **(extra_env or {})}
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)


def snapshot_env(log_dir: Path) -> dict[str, str]:
    """CALIB_SNAPSHOT=1: each grid run also writes its memory timeline of step 2 and the allocator snapshot (with
    call sites) at that step's peak, in step 3, to its log folder (src/vlmtune/train/memory_snapshot.py)."""
    if os.environ.get("CALIB_SNAPSHOT") != "1":
        return {}
    return {"VLMTUNE_MEMORY_SNAPSHOT": str(log_dir / "snapshot.jsonl"), "VLMTUNE_MEMORY_TIMELINE": "2",
            "VLMTUNE_MEMORY_SNAPSHOT_STEPS": "3"}


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
            running[point] = (run(cmd, log_dir / "stdout.log", snapshot_env(log_dir)), time.time(), log_dir)
            used += need[point]
            queue.remove(point)
            print(f"start {point.id} (needs <= {need[point] / GIB:.1f} GiB; {used / GIB:.1f} GiB scheduled)",
                  flush=True)
        time.sleep(0.5)
