"""ELS vs ULS under user-level DP (arXiv 2407.07737), at a fixed compute budget.

  python experiments/user_level.py mean          # synthetic mean estimation, ~10 min CPU
  python experiments/user_level.py shakespeare   # byte-level LM, characters as users
  python experiments/user_level.py tradeoff      # the epsilon side of choosing G (ELS)

Fixed compute: every run takes the same number of steps and processes the
same expected number of EXAMPLES per step (ELS: batch_size examples; ULS:
users_per_step = batch_size / mean examples kept per user). Noise is
calibrated to the target USER-level epsilon by the accountant of each scheme
(ELS: PLD of the Binomial mixture of Gaussians; ULS: subsampled Gaussian
over users); the epsilon reported is the accountant's upper bound for the
noise actually used. Rows go to experiments/results/user_level_*.jsonl, one per run (a rerun
skips the runs already recorded); the table printed at the end is the one
`experiments/report.py` puts in RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import os

import ml_collections
import numpy as np
import report as report_lib  # experiments/report.py, beside this script
import rows as rows_lib  # experiments/rows.py, beside this script

from dpjax.core.accounting import user_level
from dpjax.core.sampling import bound_contributions
from dpjax.data.shakespeare import load_shakespeare
from dpjax.tasks import build_task
from dpjax.training.config import CONFIG_DIR, load_config
from dpjax.training.loop import train

HERE = os.path.dirname(os.path.abspath(__file__))


def _users_per_step(task, G: int, batch_size: float, seed: int) -> float:
  index = bound_contributions(task.user_ids, G, seed)
  return batch_size / float(index.counts.mean())


def _run(cfg, task, spec: dict, batch_size: float) -> dict:
  """One private run of `spec` (sampling, G, target_epsilon, seed); its row."""
  sampling, G, eps, seed = (spec[k] for k in ("sampling", "G", "target_epsilon", "seed"))
  cfg = ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)  # G may replace "median"
  cfg.user_sampling = sampling
  cfg.max_examples_per_user = G
  cfg.target_epsilon = eps
  cfg.seed = seed
  cfg.batch_size = batch_size
  cfg.users_per_step = _users_per_step(task, G, batch_size, seed)
  if sampling == "uls":
    # Each user row is [G, ...]: keep the physical batch near the users per
    # step so padding users (G rows each) do not dominate the compute.
    cfg.physical_batch_size = int(
      min(cfg.physical_batch_size, max(4, 2 ** math.ceil(math.log2(cfg.users_per_step))))
    )
  res = train(cfg, task, None, progress=False).final_metrics
  return {
    "sampling": sampling,
    "G": G,
    "target_epsilon": eps,
    "seed": seed,
    "epsilon": res["epsilon"],
    "privacy_unit": res["privacy_unit"],
    **{k: v for k, v in res.items() if k.startswith("test_")},
  }


def _grid(name, spec_keys, todo, run):
  """Runs each spec in `todo` not yet recorded in experiment `name`; one row per run."""
  done = rows_lib.dedupe(rows_lib.load(name), lambda r: {k: r[k] for k in spec_keys})
  for spec in todo:
    if rows_lib.find(done, spec) is not None:
      continue
    r = run(spec)
    rows_lib.append(name, [r])
    print(
      " ".join(f"{k}={spec[k]}" for k in spec_keys)
      + f": test loss {r['test_loss']:.4f} (user eps {r['epsilon']:.3f})",
      flush=True,
    )


def mean_experiment(args):
  tasks = {}

  def run(spec):
    key = (spec["steps"], spec["diverse"])
    if key not in tasks:
      cfg = load_config(os.path.join(CONFIG_DIR, "user_mean.py"))
      cfg.task.diverse = spec["diverse"]
      cfg.steps = cfg.log_every = spec["steps"]
      tasks[key] = (cfg, build_task(cfg))
    cfg, task = tasks[key]
    return {
      **_run(cfg, task, spec, cfg.batch_size),
      "diverse": spec["diverse"],
      "steps": spec["steps"],
    }

  todo = [
    dict(sampling=s, G=G, target_epsilon=eps, seed=seed, diverse=diverse, steps=steps)
    for steps in args.steps
    for diverse in (True, False)
    for eps in args.epsilons
    for s, G in report_lib.user_settings(args.groups)
    for seed in range(args.seeds)
  ]
  _grid("user_level_mean", report_lib.USER_MEAN_SPEC, todo, run)
  print(report_lib.user_mean(groups=args.groups))  # the recorded rows, as in RESULTS.md


def shakespeare_experiment(args):
  cfg = load_config(os.path.join(CONFIG_DIR, "user_shakespeare.py"))
  cfg.steps = cfg.log_every = args.steps[0]
  task = build_task(cfg)

  def run(spec):
    r = _run(cfg, task, spec, args.batch_size)
    return {**r, "test_perplexity": math.exp(r["test_nll_sum"] / r["test_tokens"])}

  todo = [
    dict(sampling=s, G=G, target_epsilon=eps, seed=seed)
    for eps in args.epsilons
    for s, G in report_lib.user_settings(args.groups)
    for seed in range(args.seeds)
  ]
  _grid("user_level_shakespeare", report_lib.USER_SHAKESPEARE_SPEC, todo, run)
  print(report_lib.user_shakespeare(groups=args.groups))  # the recorded rows, as in RESULTS.md


def tradeoff(args):
  ds = load_shakespeare()
  users = [u for split in ds for u in ds[split]["user_id"]]
  _, counts = np.unique(users, return_counts=True)
  rows = user_level.group_size_tradeoff(
    counts, args.groups, args.noise_multiplier, args.batch_size, args.steps[0], 1e-5
  )
  rows_lib.append(
    "user_level_tradeoff",
    [
      {
        **r,
        "noise_multiplier": args.noise_multiplier,
        "batch_size": args.batch_size,
        "steps": args.steps[0],
        "delta": 1e-5,
      }
      for r in rows
    ],
  )
  print(f"sigma={args.noise_multiplier}, {args.batch_size:g} examples/step, {args.steps[0]} steps")
  print(report_lib.user_tradeoff())  # the recorded rows, as in RESULTS.md


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("which", choices=["mean", "shakespeare", "tradeoff"])
  p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
  p.add_argument("--groups", type=int, nargs="+", default=None)
  p.add_argument("--seeds", type=int, default=None)
  p.add_argument(
    "--steps",
    type=int,
    nargs="+",
    default=None,
    help="mean: one run per value (default 50 500); others: one value (64)",
  )
  p.add_argument("--batch-size", type=float, default=128)
  p.add_argument("--noise-multiplier", type=float, default=1.0)
  args = p.parse_args()
  if args.which == "mean":
    args.groups = args.groups or [1, 4, 16]
    args.seeds = args.seeds or 3
    args.steps = args.steps or [50, 500]
    mean_experiment(args)
  elif args.which == "shakespeare":
    args.groups = args.groups or [1, 8, 32]
    args.seeds = args.seeds or 1
    args.steps = args.steps or [64]
    shakespeare_experiment(args)
  else:
    args.groups = args.groups or [1, 2, 4, 8, 16, 32]
    args.steps = args.steps or [64]
    tradeoff(args)


if __name__ == "__main__":
  main()
