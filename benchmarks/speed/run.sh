#!/usr/bin/env bash
# Issue #6 speed harness on the GPU machine: plain transformers + PEFT path vs the same with Liger kernels vs
# vlmtune's engine, same models (random weights from the real configs) and same batches. Three calls, each under
# the 10-minute command limit (the suite stops starting variants when its 540 s budget runs out):
#   OUT=$OUT PART=1 bash benchmarks/speed/run.sh    # W1 Qwen2-VL-2B LoRA (7 variants) + correctness check
#   OUT=$OUT PART=2 bash benchmarks/speed/run.sh    # W3 Qwen2.5-VL-7B LoRA, W4 Qwen2-VL-2B full fine-tuning
#   OUT=$OUT PART=3 bash benchmarks/speed/run.sh    # W2 Qwen2.5-VL-7B QLoRA, W5 packing vs padding
# One workload (or the check) alone: ONLY=W3 (ONLY=check) OUT=$OUT bash benchmarks/speed/run.sh. The table again: python3 -m
# benchmarks.speed.bench table $OUT/results.jsonl. Results: $OUT/results.jsonl (one line per variant),
# $OUT/check.jsonl, $OUT/smi_peaks.jsonl, a log per variant, and $OUT/report.md (the printed table).
# Wheels (bitsandbytes, pydantic + its deps, liger-kernel) are carried in .whl/ (see ../shared/device/wheels.sh):
#   ../shared/device/wheels.sh -- bitsandbytes==0.50.2 liger-kernel==0.8.5 pydantic==2.14.3 ...
set -euo pipefail
OUT=${OUT:-/tmp/vlmtune-speed-out}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh
export BENCH_ROOT=${BENCH_ROOT:-/tmp/vlmtune-speed}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
args=(--out "$OUT" --budget-s "${BUDGET_S:-540}")
if [[ -n ${ONLY:-} ]]; then args+=(--only "$ONLY"); else args+=(--part "${PART:-1}"); fi
python3 -m benchmarks.speed.bench suite "${args[@]}" 2>&1 | tee -a "$OUT/report.md"
