#!/usr/bin/env bash
# Does PyTorch's expandable-segments allocator remove the reserved-but-unused memory that QLoRA runs loading their
# weights from disk show (session 10: reserved - allocated 0.7-1.8 GiB against 0.07 GiB for the same setting built
# with random weights in place)? The runs of gpu_families.sh PART=lowmem / gpu_recommend.sh again, with
# PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; compare with their summary lines of that session.
#   OUT=$OUT bash benchmarks/gpu_allocator.sh
set -uo pipefail
OUT=${OUT:-/tmp/vlmtune-allocator}
STEPS=${STEPS:-8}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh
source benchmarks/gpu_train_run.sh
gpu_versions "$OUT/versions.txt"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
card_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
cap_8gb=$(python3 -c "print(round((8188 - 769) / $card_mib, 4))")
common=(training.max_steps=$STEPS training.logging_steps=1 training.save_checkpoints=false "training.report_to=[none]"
        training.gradient_accumulation_steps=1 hardware.dataloader_workers=4 data.max_length=1024)
python3 -m vlmtune.cli tiny-model --family qwen2_5_vl --arch 7b --with-weights --device cuda --out /tmp/q25w > /dev/null
python3 benchmarks/make_bench_data.py --model /tmp/q25w --n 40 --image-side 336 --text-tokens 512 --out /tmp/b336
q25=(model.name_or_path=/tmp/q25w data.train_path=/tmp/b336/train.jsonl)
train_run q25_qlora_r8_expandable "${common[@]}" "${q25[@]}" method.name=qlora method.lora.rank=8 \
    method.lora.alpha=16 method.lora.target_modules=all training.batch_size=1 hardware.gradient_checkpointing=true
train_run q25_ulm_8gb_expandable --preset ultra_low_memory "${common[@]}" "${q25[@]}" \
    hardware.memory_fraction=$cap_8gb
rm -rf /tmp/q25w
python3 -m vlmtune.cli tiny-model --family llava --arch 7b --with-weights --device cuda --out /tmp/llava7b > /dev/null
python3 benchmarks/make_bench_data.py --model /tmp/llava7b --n 40 --image-side 448 --text-tokens 440 --out /tmp/bl448
python3 -m vlmtune.cli recommend --gpu "RTX 4060 Ti 16GB" --model llava-hf/llava-1.5-7b-hf --preset consumer_16gb \
    -o /tmp/llava16.yaml > "$OUT/recommend_llava16.txt" 2>&1
cap_16gb=$(python3 -c "
from vlmtune.memory import get_gpu
print(round((get_gpu('RTX 4060 Ti 16GB').usable_bytes / 2**20 - 769) / $card_mib, 5))")
train_run llava7b_16gb_expandable /tmp/llava16.yaml model.name_or_path=/tmp/llava7b \
    data.train_path=/tmp/bl448/train.jsonl training.max_steps=$STEPS training.gradient_accumulation_steps=1 \
    training.logging_steps=1 training.save_checkpoints=false "training.report_to=[none]" \
    hardware.dataloader_workers=4 hardware.memory_fraction=$cap_16gb
