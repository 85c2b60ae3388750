"""What the noise costs in the private step: dpjax's ghost step with its own noise, with
`jax.random.normal`'s, and with none, beside the non-private step (one process, CPU or GPU).

  python experiments/bench_noise.py --layers 4 --d 512 --heads 8 --vocab 8192 --batch 16 --seq 64
  python experiments/bench_noise.py --layers 4 --d 256 --heads 8 --vocab 8192 --batch 16 --seq 128
  (add --record; without shape arguments: GPT-2-small, 32 x 128)

Rows (JSON lines; with --record also experiments/results/bench_noise.jsonl):
  A          the harness's non-private step
  I          dpjax ghost + `dpjax.mechanisms.gaussian` (full-range tails: Exp(1)
             from 96 exponent bits, Box-Muller with polynomial cos and sin;
             1.5 Threefry hashes, both halves used, per draw)
  I-normal   the same step, the draws from `jax.random.normal` (one word per
             draw, tails cut at ~5.3 sigma: NOT a sound release, timing only)
  I-zero     the same step with zeros for the draws (what clipping and Adam cost)
  noise      the noise transform alone on the model's parameters (exact / normal)
Each step: median of --steps timed after --warmup (the peer harness's loop).
The gaps I - I-zero and I-normal - I-zero are the two noises' costs in the step.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_peers_dpjax  # noqa: E402
import rows as rows_lib  # noqa: E402


def main(argv=None):
  import argparse

  import jax
  import jax.numpy as jnp

  import dpjax
  from dpjax.core import mechanisms

  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  bench_peers_dpjax.add_shape_args(p)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--record", action="store_true")
  a = p.parse_args(argv)
  a.untied = False
  bench = bench_peers_dpjax._bench(a.bench_dir)
  exact = mechanisms.standard_normal
  draws = {
    "I": exact,
    "I-normal": lambda k, s: jax.random.normal(k, s, jnp.float32),
    "I-zero": lambda k, s: jnp.zeros(s, jnp.float32),
  }
  shape = {k: getattr(a, k) for k in ("layers", "d", "heads", "vocab", "batch", "seq")}
  out = []

  def record(row):
    row = {**row, **shape, "backend": jax.default_backend(), "jax": jax.__version__}
    out.append(row)
    print(json.dumps(row), flush=True)

  for name in ("A", "I", "I-normal", "I-zero"):
    mechanisms.standard_normal = draws.get(name, exact)  # read when the transform is built
    try:
      step, params, opt_state, tokens = bench_peers_dpjax.build(a, bench, name[0])
    finally:
      mechanisms.standard_normal = exact
    state = [params, opt_state]

    def one():
      state[0], state[1], loss = step(state[0], state[1], tokens)
      return loss

    first, times, _ = bench.time_steps(one, jax.block_until_ready, a.warmup, a.steps)
    record({"config": name, "step_ms": 1e3 * statistics.median(times), "first_step_s": first})
    if name == "A":
      params0 = jax.tree.map(jnp.zeros_like, state[0])
  for name, draw in (("noise exact", exact), ("noise normal", draws["I-normal"])):
    mechanisms.standard_normal = draw
    try:
      tx = dpjax.mechanisms.gaussian(1.0, 1.0, jax.random.key(0))
    finally:
      mechanisms.standard_normal = exact
    noise = jax.jit(lambda g, s, tx=tx: tx.update(g, s))
    st = [tx.init(params0)]

    def one():
      g, st[0] = noise(params0, st[0])
      return g

    first, times, _ = bench.time_steps(one, jax.block_until_ready, a.warmup, a.steps)
    record({"config": name, "step_ms": 1e3 * statistics.median(times), "first_step_s": first})
  base = {r["config"]: r["step_ms"] for r in out}
  print("| config | ms | x A |\n|---|---|---|")
  for r in out:
    print(f"| {r['config']} | {r['step_ms']:,.1f} | {r['step_ms'] / base['A']:.2f} |")
  if a.record:
    rows_lib.append("bench_noise", out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
