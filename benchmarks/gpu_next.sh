#!/usr/bin/env bash
# The GPU calls staged for the open issues (17, 21), one named step per device call, each under the 600 s limit
# (the suite stops starting variants when BUDGET_S runs out; `timeout` stops the rest). Results go to $OUT/<step>.
# Run from the repo root of a clean copy of HEAD, with the wheels beside it, e.g. on the device machine:
#   cd .clean && ln -sfn ../.whl .whl && bash benchmarks/gpu_next.sh f48
# carrying [".whl", ".whl-unsloth", ".clean"] (.whl: bitsandbytes + pydantic; no flash-linear-attention: it cannot
# train under torch 2.11's Triton 3.6 on Hopper, RESULTS.md session 14). Steps, in the order to run them
# (session 17 ran q35check, u1, u3, u2, d1000, fp8 with row scales; fp8w3 failed before its fix, e15e86c; session 18
# ran u3c with 512-token MLP chunks, f7c, f8c, on an H200; session 19 ran u3c, u1c, mfu, fp8w3c and two W3 repeats, on
# an H100):
#   u1v       issue 21: W1 at Unsloth's memory, compiled: plain; with hashed dropout (speed.hash_dropout) and layer 0's
#             MLP in 2,048-token chunks; that with the vision blocks compiled (speed.compile_vision); and that with the
#             tower's indices made on the CPU (speed.vision_positions_on_cpu, _vpos). First the CUDA checks of the
#             dropout masks (session 19: compiled 1.30x Unsloth, 0.10 GiB over)                       (~500 s)
#   mfuv      issue 21: W3 without recomputation, compiled: plain, with the vision blocks compiled, and that with the
#             tower's indices made on the CPU (_vpos); two profiles (session 19: 31.0% MFU at the median step
#             compiled; the eager tower 17% of kernel time)                                           (~500 s)
#   u3ab      issue 21: the W3 bar's spread and the order effect in one call: Unsloth, vlmtune_min_tiled2048 and the
#             same with the vision tower's indices made on the CPU (speed.vision_positions_on_cpu) in three rounds,
#             every second one backwards (BENCH_ORDER=alternate), ratios paired per round            (~420 s)
#   u3v       issue 21: the W3 bar beside the compiled variant with everything (session 19: 1.30x, 1.33x, 1.23x in
#             three calls); after u3ab when time is left                                               (~420 s)
#   u1ab      issue 21: the same for W1 with the variant u1v is to confirm (edit it to u1v's best at Unsloth's
#             memory), three rounds                                                                     (~430 s)
#   fp8w3     issue 21: 40 steps of bf16 and both FP8 scalings on the 7B architecture, eager (fp8w3c, compiled:
#             1.16x in session 19)                                                                       (~540 s)
#   u1prof    issue 21: profiles of W1 vlmtune_min eager and compiled (what limits it at Unsloth's memory: GPU
#             time by kernel kind, host-bound phases)                                                   (~500 s)
#   w1alloc   issue 21: why W1's defaults stepped at 0.45 s against 0.28 s with 256-token loss chunks (session
#             17): vlmtune_gc with expandable segments off, with 256-token chunks, each twice            (~420 s)
#   then repeats of u2 / d1000 for the spread
# Done or kept for repeats:
#   u3c u1c mfu fp8w3c  issue 21 (session 19: W3 1.30x Unsloth at less memory; W1 0.94x eager; MFU 27.1% / 31.0%;
#             FP8 compiled 1.16x with the loss +0.31% after 40 steps)
#   f7c f8c   issue 17: F7 / F8 eager and compiled with the own delta rule (session 18: 1.75x / 1.88x, 2.08x / 2.70x)
#   f7cprof   issue 17: profiles of F7 eager and compiled (compiled was slower in session 16; no longer, session 18)
#   q35check  issue 17: the per-switch GPU check on Qwen3.5-9B's widths, 8 decoder layers (passed, session 17)
#   u1 u3 u2  issue 21: Unsloth beside vlmtune at Unsloth's memory on W1, W3, W2 (session 17)
#   d1000     issue 21: the default settings over 1,000 W1 steps, compilation included (session 17: 2.62x)
#   fp8       issue 21: FP8 per layer (row-wise vs per-tensor scales), then 300 steps of each (2B, the loss bar)
#   f8 f7 f7prof f48 f48p f48s checks: issue 17's earlier pairs, profiles and per-switch checks
set -euo pipefail
step=${1:?usage: gpu_next.sh STEP (u1v mfuv u3v u3ab u1ab w1alloc u1c u1prof u3c q35check f7cprof f8c f7c f8 f7 f7prof f48 f48p f48s checks u1 u3 u2 d1000 fp8 fp8w3 fp8w3c mfu)}
OUT=${OUT:-/tmp/vlmtune-next}/$step
mkdir -p "$OUT"
speed() {  # speed LIMIT_S ENV...: benchmarks/speed/run.sh under a timeout, results in $OUT
  local limit=$1; shift
  env OUT="$OUT" "$@" timeout "$limit" bash benchmarks/speed/run.sh >"$OUT/run.log" 2>&1 || echo "run.sh: exit $?"
  tail -n 60 "$OUT/report.md" 2>/dev/null || tail -n 30 "$OUT/run.log"
}
case $step in
  f48) speed 560 ONLY=F4,F8 BUDGET_S=480 BENCH_VARIANTS=plain_gc,vlmtune_auto,vlmtune_auto_compile ;;
  f48p) speed 575 ONLY=F4,F8 BUDGET_S=390 BENCH_VARIANTS=plain_gc,vlmtune_auto,vlmtune_auto_compile \
        PROFILE="F7:vlmtune_gc F7:plain_gc" PROFILE_TIMEOUT_S=75
        tail -n 80 "$OUT/profile.md" 2>/dev/null || true ;;
  f48s) speed 460 ONLY=F4,F8 BUDGET_S=400 BENCH_VARIANTS=plain_gc,vlmtune_auto,vlmtune_auto_compile ;;
  q35check)
    source benchmarks/gpu_env.sh
    timeout 170 python3 -m benchmarks.speed.check --family qwen3_5 --arch 9b --layers 8 --out "$OUT/qwen3_5" \
      >"$OUT/check-qwen3_5.log" 2>&1 || echo "check qwen3_5: exit $?"
    grep -E "^(PASS|FAIL|SKIP)" "$OUT/check-qwen3_5.log" | cut -c1-300 || tail -n 30 "$OUT/check-qwen3_5.log" ;;
  f7cprof) speed 570 PROFILE="F7:vlmtune_auto_compile F7:vlmtune_auto" PROFILE_TIMEOUT_S=270
        tail -n 80 "$OUT/profile.md" 2>/dev/null || true ;;
  f8c) speed 560 ONLY=F8 BUDGET_S=470 BENCH_VARIANTS=plain_gc,vlmtune_auto,vlmtune_auto_compile ;;
  f7c) speed 570 ONLY=F7 BUDGET_S=500 BENCH_VARIANTS=plain_gc,vlmtune_auto,vlmtune_auto_compile ;;
  f8) speed 330 ONLY=F8 BUDGET_S=300 BENCH_VARIANTS=plain_gc,vlmtune_auto ;;
  f7) speed 570 ONLY=F7 BUDGET_S=540 BENCH_REPEATS=2 \
        BENCH_VARIANTS=plain_gc,vlmtune_gc,vlmtune_gc_noexpandable,vlmtune_auto ;;
  f7prof) speed 570 PROFILE="F7:vlmtune_gc F7:plain_gc" PROFILE_TIMEOUT_S=270
        tail -n 80 "$OUT/profile.md" 2>/dev/null || true ;;
  checks)
    source benchmarks/gpu_env.sh
    for spec in "gemma3 4b" "smolvlm 2.2b" "qwen3_5 9b"; do
      set -- $spec
      timeout 170 python3 -m benchmarks.speed.check --family "$1" --arch "$2" --out "$OUT/$1" \
        >"$OUT/check-$1.log" 2>&1 || echo "check $1: exit $?"
      tail -n 30 "$OUT/check-$1.log"
    done ;;
  u1) speed 560 UNSLOTH=1 ONLY=W1 BUDGET_S=480 \
        BENCH_VARIANTS=plain_gc,unsloth_gc,vlmtune_gc,vlmtune_lowmem,vlmtune_min,vlmtune_auto_at_unsloth ;;
  u3) speed 570 UNSLOTH=1 ONLY=W3 BUDGET_S=500 \
        BENCH_VARIANTS=plain_gc,unsloth_gc,vlmtune_lowmem,vlmtune_min,vlmtune_auto_at_unsloth ;;
  w1alloc) speed 560 ONLY=W1 BUDGET_S=500 BENCH_REPEATS=2 \
        BENCH_VARIANTS=plain_gc,vlmtune_gc,vlmtune_gc_noexpandable,vlmtune_gc_chunk256,vlmtune_lowmem ;;
  u1c) speed 560 UNSLOTH=1 ONLY=W1 BUDGET_S=470 \
        BENCH_VARIANTS=plain_gc,unsloth_gc,vlmtune_min,vlmtune_min_tiled2048,vlmtune_min_compile,vlmtune_lowmem_compile ;;
  u3c)  # first the fused LoRA's redrawn dropout masks on CUDA (seconds), then the speed round
    (source benchmarks/gpu_env.sh && timeout 60 python3 -m benchmarks.dropout_replay_check) >"$OUT/dropout_replay.txt" 2>&1 \
      || echo "dropout replay check: exit $?"
    tail -n 1 "$OUT/dropout_replay.txt"
    speed 540 UNSLOTH=1 ONLY=W3 BUDGET_S=460 \
        BENCH_VARIANTS=plain_gc,unsloth_gc,vlmtune_min_tiled2048,vlmtune_min,vlmtune_min_tiled1024 ;;
  u1v)  # the fused LoRA's redrawn masks and the hashed masks compiled by inductor on CUDA (seconds), then the round
    (source benchmarks/gpu_env.sh && timeout 90 python3 -m benchmarks.dropout_replay_check --hash) \
      >"$OUT/dropout_checks.txt" 2>&1 || echo "dropout checks: exit $?"
    tail -n 2 "$OUT/dropout_checks.txt"
    speed 490 UNSLOTH=1 ONLY=W1 BUDGET_S=420 BENCH_VARIANTS=plain_gc,unsloth_gc,vlmtune_min_compile,\
