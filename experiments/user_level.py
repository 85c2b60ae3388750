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
noise actually used. Results go to experiments/results/user_level_*.jsonl and
a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np
import report as report_lib  # experiments/report.py, beside this script
import rows as rows_lib  # experiments/rows.py, beside this script

from dpjax.core.sampling import bound_contributions
from dpjax.tasks import build_task
from dpjax.training.config import load_config
from dpjax.training.loop import train

HERE = os.path.dirname(os.path.abspath(__file__))


def _users_per_step(task, G: int, batch_size: float, seed: int) -> float:
  index = bound_contributions(task.user_ids, G, seed)
  return batch_size / float(index.counts.mean())


def _run(cfg, task, sampling: str, G: int, eps: float, seed: int, batch_size: float) -> dict:
  import ml_collections

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


def _write(rows, name):
  rows_lib.append(f"user_level_{name}", rows)
  return rows_lib.path(f"user_level_{name}")


def _settings(groups):
  # G = 1 makes ELS and ULS the same mechanism (one example per user): run it once.
  out = [("uls", 1)] if 1 in groups else []
  return out + [(s, G) for G in groups if G > 1 for s in ("els", "uls")]


def mean_experiment(args):
  rows = []
  for steps in args.steps:
    for diverse in (True, False):
      cfg = load_config(os.path.join(os.path.dirname(HERE), "configs", "user_mean.py"))
      cfg.task.diverse = diverse
      cfg.steps = cfg.log_every = steps
      task = build_task(cfg)
      for eps in args.epsilons:
        for sampling, G in _settings(args.groups):
          errs = []
          for seed in range(args.seeds):
            r = _run(cfg, task, sampling, G, eps, seed, cfg.batch_size)
            r.update(diverse=diverse, steps=steps)
            rows.append(r)
            errs.append(2 * r["test_loss"])  # ||theta - mu||^2
          print(
            f"steps={steps} diverse={diverse} eps={eps} {sampling} G={G}: "
            f"sq error {np.mean(errs):.4f} +- {np.std(errs):.4f} "
            f"(user eps {r['epsilon']:.3f})",
            flush=True,
          )
  print(_write(rows, "mean"))
  print(
    "\n| steps | users' examples | user eps | "
    + " | ".join(f"{s.upper()} G={G}" for s, G in _settings(args.groups))
    + " |"
  )
  print("|---|---|---|" + "---|" * len(_settings(args.groups)))
  for steps in args.steps:
    for diverse in (True, False):
      for eps in args.epsilons:
        cells = []
        for s, G in _settings(args.groups):
          e = [
            2 * r["test_loss"]
            for r in rows
            if r["diverse"] == diverse
            and r["steps"] == steps
            and r["target_epsilon"] == eps
            and r["sampling"] == s
            and r["G"] == G
          ]
          cells.append(f"{np.mean(e):.4f} ± {np.std(e):.4f}")
        print(
          f"| {steps} | {'diverse' if diverse else 'identical'} | {eps:g} | "
          + " | ".join(cells)
          + " |"
        )


def shakespeare_experiment(args):
  cfg = load_config(os.path.join(os.path.dirname(HERE), "configs", "user_shakespeare.py"))
  cfg.steps = cfg.log_every = args.steps[0]
  task = build_task(cfg)
  rows = []
  for eps in args.epsilons:
    for sampling, G in _settings(args.groups):
      for seed in range(args.seeds):
        r = _run(cfg, task, sampling, G, eps, seed, args.batch_size)
        r["test_perplexity"] = math.exp(r["test_nll_sum"] / r["test_tokens"])
        rows.append(r)
        _write([r], "shakespeare")
        print(
          f"eps={eps} {sampling} G={G} seed={seed}: test ppl {r['test_perplexity']:.3f} "
          f"(user eps {r['epsilon']:.3f})",
          flush=True,
        )
  print(
    "\n| user eps | " + " | ".join(f"{s.upper()} G={G}" for s, G in _settings(args.groups)) + " |"
  )
  print("|---|" + "---|" * len(_settings(args.groups)))
  for eps in args.epsilons:
    cells = []
    for s, G in _settings(args.groups):
      p = [
        r["test_perplexity"]
        for r in rows
        if r["target_epsilon"] == eps and r["sampling"] == s and r["G"] == G
      ]
      cells.append(f"{np.mean(p):.3f} ± {np.std(p):.3f}")
    print(f"| {eps:g} | " + " | ".join(cells) + " |")


def tradeoff(args):
  from dpjax.core.accounting import user_level
  from dpjax.data.shakespeare import load_shakespeare

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
