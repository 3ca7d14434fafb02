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
# gpu_train_run.sh (ONLY="llava7b_16gb qwen2_vl2b_8gb": just these pairs); DRY=1 prepares everything and prints the runs instead of training (works on the CPU).
# Every pair's `recommend`, fields and data are prepared first, in parallel on the CPU cores (it took ~40 s a pair
# serially); then the GPU runs one pair at a time. A file that recommends DeepSpeed offload is trained too when deepspeed is installed (carried
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
[[ ${DRY:-0} == 1 ]] && train_run() { echo "DRY: train_run $*" | tee -a "$OUT/summary.jsonl"; }
gpu_versions "$OUT/versions.txt"

declare -A HUB=([qwen2_vl:2b]=Qwen/Qwen2-VL-2B-Instruct [qwen2_5_vl:7b]=Qwen/Qwen2.5-VL-7B-Instruct
                [llava:7b]=llava-hf/llava-1.5-7b-hf [llava:13b]=llava-hf/llava-1.5-13b-hf)
declare -A CARD=([8]="RTX 4060 8GB" [12]="RTX 3060 12GB" [16]="RTX 4060 Ti 16GB" [24]="RTX 4090 24GB"
                 [80]="H100 80GB")
declare -A PRESET=([8]=ultra_low_memory [12]=ultra_low_memory [16]=consumer_16gb [24]=consumer_24gb
                   [80]=high_capacity)

# Phase 1, on the CPU cores in parallel (about 40 s a pair when it ran serially before each training run): every
# pair's `recommend`, the fields its run needs, and each distinct data set once.
declare -A FIELDS
for model in $MODELS; do
  family=${model%%:*} arch=${model#*:} tag=${model//:/}
  python3 -m vlmtune.cli tiny-model --family "$family" --arch "$arch" --out /tmp/arch_$tag > /dev/null &
done
wait
for model in $MODELS; do
  hub=${HUB[$model]} tag=${model//:/}
  for card in $CARDS; do
    label=${tag}_${card}gb
    { python3 -m vlmtune.cli recommend --gpu "${CARD[$card]}" --model "$hub" --preset "${PRESET[$card]}" \
        -o /tmp/rec/$label.yaml > /tmp/rec/$label.txt 2>&1 || rm -f /tmp/rec/$label.yaml; } &
  done
done
wait
declare -A DATA  # data dir -> "arch_dir side length records"
for model in $MODELS; do
  tag=${model//:/}
  for card in $CARDS; do
    label=${tag}_${card}gb file=/tmp/rec/$label.yaml
    { echo "== $label: vlmtune recommend --gpu \"${CARD[$card]}\" --model ${HUB[$model]} --preset ${PRESET[$card]}"
      cat /tmp/rec/$label.txt; } >> "$OUT/recommend.txt"
    [[ -f $file ]] || continue
    FIELDS[$label]=$(python3 -c "import sys, yaml; d = yaml.safe_load(open(sys.argv[1]))
print(d['method']['name'], d['distributed']['offload'], d['data']['image_size'], d['data']['max_length'],
      d['training']['batch_size'])" "$file")
    read -r method offload side length batch <<< "${FIELDS[$label]}"
    data=/tmp/data_${tag}_${side}_$length n=$(( batch * (STEPS + 2) + 8 ))
    prev=${DATA[$data]:-}
    (( ${prev##* } > n )) 2>/dev/null && n=${prev##* }
    DATA[$data]="/tmp/arch_$tag $side $length $n"
  done
done
for data in "${!DATA[@]}"; do
  read -r arch_dir side length n <<< "${DATA[$data]}"
  [[ -f $data/train.jsonl ]] && continue
  (  # full-length records: the image, then text up to max_length
    image_tokens=$(python3 -c "
from vlmtune.families import family_for_model
from vlmtune.config.schema import DataConfig
f = family_for_model('$arch_dir'); p = f.load_processor('$arch_dir', DataConfig(image_size=$side))
print(f.image_token_count($side, $side, p))")
    python3 benchmarks/make_bench_data.py --model "$arch_dir" --n "$n" --image-side "$side" \
        --text-tokens $(( length - image_tokens - 8 )) --out "$data" > /dev/null
  ) &
done
wait
declare -A CAP  # card class -> hardware.memory_fraction
cards=(); for card in $CARDS; do cards+=("$card" "${CARD[$card]}"); done
while read -r card cap; do CAP[$card]=$cap; done < <(python3 -c "
import sys, torch
from vlmtune.memory import get_gpu
total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * 2**30
for card, name in zip(sys.argv[1::2], sys.argv[2::2]):
    print(card, round((get_gpu(name).usable_bytes - 769 * 2**20) / total, 5))" "${cards[@]}")
echo "prepared in $SECONDS s" | tee -a "$OUT/versions.txt"

# Phase 2, on the GPU one run at a time: each model's random weights (when a QLoRA file loads them), then its runs.
for model in $MODELS; do
  family=${model%%:*} arch=${model#*:} tag=${model//:/}
  arch_dir=/tmp/arch_$tag weights_dir=/tmp/weights_$tag
  for card in $CARDS; do
    label=${tag}_${card}gb file=/tmp/rec/$label.yaml
    [[ -z ${ONLY:-} || " $ONLY " == *" $label "* ]] || continue
    if [[ -z ${FIELDS[$label]:-} ]]; then
      echo "{\"label\": \"$label\", \"skipped\": \"recommend failed\"}" | tee -a "$OUT/summary.jsonl"; continue
    fi
    read -r method offload side length batch <<< "${FIELDS[$label]}"
    if [[ $offload != none ]] && ! python3 -c "import deepspeed" 2>/dev/null; then
      echo "{\"label\": \"$label\", \"skipped\": \"recommends DeepSpeed offload ($offload); deepspeed not installed\"}" \
        | tee -a "$OUT/summary.jsonl"; continue
    fi
    data=/tmp/data_${tag}_${side}_$length
    where=(model.name_or_path=$arch_dir model.random_init=true)
    if [[ $method == qlora ]]; then
      if [[ ! -d $weights_dir && ${DRY:-0} != 1 ]]; then
        if (( SECONDS + 120 > DEADLINE )); then
          echo "{\"label\": \"$label\", \"skipped\": \"deadline (weights)\"}" | tee -a "$OUT/summary.jsonl"; continue
        fi
        t0=$SECONDS
        python3 -m vlmtune.cli tiny-model --family "$family" --arch "$arch" --with-weights --device cuda \
            --out "$weights_dir" > /dev/null
        echo "$tag random weights written in $((SECONDS - t0)) s" | tee -a "$OUT/versions.txt"
      fi
      where=(model.name_or_path=$weights_dir)
    fi
    cap=${CAP[$card]}
    echo "$label: $method, micro-batch $batch, $side px, max_length $length, offload $offload, memory_fraction $cap" \
      | tee -a "$OUT/versions.txt"
    train_run "$label" "$file" "${where[@]}" data.train_path=$data/train.jsonl training.max_steps=$STEPS \
        training.gradient_accumulation_steps=1 training.logging_steps=1 training.save_checkpoints=false \
        "training.report_to=[none]" hardware.dataloader_workers=4 hardware.memory_fraction=$cap
  done
  rm -rf "$weights_dir"
done
