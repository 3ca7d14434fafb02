#!/usr/bin/env bash
# Issue #6 speed harness on the GPU machine: plain transformers + PEFT path vs the same with Liger kernels vs
# vlmtune's engine, same models (random weights from the real configs) and same batches. Three calls, each under
# the 10-minute command limit (the suite stops starting variants when its 540 s budget runs out):
#   OUT=$OUT PART=1 bash benchmarks/speed/run.sh    # W1 Qwen2-VL-2B LoRA (7 variants) + correctness check
#   OUT=$OUT PART=2 bash benchmarks/speed/run.sh    # W3 Qwen2.5-VL-7B LoRA, W4 Qwen2-VL-2B full fine-tuning
#   OUT=$OUT PART=3 bash benchmarks/speed/run.sh    # W2 Qwen2.5-VL-7B QLoRA, W5 packing vs padding
#   OUT=$OUT PART=4 bash benchmarks/speed/run.sh    # issue 17: F1/F2 Qwen3-VL-8B LoRA/QLoRA, F3 SmolVLM2-2.2B LoRA
#   OUT=$OUT PART=5 bash benchmarks/speed/run.sh    # issue 17: F5/F6 Gemma-3-12B LoRA/QLoRA, F4 SmolVLM2-2.2B QLoRA
#   OUT=$OUT PART=6 bash benchmarks/speed/run.sh    # issue 17: F7/F8 Qwen3.5-9B LoRA/QLoRA
# (F*: plain_gc vs vlmtune_gc and vlmtune_auto; the report adds each vlmtune run's preflight estimate against its
# nvidia-smi peak). vlmtune_auto (W1, W3, F*) is vlmtune's default checkpointing (speed.checkpoint_every_n_layers=auto)
# on a card whose memory is the same round's plain_gc peak reserved (hardware.memory_fraction): "at no more memory";
# on QLoRA pairs it loads the architecture's random weights from disk (written once, as for Unsloth). Each run's
# logs/<run>.apps lists nvidia-smi's per-process GPU memory every 2 s.
# "At no more memory than Unsloth" (W1, W3): vlmtune_lowmem is vlmtune at its smallest footprint (every layer
# checkpointed, speed.loss_chunk_tokens=256: the chunked loss's fp32 logits block ~0.3 GiB instead of ~1.2 GiB at 1024
# with a 152k vocab; hardware.expandable_segments=true), vlmtune_auto_at_unsloth the same with checkpointing auto,
# capped (hardware.memory_fraction) at the same round's unsloth_gc peak reserved (it runs after unsloth_gc; the
# preflight refuses it, with the reason in results.jsonl, when even every layer checkpointed does not fit):
#   OUT=$OUT UNSLOTH=1 ONLY=W1,W3 BENCH_VARIANTS=plain_gc,vlmtune_gc,unsloth_gc,vlmtune_lowmem,vlmtune_auto_at_unsloth \
#     bash benchmarks/speed/run.sh
# Loss parity: every path trains the same weights (seed 0) on the same samples in the same order with the same
# optimizer and constant lr (workloads.py's docstring); results.jsonl carries each run's per-step `losses` and an
# `init_fingerprint` of its first weights, and the report adds per workload each variant's loss at step 1 and at the
# last step against plain_gc's (relative difference).
# Only some variants: BENCH_VARIANTS=plain_gc,vlmtune_lean. Each chosen variant R times, round by round, and the
# report adds each variant's ratio to the reference of its own round (median, range): BENCH_REPEATS=R (identical runs
# moved by up to 24% within one call in session 5, so single runs cannot settle a ratio near its target).
# BENCH_ORDER=alternate runs every second round backwards (A B, B A): the order effect shows in the rounds' ratios.
# One workload (or the check) alone: ONLY=W3 (ONLY=check) OUT=$OUT bash benchmarks/speed/run.sh. The table again:
# python3 -m benchmarks.speed.bench table $OUT/results.jsonl.
# Why vlmtune is slower than the plain loop without GC (W1): the W1x ablation (each switch off in turn, ~4 min) and
# torch.profiler reports of chosen variants (~1 min each), in one call:
#   ONLY=W1x PROFILE="W1:vlmtune_nogc W1:plain_nogc" BUDGET_S=300 OUT=$OUT bash benchmarks/speed/run.sh
# PROFILE alone (no ONLY / PART) runs only the profiles. TRACE=1 adds Chrome traces to the logs archive (large).
# Which lines make the host-device syncs of one step (CUDA sync debug mode, ~1 min each; appended to profile.md):
#   SYNCS="W1:vlmtune_nogc W1:plain_nogc" OUT=$OUT bash benchmarks/speed/run.sh
# Each run compiles from an empty inductor cache (a user's first run); BENCH_INDUCTOR_CACHE=shared lets runs reuse one.
# $OUT keeps at most 8 files (what the device returns): results.jsonl (one line per variant), smi_peaks.jsonl,
# check.jsonl, report.md (the printed table), profile.md (every profile report), logs.tar.gz (gpu.txt, a log and an
# nvidia-smi trace per variant, the check's and the profiles' logs).
# Wheels (bitsandbytes, pydantic + its deps, liger-kernel) are carried in .whl/ (see ../shared/device/wheels.sh):
#   ../shared/device/wheels.sh -- bitsandbytes==0.50.2 liger-kernel==0.8.5 pydantic==2.14.3 ...
# Issue 21, Unsloth beside the plain path and vlmtune, same batches, same GPU, one call (~9.5 min):
#   bash benchmarks/speed/unsloth_wheels.sh   # here, once: .whl-unsloth/ (6.6 MB: unsloth 2026.10.9 without its
#                                             # studio/ web app, unsloth_zoo, trl, datasets, dill, multiprocess)
#   device call carrying .whl and .whl-unsloth (.whl must hold bitsandbytes 0.50.2 + pydantic, ~46 MB; leave
#   liger-kernel out of it, the two folders and the tree must stay under 64 MiB):
#     OUT=$OUT UNSLOTH=1 bash benchmarks/speed/run.sh
#   = W1, W3, W2 (in that order; the 540 s budget cuts the last) with plain_gc, vlmtune_gc, unsloth_gc, and
#   vlmtune_lean on W2. .whl-unsloth/ goes into its own folder (BENCH_UNSLOTH_SITE, /tmp/site-unsloth), first on
#   PYTHONPATH for the Unsloth processes only; they run offline (HF_HUB_OFFLINE=1, UNSLOTH_DISABLE_STATISTICS=1),
#   their compiled cache under BENCH_ROOT. Unsloth loads a checkpoint: the suite first writes the architecture's
#   random weights (bf16, seed 0, as the plain path builds them) once per model (`bench weights W`, ~5 s for 2B,
#   ~30-60 s for 7B, 4.4 + 16.6 GB under BENCH_ROOT). Each Unsloth process gets at most BENCH_UNSLOTH_TIMEOUT_S
#   (240 s). A variant that fails or times out still leaves a line in results.jsonl with the reason (its log's
#   last exception line) and the log's tail, and report.md lists it; unsloth-env.txt in logs.tar.gz has the
#   install's output and the versions. Other variants: BENCH_VARIANTS=...; other workloads: ONLY=W1,W3.
set -euo pipefail
OUT=${OUT:-/tmp/vlmtune-speed-out}
mkdir -p "$OUT/logs"
source benchmarks/gpu_env.sh
export BENCH_ROOT=${BENCH_ROOT:-/tmp/vlmtune-speed}
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/logs/gpu.txt"
fi
pack() {  # everything but the top-level summaries goes into one archive
  tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
}
trap pack EXIT
if [[ -n ${UNSLOTH:-} ]]; then  # issue 21: Unsloth's wheels into their own folder, then W1, W3, W2 (see above)
  export BENCH_UNSLOTH_SITE=${BENCH_UNSLOTH_SITE:-/tmp/site-unsloth}
  ONLY=${ONLY:-W1,W3,W2}
  export BENCH_VARIANTS=${BENCH_VARIANTS:-plain_gc,vlmtune_gc,unsloth_gc,vlmtune_lean}
  {
    if compgen -G ".whl-unsloth/*.whl" >/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$BENCH_UNSLOTH_SITE" .whl-unsloth/*.whl 2>&1 || echo "pip install of .whl-unsloth failed: exit $?"
    else
      echo "no .whl-unsloth/ here: the unsloth variants will be skipped (benchmarks/speed/unsloth_wheels.sh)"
    fi
    ls "$BENCH_UNSLOTH_SITE" 2>&1 | tr '\n' ' ' || true; echo
    PYTHONPATH=$BENCH_UNSLOTH_SITE:$PYTHONPATH python3 -c "
import importlib.metadata as m
for n in ('unsloth', 'unsloth_zoo', 'trl', 'datasets', 'transformers', 'peft', 'torch', 'torchvision', 'triton',
          'bitsandbytes', 'xformers', 'torchao', 'fsspec', 'pyarrow'):
    try:
        print(n, m.version(n))
    except m.PackageNotFoundError:
        print(n, 'absent')
" 2>&1 || true
    command -v cc gcc 2>&1 || echo "no C compiler (Triton builds a helper with one)"
    python3 -c "import os, sysconfig; print('Python.h', os.path.isfile(sysconfig.get_paths()['include'] + '/Python.h'))" || true
  } >"$OUT/logs/unsloth-env.txt" 2>&1
  tail -n 20 "$OUT/logs/unsloth-env.txt" | tee -a "$OUT/report.md"
