#!/usr/bin/env bash
# Every registered family through the checks the README support matrix cites, slow cases included: the (family x
# method) engine table, ZeRO-3 LoRA on two CPU processes per family, compiled decoder layers against eager, packing
# where a family supports it; and the two-process DeepSpeed launch variants CI leaves out.
#   usage: bash scripts/families.sh [pytest args]     (about 20-30 minutes on 2 cores)
# VLMTUNE_ALL_FAMILIES=1 runs what CI (pytest -q) skips as a near-duplicate of a case it keeps:
#   - test_zero3_lora_every_family: CI runs gemma3, instructblip and smolvlm (ZERO3_QUICK), this script every family;
#   - test_zero2_through_vlmtune_train[full]: CI runs [lora], the same `vlmtune train --num-gpus 2 --zero-stage 2`
#     launch; full fine-tuning under ZeRO-2 stays in CI through the reliability suite's zero2 kill case;
#   - test_compiled_vision_blocks_every_family: CI runs Qwen2.5-VL and Gemma 3, this script the other ten.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLMTUNE_ALL_FAMILIES=1
python=.venv/bin/python
[[ -x $python ]] || python=python3
"$python" -m pytest -q -p no:cacheprovider tests/train/test_engine_matrix.py tests/speed/test_compile_families.py \
  tests/speed/test_compile_vision.py tests/speed/test_packing.py tests/families "tests/train/test_deepspeed_runs.py::test_zero3_lora_every_family" \
  "tests/train/test_deepspeed_runs.py::test_zero2_through_vlmtune_train" "$@"
