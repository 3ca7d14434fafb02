#!/usr/bin/env bash
# The whole fault-injection suite (tests/reliability/), slow cases included: every kill point for every method
# (kill -9 at a random step and at each phase of a save, for full, LoRA, QLoRA and ZeRO-2), every kind of checkpoint
# damage, crafted pickles, existing folders, a full disk, malformed data and configs, memory bounds.
#   usage: bash scripts/reliability.sh [pytest args]       (about 15 minutes on 2 cores)
# It ends with one count per kind, e.g. "kills survived 24/24, damaged checkpoints handled 21/21, ...".
# VLMTUNE_KILL_SEED picks the step of the mid-step kills (a new one each run unless set; it is printed).
# VLMTUNE_ALL_KILLS=1 also runs what CI (pytest -q) skips as a near-duplicate of a case it keeps (each skip message
# names this script):
#   - test_kills.py: 25 of the 30 (method x kill point) cases; CI kills each method once, leaving a save in each
#     state a kill can (QUICK: none begun, half-written file, file not yet written, no manifest, not rotated);
#   - test_damaged_checkpoints.py: the crafted pickles in DeepSpeed's state files (two DeepSpeed runs; CI plants
#     them in the plain checkpoint's files, read by the same weights-only loader).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLMTUNE_ALL_KILLS=1
export VLMTUNE_KILL_SEED=${VLMTUNE_KILL_SEED:-$RANDOM}
echo "reliability suite: VLMTUNE_KILL_SEED=$VLMTUNE_KILL_SEED"
python=.venv/bin/python
[[ -x $python ]] || python=python3
"$python" -m pytest -q -p no:cacheprovider tests/reliability "$@"
