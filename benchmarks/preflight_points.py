"""Measured points for tests/memory/data/vlmtune_points.jsonl from a GPU results folder, with each run's estimate
inputs as its memory preflight recorded them, so the test can re-estimate it offline.

    python3 -m benchmarks.preflight_points recommend benchmarks/results/2026-12-07-session13/r1 --prefix s13-
    python3 -m benchmarks.preflight_points speed benchmarks/results/2026-12-07-session13/w2u --prefix s13-

`recommend`: a benchmarks/gpu_recommend.sh (or gpu_deepspeed.sh) folder: summary.jsonl (one line per run) and
logs.tar.gz (dslogs/<label>/train_log.jsonl with the `memory_preflight` event, read from the archive, not unpacked).
The runs' model folders (/tmp/arch_<tag>, /tmp/weights_<tag>) are mapped to the catalogue's ids (MODELS). Runs that
failed (rc != 0) or have no preflight event are reported on stderr and left out.

`speed`: a speed harness folder (results.jsonl) whose vlmtune variants ran the engine without a train_log.jsonl: the
inputs are rebuilt from the harness's config (benchmarks/speed/engine_run.config_dict + the variant's overrides,
inputs_from_config) and the shape its preflight printed (`Sequence N tokens per sample (I image tokens), P vision
patches`, read from logs.tar.gz logs/<workload>-<variant>.log); labelled tokens = text tokens - 28 template tokens
(the harness's data, as the W2 rows). The row is kept only if the rebuilt estimate reproduces the estimate_total_gib
the run printed (to 0.01 GiB). Measured at the nvidia-smi level: smi_in_process_gib (the device while training).

Prints one JSON line per point (nvidia-smi level) on stdout; append them to the data file by hand and bump the count
in tests/memory/test_vlmtune_points.py.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
from pathlib import Path
from typing import Any

GIB_MIB = 1024
MODELS = {
    "qwen2_vl2b": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2_5_vl7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "llava7b": "llava-hf/llava-1.5-7b-hf",
    "llava13b": "llava-hf/llava-1.5-13b-hf",
}
"""gpu_recommend.sh's model tags (its HUB table) -> catalogue ids."""
SPEED_MODELS = {("qwen2_5_vl", "7b"): "Qwen/Qwen2.5-VL-7B-Instruct", ("qwen2_vl", "2b"): "Qwen/Qwen2-VL-2B-Instruct"}
TEMPLATE_TOKENS = 28


def _catalogue_id(path: str) -> str:
    tag = re.sub(r"^/tmp/(arch|weights)_", "", path)
    if tag not in MODELS:
        raise SystemExit(f"unknown model folder {path}: add its tag to MODELS")
    return MODELS[tag]


def _member(tar: tarfile.TarFile, name: str) -> str | None:
    try:
        f = tar.extractfile(name)
    except KeyError:
        return None
    return f.read().decode() if f else None


