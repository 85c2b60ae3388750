"""Resident memory over a long private run: does the loop hold on to anything per step?

  python experiments/bench_memory.py                  # 20,000 steps of the synthetic task
  python experiments/bench_memory.py --steps 2000     # a quick look
  (add --record to append the row to experiments/results/bench_memory.jsonl)

One process trains the `synthetic` config (Poisson batches of 16 expected
examples, fixed sigma 1, one metrics row and epsilon every `--log-every`
steps, a checkpoint every `--checkpoint-every` steps, into a temporary run
directory) and reads its resident set size (`/proc/self/statm`) every
`--sample-every` steps from a `Callback`. The first `--warmup` steps (compiles,
first checkpoint, accountant warm-up) are not counted: growth is the last
sample minus the sample at the end of the warm-up, and the slope is the
least-squares fit over the counted samples (MB per 1,000 steps).

Row (JSON line): steps, warmup, log/checkpoint cadence, rss_mb samples
[[step, MB], ...], rss_start_mb, rss_end_mb, growth_mb, slope_mb_per_1000,
seconds, revision, machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import rows as rows_lib  # noqa: E402

NAME = "bench_memory"


def rss_mb() -> float:
  """This process's resident set size in MB (Linux)."""
  with open("/proc/self/statm") as f:
    pages = int(f.read().split()[1])
  return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(steps: int, warmup: int, log_every: int, checkpoint_every: int, sample_every: int) -> dict:
  import numpy as np

  from dpjax.tasks import build_task
  from dpjax.training import loop
  from dpjax.training.config import load_config

  cfg = load_config("synthetic")
  cfg.steps = steps
  cfg.batch_size = 16
  cfg.physical_batch_size = 32
  cfg.target_epsilon = None
  cfg.noise_multiplier = 1.0
  cfg.log_every = log_every
  cfg.checkpoint_every = checkpoint_every
  samples = []

  class Sampler(loop.Callback):
    def on_step(self, step, state):
      if step % sample_every == 0:
        samples.append([step, round(rss_mb(), 2)])

  task = build_task(cfg)
  t = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    loop.train(cfg, task, workdir, progress=False, callbacks=[Sampler()])
  seconds = time.perf_counter() - t
  counted = [(s, m) for s, m in samples if s >= warmup]
  x = np.array([s for s, _ in counted], float)
  y = np.array([m for _, m in counted], float)
  slope = float(np.polyfit(x, y, 1)[0]) * 1000 if len(x) > 1 else float("nan")
  return {
    "bench": NAME,
    "steps": steps,
    "warmup": warmup,
    "log_every": log_every,
    "checkpoint_every": checkpoint_every,
    "rss_mb": samples,
    "rss_start_mb": counted[0][1],
    "rss_end_mb": counted[-1][1],
    "growth_mb": round(counted[-1][1] - counted[0][1], 2),
    "slope_mb_per_1000": round(slope, 3),
    "seconds": round(seconds, 1),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--steps", type=int, default=20_000)
  p.add_argument("--warmup", type=int, default=2_000)
  p.add_argument("--log-every", type=int, default=100)
  p.add_argument("--checkpoint-every", type=int, default=1_000)
  p.add_argument("--sample-every", type=int, default=500)
  p.add_argument("--record", action="store_true")
  a = p.parse_args(argv)
  if not 0 <= a.warmup < a.steps:
    raise SystemExit(f"--warmup {a.warmup}: must be in [0, --steps {a.steps})")
  row = run(a.steps, a.warmup, a.log_every, a.checkpoint_every, a.sample_every)
  row.update(revision=rows_lib.revision(), machine=rows_lib.machine())
  print(json.dumps(row), flush=True)
  if a.record:
    rows_lib.append(NAME, [row])
  return 0


if __name__ == "__main__":
  sys.exit(main())
