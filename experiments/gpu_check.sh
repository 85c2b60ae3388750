#!/usr/bin/env bash
# The prepared GPU check (one H100/H200): the peer step table at GPT-2-small 32 x 128
# with the memory curve (peers, <= 5 min), full DP fine-tuning of MiniLM on RT at eps 3
# (rt, <= 3 min: configs/rt_full_gpu.py, accuracy and wall time; the bar measured before
# on one H100 with the same split: Opacus 80.5 % in 98 s, non-private 85.0 %), the
# Llama-3.2-1B-shaped DP-LoRA step beside the non-private one in bfloat16 (1b, <= 3 min:
# experiments/bench_1b.py, step time and peak device memory), and, opt-in, one step of
# the Llama-3.1-8B shape with its bfloat16 base (8b, <= 4 min).
#
#   bash experiments/gpu_check.sh OUT            # on the GPU machine, from the checkout
#   PARTS=1b,8b bash experiments/gpu_check.sh OUT   # only those parts (a retry, say)
#   bash experiments/gpu_check.sh OUT --smoke    # here, on the CPU, tiny shapes (minutes)
#
# The machine has no network. Before the call, here:
#   python experiments/gpu_assets.py pack .gpu_assets minilm rt-polarity   # 46 MB, float16
#   and the wheels it lacks (ml-collections, dp-accounting, jax-privacy==2.0.0, opacus==1.6.0,
#   datasets and their missing needs) in .whl, as the device tool's README shows;
#   carry .gpu_assets and .whl; the command installs the wheels to /tmp/site first.
# Writes OUT/peers.md + peers.jsonl, OUT/rt_full.{out,err} + rt_full/metrics.jsonl,
# OUT/bench_1b.jsonl (+ .err), OUT/summary.md. Each part has its own time limit, so one
# hang cannot take the rest. PARTS (default peers,rt,1b) picks the parts.
set -u
out=${1:?usage: gpu_check.sh OUT [--smoke]}
smoke=${2:-}
parts=${PARTS:-peers,rt,1b}
py=${PYTHON:-python3}
has() { case ",$parts," in *",$1,"*) return 0;; esac; return 1; }
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
  # a 2-layer, width-64 decoder of the Llama 3.2 preset's kind, in place of 1B and 8B
  $py - "$out/tiny.json" <<'PY'
import json, os, sys
from dpjax.pipelines import plan_memory
fields = json.load(open(os.path.join(plan_memory.PRESETS, "llama-3.2-1b.json")))
fields.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=256, bos_token_id=1, eos_token_id=2)
json.dump(fields, open(sys.argv[1], "w"))
PY
  one_b="--model $out/tiny.json --rank 4 --seq 32 --steps 1"
  eight_b="--model $out/tiny.json --rank 4 --seq 32 --steps 1"
else
  peers="--gpu --steps 10 --warmup 2 --max-batch 512 --configs A,B,G,H,I,D,Du,E,Fu"
  rt=""
  one_b="--steps 8"
  eight_b="--model llama-3.1-8b --steps 2"
fi

touch "$out/peers.md" "$out/bench_1b.jsonl"
if has peers; then
  timeout 300 $py experiments/bench_table.py $peers --memory-curve \
    --out "$out/peers.jsonl" > /dev/null 2> "$out/peers.err"
  echo "peers: rc $? at $(( $(date +%s) - t0 )) s" >> "$out/device.txt"
  # the table from the rows written so far (a time limit keeps what ran)
  $py -c "import json, sys; sys.path.insert(0, 'experiments'); import report
print(report.step_table([json.loads(l) for l in open('$out/peers.jsonl')]))" > "$out/peers.md" 2>> "$out/peers.err"
fi

rc=-; wall=-
if has rt; then
  s=$(date +%s)
  timeout 180 $py -m dpjax train configs/rt_full_gpu.py --no-progress \
    --workdir "$out/rt_full" $rt > "$out/rt_full.out" 2> "$out/rt_full.err"
  rc=$?
  wall=$(( $(date +%s) - s ))
  echo "rt_full: rc $rc, $wall s at $(( $(date +%s) - t0 )) s" >> "$out/device.txt"
fi

# each mode in its own process; a row per mode as it ends (a time limit keeps what ran)
if has 1b; then
  timeout 180 $py experiments/bench_1b.py --dtype bfloat16 $one_b --out "$out/bench_1b.jsonl" \
    > /dev/null 2> "$out/bench_1b.err"
  echo "1b: rc $? at $(( $(date +%s) - t0 )) s" >> "$out/device.txt"
fi
if has 8b; then
  timeout 240 $py experiments/bench_1b.py --dtype bfloat16 $eight_b --out "$out/bench_1b.jsonl" \
    > /dev/null 2> "$out/bench_8b.err"
  echo "8b: rc $? at $(( $(date +%s) - t0 )) s" >> "$out/device.txt"
fi

{ echo "# GPU check ($(head -n 1 "$out/device.txt"))"; echo
  echo "## Peer step table"; echo; cat "$out/peers.md"; echo
  echo "## DP-LoRA steps, bfloat16 (experiments/bench_1b.py rows)"; echo
  $py -c "import json, sys; sys.path.insert(0, 'experiments'); import report
print(report.bench_1b(rows=[json.loads(l) for l in open('$out/bench_1b.jsonl')]))" \
    2>> "$out/bench_1b.err"; echo
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
