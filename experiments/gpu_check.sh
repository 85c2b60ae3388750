#!/usr/bin/env bash
# The prepared GPU check (one H100/H200, under 9 minutes): the peer step table at
# GPT-2-small 32 x 128 with the memory curve, and full DP fine-tuning of MiniLM on RT
# at eps 3 (configs/rt_full_gpu.py: accuracy and wall time; the bar measured before on
# one H100 with the same split: Opacus 80.5 % in 98 s, non-private 85.0 %).
#
#   bash experiments/gpu_check.sh OUT            # on the GPU machine, from the checkout
#   bash experiments/gpu_check.sh OUT --smoke    # here, on the CPU, tiny shapes (minutes)
#
# The machine has no network. Before the call, here:
#   python experiments/gpu_assets.py pack .gpu_assets minilm rt-polarity   # 46 MB, float16
#   and the wheels it lacks (ml-collections, dp-accounting, jax-privacy==2.0.0, opacus==1.6.0,
#   datasets and their missing needs) in .whl, as the device tool's README shows;
#   carry .gpu_assets and .whl; the command installs the wheels to /tmp/site first.
# Writes OUT/peers.md + peers.jsonl, OUT/rt_full.{out,err} + rt_full/metrics.jsonl,
# OUT/summary.md. Each part has its own time limit, so one hang cannot take the rest.
set -u
out=${1:?usage: gpu_check.sh OUT [--smoke]}
smoke=${2:-}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi (not a GPU machine)"
  $py -c "import jax; print('jax', jax.__version__, jax.devices())"; } > "$out/device.txt" 2>&1
if [ -d .gpu_assets ]; then $py experiments/gpu_assets.py unpack .gpu_assets >> "$out/device.txt" 2>&1; fi

if [ "$smoke" = --smoke ]; then
  peers="--shape 2,64,4,512,4,16 --steps 1 --warmup 1 --memory-budget-gb 0.05 --max-batch 16 --configs A,I,D"
  rt="--set steps=1 --set batch_size=32 --set physical_batch_size=32 --set log_every=1"
else
  peers="--gpu --steps 10 --warmup 2 --max-batch 512 --configs A,B,G,H,I,D,Du,E,Fu"
  rt=""
fi

timeout 300 $py experiments/bench_table.py $peers --memory-curve \
  --out "$out/peers.jsonl" > /dev/null 2> "$out/peers.err"
echo "peers: rc $? at $(( $(date +%s) - t0 )) s" >> "$out/device.txt"
# the table from the rows written so far (a time limit keeps what ran)
$py -c "import json, sys; sys.path.insert(0, 'experiments'); import report
print(report.step_table([json.loads(l) for l in open('$out/peers.jsonl')]))" > "$out/peers.md" 2>> "$out/peers.err"

s=$(date +%s)
timeout 180 $py -m dpjax train configs/rt_full_gpu.py --no-progress \
  --workdir "$out/rt_full" $rt > "$out/rt_full.out" 2> "$out/rt_full.err"
rc=$?
wall=$(( $(date +%s) - s ))
echo "rt_full: rc $rc, $wall s at $(( $(date +%s) - t0 )) s" >> "$out/device.txt"

{ echo "# GPU check ($(head -n 1 "$out/device.txt"))"; echo
  echo "## Peer step table"; echo; cat "$out/peers.md"; echo
  echo "## MiniLM on RT, full DP fine-tuning at eps 3 (wall $wall s incl. start-up, rc $rc)"; echo
  $py - "$out/rt_full/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
final = [r for r in rows if r.get("event") == "final"]
if final:
  f = final[-1]
  print(f"test accuracy {f.get('test_accuracy', float('nan')):.4f}, dev {f.get('dev_accuracy', float('nan')):.4f}, "
        f"eps {f.get('epsilon')} at delta {f.get('delta')}, steps {f.get('step')}")
else:
  print("no final row (see rt_full.err)")
PY
} > "$out/summary.md"
cat "$out/summary.md"
