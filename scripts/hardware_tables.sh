#!/usr/bin/env bash
# Regenerates the computed tables and the picture of docs/HARDWARE.md: the hardware guide's GPU x count table
# (`vlmtune recommend --table`) and the 8x H100 LoRA rank guide (`vlmtune estimate --sweep ... --plot`).
#   usage: bash scripts/hardware_tables.sh        (about 2 minutes on 2 cores; offline, no GPU)
# Each table goes to docs/hardware/NAME.txt with its command on the first line; paste it into docs/HARDWARE.md
# (tests/memory/test_hardware_doc.py fails when the doc's numbers and the code's disagree).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
vlmtune=(.venv/bin/vlmtune)
[[ -x ${vlmtune[0]} ]] || vlmtune=(vlmtune)
out=docs/hardware
mkdir -p "$out"

GUIDE_GPUS="RTX 4060 Ti,RTX 4070,RTX 4080,RTX 4090,RTX 5060 Ti,RTX 5070,RTX 5080,RTX 5090,A100-40GB,A100-80GB,H100"
BIG_GPUS="RTX 5090,A100-80GB,H100"

run() {  # run NAME ARGS...: the command, then its output, into docs/hardware/NAME.txt
  local name=$1
  shift
  local shown="vlmtune" arg
  for arg in "$@"; do [[ $arg == *" "* ]] && shown+=" \"$arg\"" || shown+=" $arg"; done
  { echo "\$ $shown"; "${vlmtune[@]}" "$@"; } > "$out/$name.txt"
  echo "wrote $out/$name.txt"
}

run hardware_qwen2vl2b recommend --table --model Qwen/Qwen2-VL-2B-Instruct --gpus "$GUIDE_GPUS" --counts 2,4
run hardware_qwen2vl2b_full recommend --table --method full --model Qwen/Qwen2-VL-2B-Instruct --gpus "$BIG_GPUS" \
  --counts 2,4
run hardware_qwen25vl7b recommend --table --model Qwen/Qwen2.5-VL-7B-Instruct --gpus "$GUIDE_GPUS" --counts 2,4
run rank_sweep estimate --model Qwen/Qwen2.5-VL-7B-Instruct --sweep method.lora.rank=16,32,64,128,256,512 \
  --sweep method.lora.target_modules=minimal,attention,all --num-gpus 8 --zero-stage 3 --gpu H100 \
  --plot "$out/rank_sweep.png"
# The picture in 128 palette colours: a fifth of the size, the same to the eye.
python=.venv/bin/python
[[ -x $python ]] || python=python3
"$python" -c "from PIL import Image; p='$out/rank_sweep.png'; Image.open(p).convert('P', palette=Image.ADAPTIVE, colors=128).save(p, optimize=True)"
