#!/usr/bin/env bash
# DeepSpeed GPU runs (issue 4) on ONE GPU, through `vlmtune train` (which starts torchrun for DeepSpeed runs):
#   PART=2b  Qwen2-VL-2B architecture, LoRA r16 (all linear) and full fine-tuning (vision tower frozen):
#            no DeepSpeed | ZeRO-2 | ZeRO-2 + optimizer offload | ZeRO-3 | ZeRO-3 + optimizer and parameter offload
#   PART=3b  Qwen2.5-VL-3B architecture, full fine-tuning: no DeepSpeed | ZeRO-2 / ZeRO-3 + optimizer offload (the
#            offload points that fit the ~126 GiB of host RAM of a one-GPU machine: about 70 GiB by the estimate)
#   PART=7b  Qwen2.5-VL-7B architecture, full fine-tuning: no DeepSpeed | ZeRO-3 + optimizer offload (~170 GiB of
#            host RAM by the estimate: a machine with 256 GiB) | ZeRO-3 + 65% of the optimizer offloaded
#            (7b_full_z3_offopt_r4: distributed.offload_ratio=0.4, RATIOS_7B="0.4 0.65" for more, labels r4 r65)
# Batch 4 (2B) / 1 (7B) x (448 px image = 256 image tokens + ~511 text tokens), gradient checkpointing on, bf16,
# random weights (model.random_init), no checkpoints; CHUNKED=false turns speed.chunked_loss off (the first run's
# setting, see RESULTS.md; it failed under ZeRO-3 then), default true (vlmtune's default).
# Run on the GPU machine from the repo root with wheels in .whl/ (bitsandbytes, pydantic, deepspeed, hjson):
#   OUT=/tmp/out PART=2b bash benchmarks/gpu_deepspeed.sh        (PART="2b 7b" DEADLINE=500: both, ending by 500 s;
#   ONLY="2b_full_z3 7b_full_z3_offopt": only the runs with these labels)
# Per run: $OUT/logs.tar.gz holds the console log, train_log.jsonl, nvidia-smi and host-RAM traces;
# $OUT/summary.jsonl one line per run (tokens/s median, peak allocated/reserved, nvidia-smi peak, host RAM peak).
# SNAPSHOT=1: also what occupies GPU memory, by call site, after steps 1 and 2 ($OUT/snapshots.md; gpu_train_run.sh);
# with VLMTUNE_MEMORY_TIMELINE=2 exported, allocated memory through step 2, block by block, and a snapshot at its peak.
set -uo pipefail
OUT=${OUT:-/tmp/vlmtune-ds}
PART=${PART:-2b}
STEPS=${STEPS:-6}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh
source benchmarks/gpu_train_run.sh
gpu_versions "$OUT/versions.txt"
run() { train_run "$@"; }

common=(model.random_init=true data.image_size=448 data.max_length=1024 training.max_steps=$STEPS
        training.logging_steps=2 training.save_checkpoints=false "training.report_to=[none]"
        hardware.gradient_checkpointing=true hardware.dataloader_workers=4 hardware.force_fit=true
        speed.chunked_loss=${CHUNKED:-true})

