#!/usr/bin/env bash
# New families on one GPU, through `vlmtune train` (issues 16 and 17), full-size architectures with random weights:
#   PART=instructblip  InstructBLIP-Vicuna-7B: QLoRA capped to an 8 GB card (RTX 4060: 8,188 MiB, the process capped
#                      to 8,188 - 769 MiB of CUDA context through hardware.memory_fraction), and LoRA on the full card
#   PART=qwen_vl       Qwen-VL-Chat (vlmtune's port): the same two runs, 448 px (256 image tokens)
#   PART=instructblip,more  also InstructBLIP QLoRA with the lean settings (8 GB) and on the full card
# PART may name several: PART=instructblip,qwen_vl.
# Batch 1 x (224 px image: InstructBLIP's fixed resolution, 32 query tokens + ~512 text tokens), LoRA r16 on all
# linear layers of the language model, gradient checkpointing, bf16, no checkpoints, 20 steps.
# Run on the GPU machine from the repo root with the wheels of benchmarks/README.md in .whl/ (bitsandbytes, pydantic):
#   OUT=/tmp/out PART=instructblip bash benchmarks/gpu_families.sh
# Per run: $OUT/summary.jsonl (tokens/s median, peaks, nvidia-smi peak, the estimate the run printed), logs in
# $OUT/logs.tar.gz (gpu_train_run.sh).
set -uo pipefail
OUT=${OUT:-/tmp/vlmtune-families}
PART=${PART:-instructblip}
STEPS=${STEPS:-20}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh
source benchmarks/gpu_train_run.sh
gpu_versions "$OUT/versions.txt"

card_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
cap_8gb=$(python3 -c "print(round((8188 - 769) / $card_mib, 4))")
echo "card $card_mib MiB; 8 GB cap: memory_fraction $cap_8gb" | tee -a "$OUT/versions.txt"

common=(model.random_init=true training.max_steps=$STEPS training.logging_steps=2 training.save_checkpoints=false
        "training.report_to=[none]" training.batch_size=1 hardware.gradient_checkpointing=true
        hardware.dataloader_workers=4 hardware.force_fit=true method.lora.rank=16 method.lora.alpha=32
        method.lora.target_modules=all data.max_length=1024)

if [[ $PART == *instructblip* ]]; then
  python3 -m vlmtune.cli tiny-model --family instructblip --arch 7b --out /tmp/ib7b > /dev/null
  python3 benchmarks/make_bench_data.py --model /tmp/ib7b --n 40 --image-side 224 --text-tokens 512 --out /tmp/benchib
  ib=(model.name_or_path=/tmp/ib7b data.train_path=/tmp/benchib/train.jsonl)
  python3 -m vlmtune.cli estimate --model /tmp/ib7b --method qlora --batch-size 1 --seq-len 544 --gpu "RTX 4060" \
      > "$OUT/estimate_ib7b_qlora.txt" 2>&1
  train_run ib7b_qlora_8gb "${common[@]}" "${ib[@]}" method.name=qlora hardware.memory_fraction=$cap_8gb
  train_run ib7b_lora "${common[@]}" "${ib[@]}" method.name=lora
fi

if [[ $PART == *qwen_vl* ]]; then
  python3 -m vlmtune.cli tiny-model --family qwen_vl --arch 7b --out /tmp/qvl7b > /dev/null
  python3 benchmarks/make_bench_data.py --model /tmp/qvl7b --n 40 --image-side 448 --text-tokens 512 --out /tmp/benchqvl
  qvl=(model.name_or_path=/tmp/qvl7b data.train_path=/tmp/benchqvl/train.jsonl)
  python3 -m vlmtune.cli estimate --model /tmp/qvl7b --method qlora --batch-size 1 --seq-len 768 --gpu "RTX 4060" \
      > "$OUT/estimate_qvl7b_qlora.txt" 2>&1
  train_run qvl7b_qlora_8gb "${common[@]}" "${qvl[@]}" method.name=qlora hardware.memory_fraction=$cap_8gb
  train_run qvl7b_lora "${common[@]}" "${qvl[@]}" method.name=lora
fi

# second-priority runs (each part's first two answer the issues): QLoRA with the lean settings and on the full card
if [[ $PART == *instructblip* && $PART == *more* ]]; then
  train_run ib7b_qlora_8gb_lean "${common[@]}" "${ib[@]}" method.name=qlora hardware.memory_fraction=$cap_8gb \
      method.quantization.quantize_vision_tower=true method.quantization.quantize_lm_head=true
  train_run ib7b_qlora "${common[@]}" "${ib[@]}" method.name=qlora
fi
