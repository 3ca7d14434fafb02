#!/usr/bin/env bash
# Issue 19, item 5: does what `vlmtune recommend` writes train on the card it was written for? For each (card class,
# model) pair: `vlmtune recommend --gpu CARD --model HUB_ID --preset PRESET -o FILE` (offline, from the catalogue),
# then `vlmtune train FILE` on this GPU with the process capped to that card (hardware.memory_fraction = the card's
# usable memory less the CUDA context, 769 MiB measured, over this GPU's memory), on records as long as the file's
# data.max_length allows (an image of the file's data.image_size + text up to max_length: the worst case the estimate
# plans for), a few optimizer steps at the recommended micro-batch (accumulation 1: the peak does not depend on it).
# Models with random weights: built on the GPU (`tiny-model --arch --device cuda`); QLoRA files load them from disk
# as a user loads real ones (4-bit while loading), the others build them in place (model.random_init).
#   OUT=$OUT MODELS="qwen2_vl:2b qwen2_5_vl:7b" CARDS="8 12" bash benchmarks/gpu_recommend.sh
# MODELS (family:arch, default the guides' four), CARDS (8 12 16 24 80), STEPS (6), RUN_TIMEOUT, DEADLINE as in
# gpu_train_run.sh. A file that recommends DeepSpeed offload is trained too when deepspeed is installed (carried
# wheel), else skipped with the reason. Writes $OUT/summary.jsonl (one line per run: label, rc, tokens/s, the
# nvidia-smi peak, the estimate the run printed), $OUT/recommend.txt (what recommend printed per pair) and logs.
set -uo pipefail
OUT=${OUT:-/tmp/vlmtune-recommend}
MODELS=${MODELS:-"qwen2_vl:2b qwen2_5_vl:7b llava:7b llava:13b"}
CARDS=${CARDS:-"8 12 16 24 80"}
STEPS=${STEPS:-6}
mkdir -p "$OUT" /tmp/rec
source benchmarks/gpu_env.sh
source benchmarks/gpu_train_run.sh
gpu_versions "$OUT/versions.txt"

declare -A HUB=([qwen2_vl:2b]=Qwen/Qwen2-VL-2B-Instruct [qwen2_5_vl:7b]=Qwen/Qwen2.5-VL-7B-Instruct
                [llava:7b]=llava-hf/llava-1.5-7b-hf [llava:13b]=llava-hf/llava-1.5-13b-hf)
declare -A CARD=([8]="RTX 4060 8GB" [12]="RTX 3060 12GB" [16]="RTX 4060 Ti 16GB" [24]="RTX 4090 24GB"
                 [80]="H100 80GB")
declare -A PRESET=([8]=ultra_low_memory [12]=ultra_low_memory [16]=consumer_16gb [24]=consumer_24gb
                   [80]=high_capacity)

field() {  # field FILE DOTTED.KEY: one value of a written config
  python3 -c "import sys, yaml; d = yaml.safe_load(open(sys.argv[1]))
for k in sys.argv[2].split('.'): d = d[k]
print(d)" "$1" "$2"
}

for model in $MODELS; do
  family=${model%%:*} arch=${model#*:} hub=${HUB[$model]} tag=${model//:/}
  arch_dir=/tmp/arch_$tag weights_dir=/tmp/weights_$tag
  python3 -m vlmtune.cli tiny-model --family "$family" --arch "$arch" --out "$arch_dir" > /dev/null
  for card in $CARDS; do
    label=${tag}_${card}gb file=/tmp/rec/$label.yaml
    { echo "== $label: vlmtune recommend --gpu \"${CARD[$card]}\" --model $hub --preset ${PRESET[$card]}";
      python3 -m vlmtune.cli recommend --gpu "${CARD[$card]}" --model "$hub" --preset "${PRESET[$card]}" -o "$file"
    } >> "$OUT/recommend.txt" 2>&1 || { echo "{\"label\": \"$label\", \"skipped\": \"recommend failed\"}" \
                                         | tee -a "$OUT/summary.jsonl"; continue; }
    method=$(field "$file" method.name) offload=$(field "$file" distributed.offload)
    side=$(field "$file" data.image_size) length=$(field "$file" data.max_length)
    batch=$(field "$file" training.batch_size)
    if [[ $offload != none ]] && ! python3 -c "import deepspeed" 2>/dev/null; then
      echo "{\"label\": \"$label\", \"skipped\": \"recommends DeepSpeed offload ($offload); deepspeed not installed\"}" \
        | tee -a "$OUT/summary.jsonl"; continue
    fi
    data=/tmp/data_${tag}_${side}_$length
    if [[ ! -f $data/train.jsonl ]]; then  # full-length records: the image, then text up to max_length
      image_tokens=$(python3 -c "
from vlmtune.families import family_for_model
from vlmtune.config.schema import DataConfig
f = family_for_model('$arch_dir'); p = f.load_processor('$arch_dir', DataConfig(image_size=$side))
print(f.image_token_count($side, $side, p))")
      python3 benchmarks/make_bench_data.py --model "$arch_dir" --n $(( batch * (STEPS + 2) + 8 )) \
          --image-side "$side" --text-tokens $(( length - image_tokens - 8 )) --out "$data" > /dev/null
    fi
    where=(model.name_or_path=$arch_dir model.random_init=true)
    if [[ $method == qlora ]]; then
      if [[ ! -d $weights_dir ]]; then
        t0=$SECONDS
        python3 -m vlmtune.cli tiny-model --family "$family" --arch "$arch" --with-weights --device cuda \
            --out "$weights_dir" > /dev/null
        echo "$tag random weights written in $((SECONDS - t0)) s" | tee -a "$OUT/versions.txt"
      fi
      where=(model.name_or_path=$weights_dir)
    fi
    cap=$(python3 -c "
import torch
from vlmtune.memory import get_gpu
print(round((get_gpu('${CARD[$card]}').usable_bytes - 769 * 2**20) / torch.cuda.get_device_properties(0).total_memory, 5))")
    echo "$label: $method, micro-batch $batch, $side px, max_length $length, offload $offload, memory_fraction $cap" \
      | tee -a "$OUT/versions.txt"
    train_run "$label" "$file" "${where[@]}" data.train_path=$data/train.jsonl training.max_steps=$STEPS \
        training.gradient_accumulation_steps=1 training.logging_steps=1 training.save_checkpoints=false \
        "training.report_to=[none]" hardware.dataloader_workers=4 hardware.memory_fraction=$cap
  done
  rm -rf "$weights_dir"
done
