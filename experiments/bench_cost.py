"""XLA's cost analysis of the compiled steps: FLOPs, bytes accessed and memory, device-independent.

  python experiments/bench_cost.py                         # GPT-2-small, 32 x 128: A, I, G
  python experiments/bench_cost.py --layers 2 --d 64 --heads 4 --vocab 512 --batch 4 --seq 16
  python experiments/bench_cost.py --configs A,I --record     # rows for RESULTS.md

Each step of `bench_peers_dpjax.build` (A: the harness's non-private step;
G: dpjax vmap; I: dpjax ghost) is lowered and
compiled for the default backend, never run: `cost_analysis()` gives the
FLOPs and bytes accessed of the whole step (forward, backward, clipping,
noise, optimizer), `memory_analysis()` the buffers it needs (arguments +
outputs - donated aliases + temporaries). One JSON line per config, then the
ratios to A. These count what XLA's HLO cost model counts on that backend
(fusion decisions differ by backend; FLOPs barely do). The model counts a
loop's body once, whatever its trip count, so the micro-batched step (H, a
`lax.scan`) is left out; A, G and I have no loops.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_peers_dpjax  # noqa: E402
import report  # noqa: E402
import rows as rows_lib  # noqa: E402


def parse(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--configs", default="A,I,G")
  bench_peers_dpjax.add_shape_args(p)
  p.add_argument(
    "--record", action="store_true", help="append the rows to experiments/results/bench_cost.jsonl"
  )
  a = p.parse_args(argv)
  a.untied = False
  a.configs = a.configs.split(",")
  for c in a.configs:
    if c not in ("A", "G", "I"):
      p.error(f"--configs takes A, G and I (H is a loop: its cost is not counted), got {c!r}")
  return a


def cost(a, bench, config):
  """The compiled step's cost record.

  Args:
    a: the parsed arguments.
    bench: the harness module.
    config: "A", "G" or "I".

  Returns:
    {"config", "flops", "bytes_accessed", "memory_bytes", its parts, "compile_s", shape}.
  """
  import jax

  jstep, params, opt_state, tokens = bench_peers_dpjax.build(a, bench, config)
  t0 = time.perf_counter()
  compiled = jstep.lower(params, opt_state, tokens).compile()
  compile_s = time.perf_counter() - t0
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  mem = compiled.memory_analysis()
  parts = {
    "argument_bytes": int(mem.argument_size_in_bytes),
    "output_bytes": int(mem.output_size_in_bytes),
    "alias_bytes": int(mem.alias_size_in_bytes),
    "temp_bytes": int(mem.temp_size_in_bytes),
  }
  return {
    "config": config,
    "name": "jax_nonprivate" if config == "A" else bench_peers_dpjax.NAMES[config],
    "flops": float(ca.get("flops", float("nan"))),
    "bytes_accessed": float(ca.get("bytes accessed", float("nan"))),
    "memory_bytes": parts["argument_bytes"]
    + parts["output_bytes"]
    - parts["alias_bytes"]
    + parts["temp_bytes"],
    **parts,
    "compile_s": round(compile_s, 2),
    "n_params": int(sum(x.size for x in jax.tree.leaves(params))),
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "shape": {k: getattr(a, k) for k in ("layers", "d", "heads", "vocab", "batch", "seq")},
  }


def main(argv=None):
  a = parse(argv)
  bench = bench_peers_dpjax._bench(a.bench_dir)
  rows = []
  for config in a.configs:
    rows.append(cost(a, bench, config))
    print(json.dumps(rows[-1]), flush=True)
  if a.record:
    rows_lib.append("bench_cost", rows)
  print(report.cost_table(rows))


if __name__ == "__main__":
  main()