fi
if [[ -n ${ONLY:-} || -n ${PART:-} || ( -z ${PROFILE:-} && -z ${SYNCS:-} ) ]]; then
  args=(--out "$OUT" --budget-s "${BUDGET_S:-540}")
  if [[ -n ${ONLY:-} ]]; then args+=(--only "$ONLY"); else args+=(--part "${PART:-1}"); fi
  python3 -m benchmarks.speed.bench suite "${args[@]}" 2>&1 | tee -a "$OUT/report.md"
fi
report_each() {  # report_each KIND ITEMS...: `bench KIND WORK VARIANT` for each WORK:VARIANT, its report into profile.md
  local kind=$1 item work variant started code report extra=(); shift
  [[ $kind == profile && -n ${TRACE:-} ]] && extra=(--trace)
  for item in "$@"; do
    work=${item%%:*} variant=${item#*:} started=$SECONDS code=0
    timeout "${PROFILE_TIMEOUT_S:-150}" python3 -m benchmarks.speed.bench "$kind" "$work" "$variant" \
      --out "$OUT/logs" "${extra[@]}" >"$OUT/logs/$kind-$work-$variant.log" 2>&1 || code=$?
    echo "$kind $work $variant: exit $code, $((SECONDS - started)) s" | tee -a "$OUT/report.md"
    report="$OUT/logs/$kind-$work-$variant.txt"
    if [[ -f $report ]]; then cat "$report" >>"$OUT/profile.md"; else
      { echo "# $kind: $work $variant failed (exit $code); the log's tail:"; echo '```';
        tail -n 40 "$OUT/logs/$kind-$work-$variant.log"; echo '```'; } >>"$OUT/profile.md"; fi
    echo >>"$OUT/profile.md"
  done
}
report_each profile ${PROFILE:-}
report_each syncs ${SYNCS:-}
