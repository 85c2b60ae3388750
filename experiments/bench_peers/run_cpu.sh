#!/usr/bin/env bash
# The CPU side-by-side: each config of bench.py (A-F) and of the project's
# experiments/bench_peers_dpjax.py (G-I) in its own process, back to back, same shape.
# Run from the project checkout:  PYTHON=.venv/bin/python experiments/bench_peers/run_cpu.sh out.jsonl
#   [SHAPE...]   SHAPE = "layers,d,heads,vocab,batch,seq" (default: the table in cpu_table.md)
# PYTHON needs jax (CPU), flax, optax, jax-privacy==2.0.0, dp-accounting, torch, opacus==1.6.0, dpjax.
set -u
out=${1:?outfile}; shift
shapes=${*:-"4,512,8,8192,16,64"}
py=${PYTHON:-python3}
B=$(cd "$(dirname "$0")" && pwd)
X=${DPJAX_BENCH:-$(pwd)/experiments/bench_peers_dpjax.py}
for s in $shapes; do
  IFS=, read L D H V BS T <<<"$s"
  args="--layers $L --d $D --heads $H --vocab $V --batch $BS --seq $T --steps ${STEPS:-10} --warmup 2 --tag cpu"
  for c in A B "B --microbatch 4" D "D --untied" E "F --untied"; do
    timeout 900 $py "$B/bench.py" $c $args --out "$out" >/dev/null 2>>"$out.err" || echo "{\"config\":\"$c\",\"shape\":\"$s\",\"status\":\"fail\"}" >>"$out"
  done
  for c in G "H --microbatch 4" I; do
    timeout 900 $py "$X" $c --bench-dir "$B" $args --out "$out" >/dev/null 2>>"$out.err" || echo "{\"config\":\"$c\",\"shape\":\"$s\",\"status\":\"fail\"}" >>"$out"
  done
done
