# Sourced by gpu_deepspeed.sh and gpu_multi.sh (after gpu_env.sh): `train_run LABEL ARGS...` runs one
# `vlmtune train ARGS... output_dir=/tmp/run_LABEL` with an nvidia-smi trace (every GPU, 200 ms) and a host-RAM trace,
# and appends one line to $OUT/summary.jsonl (benchmarks/summarize_log.py: tokens/s median, peaks, the estimate the
# run printed, rc, wall time, host RAM peak). Uses OUT, DEADLINE (seconds after the script's start by which
# everything ends: later runs are skipped, the last one cut), RUN_TIMEOUT (per run), ONLY ("label ...": just these)
# and KEEP_RUN=1 (keep the run folder). Logs go to $OUT/logs.tar.gz after every run.
# SNAPSHOT=1: each run also writes CUDA allocator snapshots by call site (src/vlmtune/train/memory_snapshot.py;
# VLMTUNE_MEMORY_SNAPSHOT_STEPS / _RAW pass through) to its logs as snapshot.jsonl, and their tables are appended to
# $OUT/snapshots.md. Recording allocation history slows the run a little: do not compare its tokens/s.
DEADLINE=${DEADLINE:-100000}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}
mkdir -p /tmp/dslogs

host_used_kib() { awk '/MemTotal/{t=$2} /MemAvailable/{a=$2} END{print t-a}' /proc/meminfo; }

train_run() {
  local label=$1; shift
  [[ -z ${ONLY:-} || " $ONLY " == *" $label "* ]] || return 0
  if (( SECONDS + 45 > DEADLINE )); then
    echo "{\"label\": \"$label\", \"skipped\": \"deadline\"}" | tee -a "$OUT/summary.jsonl"; return 0
  fi
  local dir=/tmp/dslogs/$label base smi ram t0=$SECONDS rc
  mkdir -p "$dir"
  base=$(host_used_kib)
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 > "$dir/smi.csv" &
  smi=$!
  (while sleep 0.5; do host_used_kib; done) > "$dir/ram_kib.txt" &
  ram=$!
  local limit=$(( DEADLINE - SECONDS < RUN_TIMEOUT ? DEADLINE - SECONDS : RUN_TIMEOUT ))
  local snap=""
  [[ ${SNAPSHOT:-0} == 1 ]] && { snap=$dir/snapshot.jsonl; rm -f "$dir"/snapshot.*; }
  env ${snap:+VLMTUNE_MEMORY_SNAPSHOT=$snap} \
      timeout "$limit" python3 -m vlmtune.cli train "$@" output_dir=/tmp/run_$label > "$dir/console.log" 2>&1
  rc=$?
  kill $smi $ram 2>/dev/null; wait $smi $ram 2>/dev/null
  [[ -z $snap ]] || python3 benchmarks/memory_snapshot.py "$snap" >> "$OUT/snapshots.md" 2>&1 || true
  cp /tmp/run_$label/train_log.jsonl /tmp/run_$label/deepspeed_config.json "$dir/" 2>/dev/null
  python3 benchmarks/summarize_log.py "$dir/train_log.jsonl" "$dir/smi.csv" --label "$label" \
      --ram "$dir/ram_kib.txt" --ram-base "$base" --rc "$rc" --wall "$((SECONDS - t0))" | tee -a "$OUT/summary.jsonl"
  [[ $rc == 0 ]] || { echo "run $label failed (rc $rc):"; grep -v "it/s\]\|Warning\|warn(" "$dir/console.log" | tail -15; }
  [[ ${KEEP_RUN:-0} == 1 ]] || rm -rf /tmp/run_$label
  tar -czf "$OUT/logs.tar.gz" -C /tmp dslogs
  return 0
}