if [[ $PART == *2b* ]]; then
  python3 -m vlmtune.cli tiny-model --family qwen2_vl --arch 2b --out /tmp/m2b > /dev/null
  python3 benchmarks/make_bench_data.py --model /tmp/m2b --n 32 --image-side 448 --text-tokens 512 --out /tmp/bench2b
  m2b=(model.name_or_path=/tmp/m2b data.train_path=/tmp/bench2b/train.jsonl training.batch_size=4
       method.lora.rank=16 method.lora.alpha=32 method.lora.target_modules=all)
  for method in lora full; do
    run "2b_${method}_plain" "${common[@]}" "${m2b[@]}" method.name=$method
    run "2b_${method}_z2" "${common[@]}" "${m2b[@]}" method.name=$method --zero-stage 2
    run "2b_${method}_z3" "${common[@]}" "${m2b[@]}" method.name=$method --zero-stage 3
    run "2b_${method}_z2_offopt" "${common[@]}" "${m2b[@]}" method.name=$method --zero-stage 2 --offload optimizer
    run "2b_${method}_z3_offall" "${common[@]}" "${m2b[@]}" method.name=$method --zero-stage 3 \
        --offload optimizer_and_params
  done
  # ZeRO-3 parameter offload keeps a module gathered when its next use lies within stage3_max_reuse_distance
  # elements of the module order (partitioned_param_coordinator.__params_to_release): with reuse off, only the
  # module in use and the prefetch are on the GPU. Only with ONLY=2b_lora_z3_offall_reuse1 (estimator, issue 3).
  [[ " ${ONLY:-} " == *" 2b_lora_z3_offall_reuse1 "* ]] && run 2b_lora_z3_offall_reuse1 "${common[@]}" "${m2b[@]}" \
      method.name=lora --zero-stage 3 --offload optimizer_and_params distributed.max_reuse_distance=1
  # Partial optimizer offload against the whole of it: the same losses expected
  run 2b_full_z3_offopt "${common[@]}" "${m2b[@]}" method.name=full --zero-stage 3 --offload optimizer \
      distributed.sub_group_size=500000000
  run 2b_full_z3_offopt_r5 "${common[@]}" "${m2b[@]}" method.name=full --zero-stage 3 --offload optimizer \
      distributed.sub_group_size=500000000 distributed.offload_ratio=0.5
fi
if [[ $PART == *3b* ]]; then
  python3 -m vlmtune.cli tiny-model --family qwen2_5_vl --arch 3b --out /tmp/m3b > /dev/null
  python3 benchmarks/make_bench_data.py --model /tmp/m3b --n 16 --image-side 448 --text-tokens 512 --out /tmp/bench3b
  m3b=(model.name_or_path=/tmp/m3b data.train_path=/tmp/bench3b/train.jsonl training.batch_size=1 method.name=full)
  run 3b_full_plain "${common[@]}" "${m3b[@]}"
  RUN_TIMEOUT=${RUN_TIMEOUT_3B:-240} run 3b_full_z2_offopt "${common[@]}" "${m3b[@]}" --zero-stage 2 --offload optimizer
  RUN_TIMEOUT=${RUN_TIMEOUT_3B:-240} run 3b_full_z3_offopt "${common[@]}" "${m3b[@]}" --zero-stage 3 --offload optimizer
fi
if [[ $PART == *7b* ]]; then
  python3 -m vlmtune.cli tiny-model --family qwen2_5_vl --arch 7b --out /tmp/m7b > /dev/null
  python3 benchmarks/make_bench_data.py --model /tmp/m7b --n 16 --image-side 448 --text-tokens 512 --out /tmp/bench7b
  m7b=(model.name_or_path=/tmp/m7b data.train_path=/tmp/bench7b/train.jsonl training.batch_size=1 method.name=full)
  RUN_TIMEOUT=${RUN_TIMEOUT_7B:-420} run 7b_full_z3_offopt "${common[@]}" "${m7b[@]}" --zero-stage 3 --offload optimizer
  # One GPU with ~126 GiB of host RAM: part of the optimizer stays on the GPU (DeepSpeed's partial offload). 65%
  # offloaded was killed by the OS at 126 GiB on an H100 machine (RESULTS.md, session 4); 40% fits an H200.
  for r in ${RATIOS_7B:-0.4}; do
    RUN_TIMEOUT=${RUN_TIMEOUT_7B:-420} run "7b_full_z3_offopt_r${r#0.}" "${common[@]}" "${m7b[@]}" --zero-stage 3 \
        --offload optimizer distributed.offload_ratio=$r distributed.sub_group_size=500000000
  done
  run 7b_full_plain "${common[@]}" "${m7b[@]}"
fi
