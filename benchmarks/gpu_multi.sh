#!/usr/bin/env bash
# Multi-GPU runs (issue 5) on a machine of several GPUs, through `vlmtune train --num-gpus N` (torchrun + DeepSpeed):
#   PART=scale  Qwen2-VL-2B architecture, LoRA r16 all linear, ZeRO-2, batch 4 x (448 px + ~512 text) per GPU, on
#               1, 2, 4, 8 GPUs (up to NGPUS): tokens/s of all GPUs together and the scaling efficiency.
#   PART=7b     Qwen2.5-VL-7B architecture, full fine-tuning, ZeRO-3, batch 1 per GPU, on NGPUS GPUs: per-GPU peak
#               (nvidia-smi) against the estimate the run printed before loading the model, tokens/s.
#   PART=mixed  Qwen2-VL-2B architecture (weights written, so a plain process can reload it), LoRA, ZeRO-3, on NGPUS
#               GPUs, batch 1, every second record without an image (ranks disagree on images at most steps): no
#               hang, loss falls; the saved adapter reloaded on one GPU gives the training processes' logits; a run
#               resumed from the step-15 ZeRO checkpoint on NGPUS GPUs repeats the losses of steps 16-30.
# Run from the repo root on the GPU machine, wheels in .whl/ (pydantic + deps, deepspeed, hjson, bitsandbytes):
#   OUT=$OUT PART="scale 7b mixed" DEADLINE=540 bash benchmarks/gpu_multi.sh
# Results: $OUT/summary.jsonl (one line per run, benchmarks/summarize_log.py), $OUT/checks.jsonl (reload, resume),
# $OUT/logs.tar.gz (each run's console log, train_log.jsonl, DeepSpeed config, nvidia-smi and host-RAM traces).
set -uo pipefail
OUT=${OUT:-/tmp/vlmtune-multi}
PART=${PART:-scale 7b mixed}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh
source benchmarks/gpu_train_run.sh
gpu_versions "$OUT/versions.txt"
NGPUS=${NGPUS:-$(nvidia-smi -L | wc -l)}
V=(python3 -m vlmtune.cli)

common=(data.image_size=448 data.max_length=1024 training.logging_steps=2 training.save_checkpoints=false
        "training.report_to=[none]" hardware.gradient_checkpointing=true hardware.dataloader_workers=4
        hardware.force_fit=true)
lora=(method.name=lora method.lora.rank=16 method.lora.alpha=32 method.lora.target_modules=all)

if [[ $PART == *scale* ]]; then
  "${V[@]}" tiny-model --family qwen2_vl --arch 2b --out /tmp/m2b > /dev/null
  python3 benchmarks/make_bench_data.py --model /tmp/m2b --n 128 --image-side 448 --text-tokens 512 --out /tmp/bench2b
  for n in 1 2 4 8; do
    (( n <= NGPUS )) || break
    train_run "2b_lora_z2_g$n" "${common[@]}" "${lora[@]}" model.name_or_path=/tmp/m2b model.random_init=true \
      data.train_path=/tmp/bench2b/train.jsonl training.batch_size=4 training.max_steps=${SCALE_STEPS:-24} \
      --num-gpus "$n" --zero-stage 2
  done
  python3 - "$OUT/summary.jsonl" <<'PY' | tee -a "$OUT/checks.jsonl"
import json, sys
rows = {r["label"]: r for r in map(json.loads, open(sys.argv[1])) if r.get("label", "").startswith("2b_lora_z2_g")}
one = (rows.get("2b_lora_z2_g1") or {}).get("tokens_per_second_median")
for label, r in sorted(rows.items(), key=lambda kv: int(kv[0].rsplit("g", 1)[1])):
    n, tps = int(label.rsplit("g", 1)[1]), r.get("tokens_per_second_median")
    eff = round(tps / (n * one), 3) if tps and one else None
    print(json.dumps({"check": "scaling", "gpus": n, "tokens_per_second": tps, "efficiency_vs_linear": eff}))
PY
fi