def recommend_points(folder: Path, prefix: str) -> list[dict[str, Any]]:
    rel = folder.resolve().relative_to(Path(__file__).resolve().parents[1])
    out = []
    with tarfile.open(folder / "logs.tar.gz") as tar:
        for line in (folder / "summary.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("rc") != 0:
                print(f"skipped {r.get('label')}: {r.get('skipped') or 'rc ' + str(r.get('rc'))}", file=sys.stderr)
                continue
            log = _member(tar, f"dslogs/{r['label']}/train_log.jsonl") or ""
            pre = [json.loads(x) for x in log.splitlines() if '"memory_preflight"' in x]
            if not pre:
                print(f"skipped {r['label']}: no memory_preflight event", file=sys.stderr)
                continue
            inputs = dict(pre[0]["inputs"], model=_catalogue_id(pre[0]["inputs"]["model"]))
            ds = f", DeepSpeed ZeRO-{inputs['zero_stage']} offload {inputs['offload']}" if inputs["zero_stage"] else ""
            out.append({
                "id": prefix + r["label"], "source": f"{rel}/summary.jsonl",
                "meas_alloc_mib": round(r["peak_allocated_gib"] * GIB_MIB),
                "meas_reserved_mib": round(r["peak_reserved_gib"] * GIB_MIB),
                "meas_smi_device_mib": round(r["nvidia_smi_peak_gib"] * GIB_MIB), "level": "nvidia-smi",
                "derived": f"the run's own memory_preflight inputs ({rel.name}/logs.tar.gz train_log.jsonl; model = "
                           "the catalogue's id of the architecture it was built from), the config `vlmtune recommend` "
                           f"wrote, one H100 capped to the card (hardware.memory_fraction), expandable segments on{ds}; "
                           f"printed estimate {pre[0]['estimate_total_gib']} GiB; nvidia-smi peak of the GPU (200 ms "
                           "trace, one process)",
                "inputs": inputs,
            })
    return out


def speed_points(folder: Path, prefix: str) -> list[dict[str, Any]]:
    from benchmarks.speed.engine_run import config_dict
    from benchmarks.speed.workloads import WORKLOADS
    from vlmtune.config.loader import load_config
    from vlmtune.memory import estimate
    from vlmtune.memory.inputs import inputs_from_config

    rel = folder.resolve().relative_to(Path(__file__).resolve().parents[1])
    out = []
    with tarfile.open(folder / "logs.tar.gz") as tar:
        for line in (folder / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("path") != "vlmtune":
                continue
            label = f"{r['workload']}-{r['variant']}"
            m = re.search(r"Sequence\s+(\d+) tokens per sample \((\d+) image tokens\), (\d+) vision patches",
                          _member(tar, f"logs/{label}.log") or "")
            if not m:
                print(f"skipped {label}: no preflight Sequence line in its log", file=sys.stderr)
                continue
            seq, img, patches = map(int, m.groups())
            work = WORKLOADS[r["workload"]]
            (variant,) = [v for v in work.variants if v.name == r["variant"]]
            config = load_config(None, overrides=[f"{k}={v}" for k, v in variant.overrides.items()],
                                 base=config_dict(work, variant, Path("/tmp/m"), Path("/tmp/t.jsonl"), Path("/tmp/o")))
            i = inputs_from_config(
                config, model=SPEED_MODELS[(work.family, work.arch)], seq_len=seq, image_tokens_per_sample=img,
                vit_patches_per_batch=patches, labelled_tokens=(seq - img - TEMPLATE_TOKENS) * config.training.batch_size,
                expandable=bool(r.get("expandable_segments")), linear_attention_kernel="fla")
            total = estimate(i).peak_total / (1 << 30)
            if abs(total - r["estimate_total_gib"]) > 0.01:
                print(f"skipped {label}: rebuilt estimate {total:.3f} GiB, the run printed {r['estimate_total_gib']}",
                      file=sys.stderr)
                continue
            inputs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in i.__dict__.items()}
            out.append({
                "id": prefix + label, "source": f"{rel}/results.jsonl",
                "meas_alloc_mib": round(r["peak_allocated_gib"] * GIB_MIB),
                "meas_reserved_mib": round(r["peak_reserved_gib"] * GIB_MIB),
                "meas_smi_device_mib": round(r["smi_in_process_gib"] * GIB_MIB), "level": "nvidia-smi",
                "derived": "benchmarks/speed/engine_run.py config_dict + the variant's overrides (inputs_from_config), "
                           f"shape from its log's preflight lines ({seq} tokens, {img} image tokens, {patches} "
                           f"patches), labelled = text - {TEMPLATE_TOKENS} template tokens; the rebuilt estimate "
                           f"equals the printed {r['estimate_total_gib']} GiB; expandable segments on; one H100; "
                           "smi_in_process_gib (the device while training, this process alone)",
                "inputs": inputs,
            })
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=("recommend", "speed"))
    p.add_argument("folder", type=Path)
    p.add_argument("--prefix", default="")
    a = p.parse_args()
    rows = (recommend_points if a.kind == "recommend" else speed_points)(a.folder, a.prefix)
    sys.stdout.write("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
