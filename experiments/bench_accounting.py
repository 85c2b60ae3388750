"""Noise-calibration benchmark: coarse-to-fine beside plain bisection, one JSON line per case.

  python experiments/bench_accounting.py      # the default cases, appended to
                                              # experiments/results/bench_accounting.jsonl
  python experiments/bench_accounting.py --case 0.001 10000 3 --out /tmp/b.jsonl

Each (case, method) runs in a fresh Python process (no memoised PLD carries
over), timed from after the imports to the calibrated sigma:
  coarse_to_fine  `dpjax.accounting.calibrate_noise` (bracketed on a 10x
                  coarser PLD grid, certified on the 1e-4 grid)
  bisection       the former method: `calibrate_scale` on the 1e-4 PLD alone,
                  each step's PLD built by dp-accounting's
                  `from_gaussian_mechanism` (one point at a time)
Recorded: seconds (the median of --repeats fresh processes, each one's
beside it), sigma, how many exact (1e-4) PLD evaluations it made, and
the epsilon of the returned sigma by dp-accounting's own `PLDAccountant`
(1e-4 grid, computed after the clock stops) with its ratio to the target.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.pld import privacy_loss_distribution as pld_lib

from dpjax.core import accounting
from dpjax.core.accounting import calibrate as calibrate_lib
from dpjax.core.accounting import step_pld

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "bench_accounting.jsonl")
CASES = [(0.05, 100, 3.0), (0.001, 10_000, 3.0), (0.01, 100_000, 3.0), (0.01, 1_000, 1.0)]
METHODS = ("coarse_to_fine", "bisection")
DELTA = 1e-5


def one(q: float, steps: int, target: float, method: str) -> dict:
  """Times one calibration in this process (call it in a fresh one)."""
  exact = []
  real = calibrate_lib.epsilon_spent

  def counted(*a, **k):
    exact.append(a[0])
    return real(*a, **k)

  calibrate_lib.epsilon_spent = counted
  if method == "bisection":  # the former per-point PLD build
    step_pld._sampled_gaussian_pld = lambda std, q, h: pld_lib.from_gaussian_mechanism(
      std, value_discretization_interval=h, sampling_prob=q
    )
  t = time.perf_counter()
  if method == "coarse_to_fine":
    sigma = accounting.calibrate_noise(target, DELTA, q, steps)
  else:
    sigma = accounting.calibrate_scale(lambda s: counted(s, q, steps, DELTA), target)
  seconds = time.perf_counter() - t
  calibrate_lib.epsilon_spent = real
  acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
  eps = float(acc.compose(accounting.dpsgd_event(sigma, q, steps)).get_epsilon(DELTA))
  return {
    "bench": "calibration",
    "method": method,
    "sampling_rate": q,
    "steps": steps,
    "target_epsilon": target,
    "delta": DELTA,
    "seconds": round(seconds, 4),
    "noise_multiplier": sigma,
    "exact_evaluations": len(exact),
    "epsilon_dp_accounting": eps,
    "epsilon_over_target": eps / target,
    "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--case", nargs=3, type=float, action="append", metavar=("Q", "STEPS", "EPS"))
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--out", default=OUT)
  p.add_argument("--repeats", type=int, default=3, help="fresh processes per (case, method)")
  p.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.one:
    q, steps, target, method = args.one
    print(json.dumps(one(float(q), int(float(steps)), float(target), method)))
    return 0
  methods = args.methods.split(",")
  bad = [m for m in methods if m not in METHODS]
  if bad:
    raise SystemExit(f"--methods: unknown {bad}; known: {list(METHODS)}")
  cases = [(q, int(s), e) for q, s, e in args.case] if args.case else CASES
  for q, steps, target in cases:
    for method in methods:
      cmd = [sys.executable, __file__, "--one", str(q), str(steps), str(target), method]
      runs = []
      for _ in range(args.repeats):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
      row = dict(runs[0], repeats=[r["seconds"] for r in runs])
      row["seconds"] = statistics.median(row["repeats"])
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
      print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