if [[ $PART == *mixed* ]] && (( SECONDS + 120 < DEADLINE )); then
  "${V[@]}" tiny-model --family qwen2_vl --arch 2b --with-weights --out /tmp/m2bw > /dev/null
  python3 benchmarks/make_bench_data.py --model /tmp/m2bw --n 64 --image-side 448 --text-tokens 256 --out /tmp/mix
  python3 benchmarks/multi_gpu.py mixed /tmp/mix/train.jsonl /tmp/mix/mixed.jsonl
  python3 benchmarks/multi_gpu.py batch /tmp/m2bw /tmp/mix/mixed.jsonl /tmp/mix/batch.pt
  cat > /tmp/mix/config.yaml <<YAML
output_dir: /tmp/mix/run
model: {name_or_path: /tmp/m2bw}
data: {train_path: /tmp/mix/mixed.jsonl, image_size: 448, max_length: 1024}
method: {name: lora, lora: {rank: 16, alpha: 32, target_modules: all}}
training: {max_steps: 30, batch_size: 1, learning_rate: 1.0e-3, logging_steps: 1, save_steps: 15,
           save_total_limit: 2, report_to: [none]}
hardware: {gradient_checkpointing: true, force_fit: true, dataloader_workers: 2}
distributed: {zero_stage: 3, num_gpus: $NGPUS}
YAML
  mkdir -p /tmp/dslogs/mixed
  timeout 240 python3 -m torch.distributed.run --standalone --nproc_per_node "$NGPUS" benchmarks/multi_gpu.py worker \
    /tmp/mix/config.yaml /tmp/mix/batch.pt /tmp/mix/logits.pt > /tmp/dslogs/mixed/console.log 2>&1
  echo "mixed ZeRO-3 worker run: rc $?"
  cp /tmp/mix/run/train_log.jsonl /tmp/dslogs/mixed/ 2>/dev/null
  python3 benchmarks/summarize_log.py /tmp/mix/run/train_log.jsonl --label "2b_lora_z3_mixed_g$NGPUS" | tee -a "$OUT/summary.jsonl"
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/multi_gpu.py reload /tmp/mix/run/final /tmp/mix/batch.pt /tmp/mix/logits.pt \
    2>/dev/null | tail -1 | tee -a "$OUT/checks.jsonl"
  cp -r /tmp/mix/run /tmp/mix/split && rm -rf /tmp/mix/split/checkpoint-30 /tmp/mix/split/final /tmp/mix/split/train_log.jsonl
  timeout 180 "${V[@]}" train /tmp/mix/config.yaml output_dir=/tmp/mix/split --num-gpus "$NGPUS" --resume \
    > /tmp/dslogs/mixed/resume_console.log 2>&1
  echo "resume run: rc $?"
  cp /tmp/mix/split/train_log.jsonl /tmp/dslogs/mixed/resume_train_log.jsonl 2>/dev/null
  python3 benchmarks/multi_gpu.py resume /tmp/mix/run/train_log.jsonl /tmp/mix/split/train_log.jsonl 15 \
    | tee -a "$OUT/checks.jsonl"
  tar -czf "$OUT/logs.tar.gz" -C /tmp dslogs
fi
if [[ $PART == *7b* ]]; then
  "${V[@]}" tiny-model --family qwen2_5_vl --arch 7b --out /tmp/m7b > /dev/null
  python3 benchmarks/make_bench_data.py --model /tmp/m7b --n 64 --image-side 448 --text-tokens 512 --out /tmp/bench7b
  RUN_TIMEOUT=${RUN_TIMEOUT_7B:-360} train_run "7b_full_z3_g$NGPUS" "${common[@]}" model.name_or_path=/tmp/m7b \
    model.random_init=true data.train_path=/tmp/bench7b/train.jsonl training.batch_size=1 method.name=full \
    training.max_steps=${STEPS_7B:-8} --num-gpus "$NGPUS" --zero-stage 3 ${EXTRA_7B:-}
fi

echo "done in $SECONDS s"