vlmtune_min_compile_hash_tiled2048,vlmtune_min_compile_vision_hash_tiled2048,vlmtune_min_compile_vision_hash_tiled2048_vpos ;;
  mfuv) speed 575 ONLY=W3 BUDGET_S=330 \
        BENCH_VARIANTS=vlmtune_nogc_compile,vlmtune_nogc_compile_vision,vlmtune_nogc_compile_vision_vpos \
        PROFILE="W3:vlmtune_nogc_compile_vision_vpos W3:vlmtune_nogc_compile" PROFILE_TIMEOUT_S=115
        tail -n 40 "$OUT/profile.md" 2>/dev/null || true ;;
  u3v) speed 500 UNSLOTH=1 ONLY=W3 BUDGET_S=420 \
        BENCH_VARIANTS=unsloth_gc,vlmtune_min_tiled2048,vlmtune_min_compile_vision_hash_tiled2048 ;;
  u3ab) speed 540 UNSLOTH=1 ONLY=W3 BUDGET_S=450 BENCH_REPEATS=3 BENCH_ORDER=alternate \
        BENCH_VARIANTS=unsloth_gc,vlmtune_min_tiled2048,vlmtune_min_tiled2048_vpos ;;
  u1ab) speed 540 UNSLOTH=1 ONLY=W1 BUDGET_S=450 BENCH_REPEATS=3 BENCH_ORDER=alternate \
        BENCH_VARIANTS=unsloth_gc,vlmtune_min_compile_hash_tiled2048 ;;
  u1prof) speed 570 PROFILE="W1:vlmtune_min W1:vlmtune_min_compile" PROFILE_TIMEOUT_S=240
        tail -n 80 "$OUT/profile.md" 2>/dev/null || true ;;
  u2) speed 560 UNSLOTH=1 ONLY=W2 BUDGET_S=480 BENCH_VARIANTS=plain_gc,unsloth_gc,vlmtune_gc,vlmtune_lean ;;
  d1000) speed 570 ONLY=W1 BUDGET_S=540 BENCH_VARIANTS=plain_gc,vlmtune_default1000 ;;
  fp8)
    source benchmarks/gpu_env.sh
    timeout 120 python3 -m benchmarks.fp8_check --skip-train --out "$OUT/fp8_layers.jsonl" >"$OUT/layers.log" 2>&1 \
      || echo "fp8 layers: exit $?"
    timeout 420 python3 -m benchmarks.fp8_check --skip-layers --steps 300 --scales row,tensor \
      --out "$OUT/fp8_train.jsonl" >"$OUT/train.log" 2>&1 || echo "fp8 train: exit $?"
    grep -h '"kind": "\(layer\|parity\)"' "$OUT/layers.log" "$OUT/train.log" | cut -c1-400 || true ;;
  fp8w3)
    source benchmarks/gpu_env.sh
    timeout 540 python3 -m benchmarks.fp8_check --skip-layers --steps 40 --arch 7b --scales row,tensor \
      --out "$OUT/fp8_train_7b.jsonl" >"$OUT/train.log" 2>&1 || echo "fp8 7b: exit $?"
    grep -h '"kind": "parity"' "$OUT/train.log" | cut -c1-600 || true ;;
  fp8w3c)  # two runs, each compiling its layers first (one scaling: three would not fit the limit)
    source benchmarks/gpu_env.sh
    timeout 540 python3 -m benchmarks.fp8_check --skip-layers --steps 40 --arch 7b --scales row --compile \
      --out "$OUT/fp8_train_7b_compiled.jsonl" >"$OUT/train.log" 2>&1 || echo "fp8 7b compiled: exit $?"
    grep -h '"kind": "parity"' "$OUT/train.log" | cut -c1-600 || true ;;
  mfu) speed 570 ONLY=W3 BUDGET_S=380 BENCH_VARIANTS=vlmtune_gc,vlmtune_nogc,vlmtune_nogc_compile \
        PROFILE="W3:vlmtune_nogc" PROFILE_TIMEOUT_S=150 ;;
  *) echo "unknown step $step (u1v mfuv u3v u3ab u1ab w1alloc u1c u1prof u3c q35check f7cprof f8c f7c f8 f7 f7prof f48 f48p f48s checks u1 u3 u2 d1000 fp8 fp8w3 fp8w3c mfu)" >&2; exit 2 ;;
esac
