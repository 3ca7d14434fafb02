# ruff: noqa: E731, E702  (a one-off data builder, kept as run)
"""Builds tests/memory/data/vlmtune_points.jsonl from the 2026-11-24 speed and multi-GPU results and the session-3
DeepSpeed offload and held-out points (derivation in each row's `derived`). Needs the logs unpacked first (their
memory_preflight inputs): mkdir -p /tmp/mg /tmp/ds1 /tmp/ds2 && tar xzf
benchmarks/results/2026-11-24-multi-gpu/logs_7b.tar.gz -C /tmp/mg && tar xzf
benchmarks/results/2026-11-24b-session3/deepspeed/logs.tar.gz -C /tmp/ds1 && tar xzf
benchmarks/results/2026-11-24b-session3/deepspeed2/logs.tar.gz -C /tmp/ds2 (and session4_rows()'s)"""
import json
from pathlib import Path

R = Path("/work/main/benchmarks/results")
GIB = 1024  # MiB per GiB

def base(model, method, batch, seq, img_tokens, patches, labelled, gc):
    return {"model": model, "method": method, "lora_rank": 16, "lora_targets": "all", "lora_dropout": 0.05,
            "adapt_vision_tower": False, "train_projector": False, "freeze_vision_tower": True,
            "quantize_vision_tower": False, "quantize_lm_head": False, "double_quant": True,
            "batch_size": batch, "gradient_accumulation_steps": 1, "seq_len": seq, "images_per_sample": 1,
            "image_hw": [448, 448], "image_size": 448, "min_pixels": None, "max_pixels": None,
            "vit_patches_per_batch": patches, "image_tokens_per_sample": img_tokens,
            "gradient_checkpointing": gc, "precision": "bf16", "optimizer": "adamw_torch_fused",
            "attn_implementation": "sdpa", "chunked_loss": True, "loss_chunk_tokens": 1024,
            "labelled_tokens": labelled, "vision_no_grad": True, "autocast": True, "lora_16bit_inputs": True,
            "embeddings_on_cpu": False, "checkpoint_every": 1, "checkpoint_offload": False,
            "zero_stage": 0, "offload": "none", "num_gpus": 1, "gpu": None}

Q2 = "Qwen/Qwen2-VL-2B-Instruct"
Q7 = "Qwen/Qwen2.5-VL-7B-Instruct"
SPEED = ("benchmarks/speed/engine_run.py config_dict (adamw_torch_fused, bf16, sdpa, LoRA r16 a32 d0.05 all) + "
         "workloads.py overrides; shape from the run log's preflight lines (Sequence: tokens per sample incl. "
         "258 image tokens, vision patches per micro-batch); labelled tokens: 484 per 770-token sample (the grid's "
         "data of the same shape), text minus 28 template tokens for W2")
