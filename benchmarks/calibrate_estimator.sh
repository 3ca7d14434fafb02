#!/usr/bin/env bash
# Estimator calibration (issue 3, item 6): `vlmtune train` over a grid of configurations on the GPU machine,
# estimate vs measured peak per point; then the `vlmtune recommend` configs of the seed cards, memory-capped.
# Run from the repo root on the GPU machine, wheels of benchmarks/README.md (bitsandbytes, pydantic) in .whl/:
#   OUT=/tmp/out bash benchmarks/calibrate_estimator.sh --part grid --parallel 4 --deadline 480
#   OUT=/tmp/out bash benchmarks/calibrate_estimator.sh --part cards
# Arguments go to benchmarks/calibrate_estimator.py (see its docstring). Results: $OUT/calibration.jsonl,
# $OUT/cards.jsonl, $OUT/table.md, $OUT/logs.tar.gz.
set -euo pipefail
OUT=${OUT:-/tmp/vlmtune-calibration}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/versions.txt"
python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" | tee -a "$OUT/versions.txt" || true
python3 benchmarks/calibrate_estimator.py --out "$OUT" "$@" 2>&1 | tee "$OUT/driver.log"
