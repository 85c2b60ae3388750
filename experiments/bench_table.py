"""The side-by-side step table in one command: every config in its own process, ratios from one run.

  python experiments/bench_table.py                     # CPU: 4 layers, d 512, 16 x 64
  python experiments/bench_table.py --shape 4,256,8,8192,16,128 --record
  python experiments/bench_table.py --gpu --memory-curve   # GPT-2-small 32 x 128 on a GPU

Configs (`--configs`, default all): A JAX non-private; B jax_privacy 2.0
clipped_grad, and Bm4 with microbatch 4; D torch non-private, Du untied; E
Opacus 1.6 hooks; Fu Opacus 1.6 ghost (untied: Opacus refuses tied weights
there); G dpjax vmap; H dpjax vmap, microbatch 4; I dpjax ghost; Im4 dpjax
ghost, microbatch 4 (4 units' rows at a time: on a CPU the smaller
intermediates stay in cache; on a GPU it only adds a loop). A-F run the
peer harness (`experiments/bench_peers/bench.py`), G, H, I and Im4
`experiments/bench_peers_dpjax.py`, each in a fresh process, back to back,
on the same shape and data. A peer whose package is missing (jax_privacy;
torch; opacus) is a "skipped" row, not an error. Each DP row's ratio is to
its own framework's non-private step of the same run (JAX rows to A, torch
rows to D or Du with the same head). `--memory-curve` adds, per JAX config,
the largest batch (doubling from --batch) whose compiled step fits the
device's memory (XLA's memory analysis, compile only; on the CPU against
`--memory-budget-gb`). Rows are JSON lines in --out as they come (and, with
--record, in experiments/results/bench_table.jsonl for RESULTS.md); the
table is printed at the end.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import report  # noqa: E402
import rows as rows_lib  # noqa: E402

HARNESS = os.path.join(HERE, "bench_peers", "bench.py")
DPJAX = os.path.join(HERE, "bench_peers_dpjax.py")
# name -> (script, config and flags, the package it needs or None)
CONFIGS = {
  "A": (HARNESS, ["A"], None),
  "B": (HARNESS, ["B"], "jax_privacy"),
  "Bm4": (HARNESS, ["B", "--microbatch", "4"], "jax_privacy"),
  "D": (HARNESS, ["D"], "torch"),
  "Du": (HARNESS, ["D", "--untied"], "torch"),
  "E": (HARNESS, ["E"], "opacus"),
  "Fu": (HARNESS, ["F", "--untied"], "opacus"),
  "G": (DPJAX, ["G"], None),
  "H": (DPJAX, ["H", "--microbatch", "4"], None),
  "I": (DPJAX, ["I"], None),
  "Im4": (DPJAX, ["I", "--microbatch", "4"], None),
}
CPU_SHAPE = "4,512,8,8192,16,64"
GPU_SHAPE = "12,768,12,50257,32,128"


def parse(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--gpu", action="store_true", help=f"the GPU shape {GPU_SHAPE}")
  p.add_argument("--shape", default=None, help="layers,d,heads,vocab,batch,seq")
  p.add_argument("--configs", default=",".join(CONFIGS))
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--memory-curve", action="store_true")
  p.add_argument("--memory-budget-gb", type=float, default=None)
  p.add_argument("--max-batch", type=int, default=4096)
  p.add_argument("--timeout", type=int, default=900, help="seconds per config")
  p.add_argument("--out", default=None, help="JSON lines (default: a temporary file)")
  p.add_argument("--record", action="store_true")
  a = p.parse_args(argv)
  a.configs = a.configs.split(",")
  for c in a.configs:
    if c not in CONFIGS:
      p.error(f"--configs takes {', '.join(CONFIGS)}, got {c!r}")
  shape = a.shape or (GPU_SHAPE if a.gpu else CPU_SHAPE)
  try:
    a.layers, a.d, a.heads, a.vocab, a.batch, a.seq = (int(x) for x in shape.split(","))
  except ValueError:
    p.error(f"--shape takes six integers layers,d,heads,vocab,batch,seq, got {shape!r}")
  return a


def _shape_args(a):
  return [
    *("--layers", str(a.layers), "--d", str(a.d), "--heads", str(a.heads)),
    *("--vocab", str(a.vocab), "--batch", str(a.batch), "--seq", str(a.seq)),
  ]


def run_config(a, name):
  """One config in a fresh process; its record (or a skipped / failed row).

  Args:
    a: the parsed arguments.
    name: a key of CONFIGS.

  Returns:
    The record, its "config" the CONFIGS key.
  """
  script, flags, needs = CONFIGS[name]
  base = {"config": name, "batch": a.batch, "seq": a.seq, "layers": a.layers, "d": a.d}
  if needs and importlib.util.find_spec(needs) is None:
    return dict(base, status="skipped", error=f"{needs} is not installed")
  with tempfile.TemporaryDirectory() as tmp:
    rec_file = os.path.join(tmp, "row.jsonl")
    cmd = [sys.executable, script, *flags, *_shape_args(a), "--out", rec_file]
    cmd += ["--steps", str(a.steps), "--warmup", str(a.warmup), "--tag", "bench_table"]
    if script == DPJAX:
      cmd += ["--bench-dir", os.path.dirname(HARNESS)]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
      return dict(base, status="error", error=f"timed out after {a.timeout} s")
    if not os.path.exists(rec_file):
      return dict(base, status="error", error=(proc.stderr or proc.stdout)[-800:])
    with open(rec_file) as f:
      return dict(json.loads(f.read().splitlines()[-1]), config=name)


def memory_curve(a, name):
  """The largest batch (doubling from a.batch) whose compiled step fits the budget.

  Args:
    a: the parsed arguments.
    name: a JAX config (A, G, H, I or Im4).

  Returns:
    {"config", "memory_curve": True, "largest_batch", "budget_bytes", "seq", ...}.
  """
  import bench_cost
  import bench_peers_dpjax
  import jax

  bench = bench_peers_dpjax._bench(os.path.dirname(HARNESS))
  budget = a.memory_budget_gb * 1e9 if a.memory_budget_gb else None
  if budget is None:
    budget = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  rec = {"config": name, "memory_curve": True, "seq": a.seq, "layers": a.layers, "d": a.d}
  if budget is None:
    return dict(rec, status="skipped", error="no device memory limit: pass --memory-budget-gb")
  fits, n, shape = None, a.batch, argparse.Namespace(**vars(a), untied=False, npos=1024)
  flags = CONFIGS[name][1]
  config = flags[0]
  mb = flags.index("--microbatch") + 1 if "--microbatch" in flags else None
  shape.microbatch = None if mb is None else int(flags[mb])
  while n <= a.max_batch:
    shape.batch = n
    try:
      need = bench_cost.cost(shape, bench, config)["memory_bytes"]
    except Exception as e:  # XLA refuses to compile: out of memory
      if "RESOURCE_EXHAUSTED" not in str(e) and "memory" not in str(e).lower():
        raise
      break
    if need > budget:
      break
    fits, n = n, 2 * n
  return dict(
    rec, status="ok", largest_batch=fits, budget_bytes=int(budget), searched_up_to=a.max_batch
  )


def main(argv=None):
  a = parse(argv)
  out = a.out or tempfile.mkstemp(suffix=".jsonl")[1]
  rows = []

  def keep(rec):
    rows.append(rec)
    with open(out, "a") as f:  # as they come: a time limit keeps what ran
      f.write(json.dumps(rec) + "\n")

  for name in a.configs:
    rec = run_config(a, name)
    keep(rec)
    ms = f"{rec['step_ms']:.1f} ms" if rec.get("status") == "ok" else rec.get("error", "")[:120]
    print(f"{name}: {rec.get('status')} {ms}", file=sys.stderr, flush=True)
  if a.memory_curve:
    for name in a.configs:
      if CONFIGS[name][0] == DPJAX or name == "A":
        keep(memory_curve(a, name))
  if a.record:
    rows_lib.append("bench_table", rows)
  print(report.step_table(rows))


if __name__ == "__main__":
  main()
