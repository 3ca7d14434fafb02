#!/usr/bin/env bash
# Every registered family through the checks the README support matrix cites, slow cases included (CI runs a
# subset of the per-family ZeRO-3 runs): the (family x method) engine table, ZeRO-3 LoRA on two CPU processes per
# family, compiled decoder layers against eager, packing where a family supports it.
#   usage: bash scripts/families.sh [pytest args]     (about 20-30 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLMTUNE_ALL_FAMILIES=1
python=.venv/bin/python
[[ -x $python ]] || python=python3
"$python" -m pytest -q -p no:cacheprovider tests/train/test_engine_matrix.py tests/speed/test_compile_families.py \
  tests/speed/test_packing.py tests/families "tests/train/test_deepspeed_runs.py::test_zero3_lora_every_family" "$@"
