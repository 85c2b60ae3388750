#!/usr/bin/env bash
# Runs every configuration of bench.py, each in its own Python process.
# Usage: experiments/bench_peers/run_all.sh OUTDIR "B,T [B,T ...]" [CONFIGS...]
#   CONFIGS default: "A" "B" "C" "D" "D --untied" "E" "F --untied" "B --microbatch 8"
# Each result is one JSON line appended to OUTDIR/results.jsonl; stderr of each
# run goes to OUTDIR/log.txt. Tiny CPU smoke test:
#   BENCH_EXTRA="--layers 2 --d 64 --heads 4 --vocab 1000 --steps 5 --warmup 2" \
#     experiments/bench_peers/run_all.sh OUTDIR "4,16"
set -u
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?outdir}"; shapes="${2:-32,128}"; shift 2 || true
if [ $# -gt 0 ]; then configs=("$@"); else
  configs=("A" "B" "C" "D" "D --untied" "E" "F --untied" "B --microbatch 8"); fi
py="${PYTHON:-python3}"
per_run_timeout="${PER_RUN_TIMEOUT:-150}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
for shape in $shapes; do
  b="${shape%,*}"; t="${shape#*,}"
  for cfg in "${configs[@]}"; do
    echo "=== $cfg batch=$b seq=$t $(date +%T)" | tee -a "$out/log.txt"
    # shellcheck disable=SC2086
    timeout "$per_run_timeout" "$py" "$here/bench.py" $cfg --batch "$b" --seq "$t" \
      ${BENCH_EXTRA:-} --out "$out/results.jsonl" 2>>"$out/log.txt"
    rc=$?
    if [ $rc -ne 0 ]; then
      echo "{\"config\": \"${cfg%% *}\", \"args\": \"$cfg\", \"batch\": $b, \"seq\": $t, \"status\": \"process_exit_$rc\"}" \
        | tee -a "$out/results.jsonl"
    fi
  done
done