def speed_rows():
    out = []
    def add(pid, src, inputs, alloc, res, smi, note=""):
        out.append({"id": pid, "source": src, "meas_alloc_mib": round(alloc * GIB), "meas_reserved_mib": round(res * GIB),
                    "meas_smi_device_mib": round(smi * GIB), "level": "reserved+context", "derived": SPEED + note, "inputs": inputs})
    w1 = lambda **k: {**base(Q2, "lora", 4, 770, 258, 4096, 1937, True), **k}
    # W1 (part1): printed only, RESULTS.md W1 table (2 decimals)
    add("W1-vlmtune_gc", "benchmarks/RESULTS.md W1 table (part1)", w1(), 6.06, 6.73, 7.95)
    add("W1-vlmtune_gc2", "benchmarks/RESULTS.md W1 table (part1)", w1(checkpoint_every=2), 11.35, 12.47, 13.69)
    rows = {}
    for part in ("part2", "part3", "followup"):
        for line in (R / "2026-11-24-speed" / part / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("path") == "vlmtune":
                rows[(r["workload"], r["variant"])] = (part, r)
    def m(key):
        part, r = rows[key]
        return (f"benchmarks/results/2026-11-24-speed/{part}/results.jsonl",
                r["peak_allocated_gib"], r["peak_reserved_gib"], r["smi_in_process_gib"])
    s, a, re_, sm = m(("W1x", "vlmtune_nogc"))
    add("W1x-vlmtune_nogc", s, w1(gradient_checkpointing=False), a, re_, sm)
    s, a, re_, sm = m(("W1x", "vlmtune_nogc_no_chunked"))
    add("W1x-vlmtune_nogc_no_chunked", s, w1(gradient_checkpointing=False, chunked_loss=False), a, re_, sm)
    s, a, re_, sm = m(("W1x", "vlmtune_nogc_none"))
    add("W1x-vlmtune_nogc_none", s, w1(gradient_checkpointing=False, chunked_loss=False, vision_no_grad=False,
                                        lora_16bit_inputs=False), a, re_, sm)
    w3 = lambda **k: {**base(Q7, "lora", 4, 769, 258, 4096, 1936, True), **k}
    s, a, re_, sm = m(("W3", "vlmtune_gc")); add("W3-vlmtune_gc", s, w3(), a, re_, sm)
    s, a, re_, sm = m(("W3", "vlmtune_gc2")); add("W3-vlmtune_gc2", s, w3(checkpoint_every=2), a, re_, sm)
    w4 = lambda **k: {**base(Q2, "full", 4, 770, 258, 4096, 1937, True), **k}
    s, a, re_, sm = m(("W4", "vlmtune_gc")); add("W4-vlmtune_gc", s, w4(), a, re_, sm)
    s, a, re_, sm = m(("W4", "vlmtune_gc2")); add("W4-vlmtune_gc2", s, w4(checkpoint_every=2), a, re_, sm)
    w2 = lambda **k: {**base(Q7, "qlora", 1, 401, 146, 576, 227, True), "image_hw": [336, 336], "image_size": 336, **k}
    s, a, re_, sm = m(("W2", "vlmtune_gc")); add("W2-vlmtune_gc", s, w2(), a, re_, sm)
    s, a, re_, sm = m(("W2", "vlmtune_lean"))
    add("W2-vlmtune_lean", s, w2(quantize_vision_tower=True, quantize_lm_head=True, optimizer="paged_adamw_8bit"),
        a, re_, sm, "; lean as run: embeddings_on_cpu was not yet in the variant (config_overrides of the row)")
    # W5: spread data, the measured batches are not known: the preflight's worst case is an upper bound only
    w5 = {**base(Q2, "lora", 4, 2884, 2306, 36484, 2400, True), "image_hw": [1344, 1344], "image_size": None,
          "min_pixels": 224 * 224, "max_pixels": 1344 * 1344}
    s, a, re_, sm = m(("W5", "vlmtune_padded"))
    add("W5-vlmtune_padded", s, w5, a, re_, sm, "; W5 spread: worst micro-batch of the data set (preflight), not "
        "the measured steps' batches: an upper bound, labelled tokens approximate (4 x 600)")
    s, a, re_, sm = m(("W5", "vlmtune_packed"))
    add("W5-vlmtune_packed", s, {**w5, "batch_size": 1, "seq_len": 12288, "vit_patches_per_batch": 36864,
                                 "labelled_tokens": 2400},
        a, re_, sm, "; W5 packed: one row of <= 12,288 tokens (speed.packing_max_tokens), up to 4 images of "
        "9,216 patches: an upper bound")
    for row in out:
        if row["id"].startswith("W5"):
            row["level"] = "bound"
    return out

def mg_rows():
    out = []
    for line in (R / "2026-11-24-multi-gpu/summary.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["label"] not in ("2b_lora_z2_g1", "2b_lora_z2_g2", "7b_full_z3_g2"):
            continue
        pre = [json.loads(x) for x in Path(f"/tmp/mg/dslogs/{r['label']}/train_log.jsonl").read_text().splitlines()
               if '"memory_preflight"' in x][0]
        inputs = dict(pre["inputs"], model=Q2 if "2b" in r["label"] else Q7)
        inputs.setdefault("embeddings_on_cpu", False)
        out.append({"id": r["label"], "source": "benchmarks/results/2026-11-24-multi-gpu/summary.jsonl",
                    "meas_alloc_mib": round(r["peak_allocated_gib"] * GIB),
                    "meas_reserved_mib": round(r["peak_reserved_gib"] * GIB),
                    "meas_smi_device_mib": round(r["nvidia_smi_peak_gib"] * GIB), "level": "nvidia-smi",
                    "derived": "the run's own memory_preflight inputs (logs_7b.tar.gz train_log.jsonl), H200; "
                               "compared with the nvidia-smi reading of the busiest GPU (the DeepSpeed process and NCCL memory outside the allocator included; an idle H200 reads 0)",
                    "inputs": inputs})
    return out

S3 = R / "2026-11-24b-session3"
MODELS = {"/tmp/m2b": Q2, "/tmp/m3b": "Qwen/Qwen2.5-VL-3B-Instruct"}

def _preflight_row(r, unpacked, source, models, derived):
    """One nvidia-smi-level point from a gpu_deepspeed.sh summary line and its run's memory_preflight inputs;
    `derived` maps the inputs to the row's derivation text."""
    log = Path(f"{unpacked}/dslogs/{r['label']}/train_log.jsonl").read_text().splitlines()
    pre = [json.loads(x) for x in log if '"memory_preflight"' in x][0]
    inputs = dict(pre["inputs"], model=models[pre["inputs"]["model"]])
    return {"id": r["label"], "source": source, "meas_alloc_mib": round(r["peak_allocated_gib"] * GIB),
            "meas_reserved_mib": round(r["peak_reserved_gib"] * GIB),
            "meas_smi_device_mib": round(r["nvidia_smi_peak_gib"] * GIB), "level": "nvidia-smi",
            "derived": derived(inputs), "inputs": inputs}

def session3_rows():
    """The 1-GPU DeepSpeed offload runs (and 3B without DeepSpeed) at the nvidia-smi level; the deepspeed/ run of
    2b_lora_z3_offall was cut at 2 steps by a timeout: deepspeed2/'s (6 steps) is used. Then the held-out points."""
    out = []
    for part, unpacked, labels in (
        ("deepspeed", "/tmp/ds1", ("2b_full_z2_offopt", "2b_full_z3_offall", "3b_full_plain", "3b_full_z2_offopt")),
        ("deepspeed2", "/tmp/ds2", ("2b_lora_z3_offall", "3b_full_z3_offopt")),
    ):
        for line in (S3 / part / "summary.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["label"] not in labels or "skipped" in r:
                continue
            out.append(_preflight_row(
                r, unpacked, f"benchmarks/results/2026-11-24b-session3/{part}/summary.jsonl", MODELS,
                lambda inputs, part=part: f"the run's own memory_preflight inputs ({part}/logs.tar.gz train_log.jsonl), one "
                               "H100, DeepSpeed 0.19.8; nvidia-smi peak of the GPU (200 ms trace, one process: "
                               "DeepSpeed's memory outside the allocator included)"))
    for line in (S3 / "heldout" / "calibration.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("meas_reserved_mib") is None:
            continue
        out.append({"id": r["id"], "source": "benchmarks/results/2026-11-24b-session3/heldout/calibration.jsonl",
                    "meas_alloc_mib": r["meas_alloc_mib"], "meas_reserved_mib": r["meas_reserved_mib"],
                    "meas_smi_device_mib": r["meas_smi_process_mib"], "level": "reserved+context",
                    "derived": "held-out calibration point (shapes the estimator's terms were not derived from): the "
                               "run's memory_preflight inputs as recorded, model = catalogue_model",
                    "inputs": dict(r["inputs"], model=r["catalogue_model"], gpu=None)})
    return out

S4 = R / "2026-11-24c-session4"

def session4_rows():
    """The session-4 1-GPU runs (benchmarks/gpu_deepspeed.sh: 7B full fine-tuning without DeepSpeed on an H100, ZeRO-3
    + optimizer offload with sub_group_size 5e8, whole and partial (distributed.offload_ratio), on an H200) at the
    nvidia-smi level, as session3_rows(); the failed labels of these parts are left out. Unpack first:
    mkdir -p /tmp/s4_7b /tmp/s4_7bh /tmp/s4_2bh &&
    tar xzf benchmarks/results/2026-11-24c-session4/deepspeed-7b/logs.tar.gz -C /tmp/s4_7b &&
    tar xzf benchmarks/results/2026-11-24c-session4/deepspeed-7b-h200/logs.tar.gz -C /tmp/s4_7bh &&
    tar xzf benchmarks/results/2026-11-24c-session4/deepspeed-2b-h200/logs.tar.gz -C /tmp/s4_2bh"""
    out = []
    models = {"/tmp/m2b": Q2, "/tmp/m7b": Q7}
    for part, unpacked, gpu, labels in (
        ("deepspeed-7b", "/tmp/s4_7b", "H100", ("7b_full_plain",)),
        ("deepspeed-7b-h200", "/tmp/s4_7bh", "H200", ("7b_full_z3_offopt_r4",)),
        ("deepspeed-2b-h200", "/tmp/s4_2bh", "H200", ("2b_full_z3_offopt", "2b_full_z3_offopt_r5")),
    ):
        for line in (S4 / part / "summary.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["label"] not in labels or r["rc"] != 0:
                continue
            out.append(_preflight_row(
                r, unpacked, f"benchmarks/results/2026-11-24c-session4/{part}/summary.jsonl", models,
                lambda inputs, part=part, gpu=gpu: f"the run's own memory_preflight inputs ({part}/logs.tar.gz train_log.jsonl"
                               + ("; no DeepSpeed: offload_ratio / sub_group_size at their defaults, unused), one "
                                  "H100 (nvidia-smi peak 78.15 of 79.18 GiB: 1 GiB short of the card)"
                                  if inputs["zero_stage"] == 0 else
                                  "; offload_ratio and sub_group_size as in its deepspeed_config.json), one "
                                  f"{gpu}{' (not an H100)' if gpu == 'H200' else ''}, DeepSpeed 0.19.8")
                               + "; nvidia-smi peak of the GPU (200 ms trace, one process"
                               + (": DeepSpeed's memory outside the allocator included)" if inputs["zero_stage"]
                                  else ")")))
    return out

S10 = R / "2026-12-07-session10"

def session10_rows():
    """Session 10's QLoRA runs that load their (random) weights from disk as a user loads real ones: issue 19's 8 GB
    runs (lowmem/) and the configs `vlmtune recommend` wrote for 8, 12 and 16 GB cards (recommend/), one H100, each
    capped to its card with hardware.memory_fraction. Unpack first: mkdir -p /tmp/s10_low /tmp/s10_rec && tar xzf
    benchmarks/results/2026-12-07-session10/lowmem/logs.tar.gz -C /tmp/s10_low && tar xzf
    benchmarks/results/2026-12-07-session10/recommend/logs.tar.gz -C /tmp/s10_rec"""
    out = []
    models = {"/tmp/q25w": Q7, "/tmp/weights_qwen2_5_vl7b": Q7, "/tmp/weights_llava7b": "llava-hf/llava-1.5-7b-hf",
              "/tmp/qvlw": "Qwen/Qwen-VL-Chat"}
    for part, unpacked in (("lowmem", "/tmp/s10_low"), ("recommend", "/tmp/s10_rec")):
        for line in (S10 / part / "summary.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("rc") != 0 or any(row["id"] == r["label"] for row in out):
                continue
            out.append(_preflight_row(
                r, unpacked, f"benchmarks/results/2026-12-07-session10/{part}/summary.jsonl", models,
                lambda inputs, part=part: f"the run's own memory_preflight inputs ({part}/logs.tar.gz train_log.jsonl; "
                               "model = the catalogue's id of the architecture it was built from), one H100, QLoRA "
                               "weights loaded from disk (4-bit while loading), capped to the card; nvidia-smi peak "
                               "of the GPU (200 ms trace, one process)"))
    return out

rows = speed_rows() + mg_rows() + session3_rows() + session4_rows() + session10_rows()
Path("/work/main/tests/memory/data/vlmtune_points.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
print(len(rows))
