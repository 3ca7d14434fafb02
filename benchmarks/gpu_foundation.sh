#!/usr/bin/env bash
# Foundation GPU runs (issue 2): LoRA and QLoRA of the Qwen2-VL-2B architecture (random weights) through
# `vlmtune train`, batch 4 x (448 px image = 256 tokens + ~512 text tokens), gradient checkpointing on.
# Run on the GPU machine from the repo root with the wheels of benchmarks/README.md in .whl/:
#   OUT=/tmp/out bash benchmarks/gpu_foundation.sh
set -euo pipefail
OUT=${OUT:-/tmp/vlmtune-bench}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh
V=(python3 -m vlmtune.cli)
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" | tee -a "$OUT/versions.txt"
"${V[@]}" tiny-model --family qwen2_vl --arch 2b --out /tmp/m2b
python3 benchmarks/make_bench_data.py --model /tmp/m2b --n 160 --image-side 448 --text-tokens 512 --out /tmp/bench
common=(model.name_or_path=/tmp/m2b model.random_init=true data.train_path=/tmp/bench/train.jsonl
        data.image_size=448 data.max_length=1024 training.batch_size=4 training.gradient_accumulation_steps=1
        training.max_steps=${STEPS:-40} training.logging_steps=5 training.save_steps=100000 "training.report_to=[none]"
        method.lora.rank=16 method.lora.alpha=32 method.lora.target_modules=all hardware.gradient_checkpointing=true)
for m in ${METHODS:-lora qlora}; do
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/smi_$m.csv" &
  smi=$!
  "${V[@]}" train "${common[@]}" method.name=$m output_dir=/tmp/run_$m > "$OUT/$m.log" 2>&1 || echo "run $m failed"
  kill $smi || true
  cp /tmp/run_$m/train_log.jsonl "$OUT/${m}_train_log.jsonl" || true
  python3 benchmarks/summarize_log.py "$OUT/${m}_train_log.jsonl" "$OUT/smi_$m.csv" --label "$m" | tee -a "$OUT/summary.txt"
  tail -5 "$OUT/$m.log"
done
