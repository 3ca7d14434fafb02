#!/usr/bin/env bash
# New families on one GPU, through `vlmtune train` (issues 16 and 17), full-size architectures with random weights:
#   PART=instructblip  InstructBLIP-Vicuna-7B: QLoRA capped to an 8 GB card (RTX 4060: 8,188 MiB, the process capped
#                      to 8,188 - 769 MiB of CUDA context through hardware.memory_fraction), and LoRA on the full card
#   PART=qwen_vl       Qwen-VL-Chat (vlmtune's port): the same two runs, 448 px (256 image tokens)
#   PART=instructblip,more  also InstructBLIP QLoRA with the lean settings (8 GB) and on the full card
#   PART=lowmem        issue 19's 8 GB promise and issue 16's Qwen-VL-Chat QLoRA on 8 GB, loading included: random
#                      weights written to disk first (built on the GPU in bf16, `tiny-model --with-weights --device
#                      cuda`), then loaded by `vlmtune train` as a user loads real ones (from_pretrained, 4-bit while
#                      loading). Qwen2.5-VL-7B with `--preset ultra_low_memory` at 336 px + 512 text tokens (max_length
#                      raised to 1024 so the text is not cut), capped to 8 GB, then the same data with vlmtune's plain
#                      QLoRA (lean off, r8) on the full card; first Qwen-VL-Chat lean QLoRA at 448 px + 512, capped.
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

if [[ $PART == *lowmem* ]]; then
  lowmem=(training.max_steps=$STEPS training.logging_steps=2 training.save_checkpoints=false "training.report_to=[none]"
          training.gradient_accumulation_steps=1 hardware.dataloader_workers=4 data.max_length=1024)
  t0=$SECONDS
  python3 -m vlmtune.cli tiny-model --family qwen_vl --arch 7b --with-weights --device cuda --out /tmp/qvlw \
      > /dev/null && echo "qwen-vl-chat random weights written in $((SECONDS - t0)) s" | tee -a "$OUT/versions.txt"
  python3 benchmarks/make_bench_data.py --model /tmp/qvlw --n 40 --image-side 448 --text-tokens 512 --out /tmp/bqvl
  train_run qvl7b_qlora_lean_8gb "${lowmem[@]}" model.name_or_path=/tmp/qvlw data.train_path=/tmp/bqvl/train.jsonl \
      method.name=qlora method.quantization.lean=true method.lora.rank=16 method.lora.alpha=32 \
      method.lora.target_modules=all training.batch_size=1 hardware.gradient_checkpointing=true \
      hardware.memory_fraction=$cap_8gb
  rm -rf /tmp/qvlw
  t0=$SECONDS
  python3 -m vlmtune.cli tiny-model --family qwen2_5_vl --arch 7b --with-weights --device cuda --out /tmp/q25w \
      > /dev/null && echo "qwen2.5-vl-7b random weights written in $((SECONDS - t0)) s" | tee -a "$OUT/versions.txt"
  python3 benchmarks/make_bench_data.py --model /tmp/q25w --n 40 --image-side 336 --text-tokens 512 --out /tmp/b336
  q25=(model.name_or_path=/tmp/q25w data.train_path=/tmp/b336/train.jsonl)
  python3 -m vlmtune.cli estimate --preset ultra_low_memory --model /tmp/q25w --seq-len 656 --image-size 336 \
      --gpu "RTX 4060" > "$OUT/estimate_q25_ulm.txt" 2>&1
  train_run q25_ulm_8gb --preset ultra_low_memory "${lowmem[@]}" "${q25[@]}" hardware.memory_fraction=$cap_8gb
  train_run q25_qlora_r8 "${lowmem[@]}" "${q25[@]}" method.name=qlora method.lora.rank=8 method.lora.alpha=16 \
      method.lora.target_modules=all training.batch_size=1 hardware.gradient_checkpointing=true
  rm -rf /tmp/q25w
fi

# second-priority runs (each part's first two answer the issues): QLoRA with the lean settings and on the full card
if [[ $PART == *instructblip* && $PART == *more* ]]; then
  train_run ib7b_qlora_8gb_lean "${common[@]}" "${ib[@]}" method.name=qlora hardware.memory_fraction=$cap_8gb \
      method.quantization.quantize_vision_tower=true method.quantization.quantize_lm_head=true
  train_run ib7b_qlora "${common[@]}" "${ib[@]}" method.name=qlora
fi
