"""Utility at equal budget: DP-SGD against the methods that should close the gap (CPU scale).

  python experiments/utility.py run [--tasks rt-top2 rt-head shakespeare] [--epsilons 3]
                                    [--seeds 0 1 2]
                                    [--methods dp-sgd automatic ...]
  python experiments/utility.py run --budget 40960 [--tasks rt-top2] [--methods dp-sgd adaptive]
                                    [--model FIT.json --batches 128,256,512,1024]
                                    # at the operating point `dpjax plan` ranks first
  python experiments/utility.py report          # the tables, from the recorded rows
  python experiments/utility.py bands           # the BandMF band choice per task and epsilon

Rows are appended to experiments/results/utility.jsonl; a spec already
recorded is skipped, so an interrupted grid resumes.

Tasks (per-example DP, delta 1e-5, PLD):
  rt-top2   MiniLM on Rotten-Tomatoes sentences, the top 2 layers and the cosine
            head trained (configs/dp_flat/full.py: ghost clipping, 40 steps of
            256 expected, Adam 1e-3 layers / 0.01 head); test accuracy
  rt-head   the frozen-feature quickstart (configs/quickstart.py: 300 steps of
            1024 expected, Adam 0.01); test accuracy
  shakespeare  the byte-level decoder of configs/user_shakespeare.py (2 layers,
            d 128, pretrained on public text) fine-tuned on the plays with
            per-example DP: 48 steps of 128 expected, ghost clipping, Adam 1e-3,
            clip 1 (the config's, not tuned); test perplexity per byte on
            characters never seen in training
Every method takes the same number of steps and the same expected batch, so
the same number of gradient evaluations, and the same target epsilon:
  dp-sgd     clipping at the tuned clip norm (`clip` below; tuned on the dev
             split at eps 3, seed 0, over 0.1 / 0.3 / 1 for rt-top2)
  automatic  automatic clipping, gamma 0.01 (arXiv 2206.07136)
  adaptive   adaptive quantile clipping from the tuned clip, median target,
             learning rate 0.2, count noise B / 20 (arXiv 1905.03871), the
             count accounted in sigma
  bandmf     BandMF with b bands, the optimal banded Toeplitz strategy and
             cyclic Poisson sampling (arXiv 2306.08153); b minimises the
             prefix-sum error sigma(b)^2 x mean_error(b) at the target (`bands`)
  blt        BLT noise, 4 buffers, fitted to the run (arXiv 2408.08868), over b
             cyclic groups: one Gaussian mechanism at its min-separation
             sensitivity, no amplification; b minimises sigma^2 x blt_error
             over powers of 2 with rate <= 1 (`bands`)
  adam-bc    DP-AdamBC (arXiv 2312.14334)
  bandmf+automatic, automatic+adam-bc, adaptive+adam-bc   combinations (DP-AdamBC
             removes adaptive clipping's moving (sigma_g C_t / B)^2; BandMF's
             correlated noise with DP-AdamBC and adaptive clipping with
             BandMF are refused)
  non-private  the same config without privacy (the reference of "gap closed")
The hyperparameter choices (tuning on dev) are not accounted, as is usual.

--budget E replaces the task's steps and expected batch by the point `dpjax plan`
ranks first for E gradient evaluations at the target (TAN, at least 40 steps;
with --model, the fitted model's ranking over --batches, points inside its grid
first, as `dpjax plan --model` prints it); the clip stays the one tuned at the
task's own point. Such rows are told apart by their steps and batch (`report
utility_planned` tabulates them).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

import report as report_lib  # experiments/report.py, beside this script
import rows as rows_lib  # experiments/rows.py, beside this script

from dpjax.core import matrix_factorization as mf
from dpjax.core.accounting import accountants, events
from dpjax.core.accounting.calibrate import calibrate_scale
from dpjax.pipelines.planner import UtilityModel, plan_points
from dpjax.tasks import build_task
from dpjax.training.config import CONFIG_DIR, load_config
from dpjax.training.loop import train

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(CONFIG_DIR)
NAME = "utility"

TASKS = {
  "rt-top2": os.path.join(CONFIGS, "dp_flat", "full.py"),
  "rt-head": os.path.join(CONFIGS, "quickstart.py"),
  "shakespeare": os.path.join(CONFIGS, "user_shakespeare.py"),
}
SHAKESPEARE = {  # per-example DP at the user-level grid's compute (48 steps of 128)
  "privacy_unit": "example",
  "batch_size": 128,
  "steps": 48,
  "clipping_method": "ghost",
}
METHODS = report_lib.UTILITY_METHODS
TUNE_CLIPS = (0.1, 0.3, 1.0)
TRAIN_EXAMPLES = 8441  # rt-polarity's training split
UNITS = {  # N, the examples a task samples from (the planner's --units)
  "rt-top2": TRAIN_EXAMPLES,
  "rt-head": TRAIN_EXAMPLES,
  "shakespeare": 27104,  # the plays' training windows (q = B / N in its rows)
}
DELTA = 1e-5


def base(task: str, shape=None):
  """The task's config (steps, batch, learning rates); `shape` = (steps, batch) replaces its own."""
  cfg = load_config(TASKS[task])
  if task == "shakespeare":
    for k, v in SHAKESPEARE.items():
      cfg[k] = v
  if shape is not None:
    cfg.steps, cfg.batch_size = shape
  cfg.log_every = cfg.checkpoint_every = cfg.steps
  return cfg


@functools.cache
def planned_shape(task: str, eps: float, budget: int, model: str | None = None, batches=None):
  """(steps, batch) of the point `dpjax plan` ranks first for `budget` gradient evaluations.

  With `model` (a fitted model's JSON) it ranks by the model over `batches`, the points
  inside the model's grid first, as `dpjax plan --model` does.
  """
  fit = UtilityModel.load(model) if model else None
  points = plan_points(
    eps,
    DELTA,
    UNITS[task],
    budget=budget,
    batches=batches,
    criterion=fit.predict if fit else None,
  )
  if fit is not None:
    points = fit.inside_first(points)
  return points[0].steps, points[0].batch


def choose_bands(eps: float, steps: int, batch: int, delta: float = 1e-5) -> dict:
  """b minimising sigma(b)^2 x mean prefix-sum error(b) over powers of 2 with rate <= 1.

  Data-independent (it reads only the public schedule), so free to choose.
  """
  out = {}
  b = 1
  while b <= steps and batch * b <= TRAIN_EXAMPLES:
    q = batch * b / TRAIN_EXAMPLES
    sigma = calibrate_scale(
      lambda s, q=q, b=b: accountants.epsilon(events.bandmf_event(s, q, steps, b), delta, "pld"),
      eps,
    )
    coefs = mf.optimal_strategy(b, steps) if b > 1 else [1.0]
    out[b] = {"sigma": sigma, "error": mf.mean_error(coefs, steps)}
    b *= 2
  best = min(out, key=lambda k: out[k]["sigma"] ** 2 * out[k]["error"])
  return {"bands": best, "candidates": out}


BLT_BUFFERS = 4


def choose_blt(eps: float, steps: int, batch: int, delta: float = 1e-5) -> dict:
  """The groups b minimising sigma^2 x blt_error (sigma: one Gaussian mechanism at eps).

  Data-independent, like `choose_bands`.
  """
  sigma = calibrate_scale(lambda s: accountants.epsilon(events.blt_event(s), delta, "pld"), eps)
  out = {}
  b = 1
  while b <= steps and batch * b <= TRAIN_EXAMPLES:
    k = -(-steps // b)
    decay, scale = mf.blt_strategy(BLT_BUFFERS, steps, b, k)
    out[b] = {"sigma": sigma, "error": mf.blt_error(decay, scale, steps, b, k)}
    b *= 2
  best = min(out, key=lambda k: out[k]["error"])
  return {"bands": best, "candidates": out}


def tuned_clip(task: str, index) -> float | None:
  """The clip of best dev accuracy among the recorded tuning runs (None before all ran)."""
  if task != "rt-top2":
    return 1.0  # the configs' clip (the quickstart's was tuned when it was set)
  dev = {}
  for c in TUNE_CLIPS:
    r = rows_lib.find(index, spec("rt-top2", "dp-sgd", 3.0, 0, c))
    if r is None:
      return None
    dev[c] = r["dev_accuracy"]
  return max(dev, key=lambda c: (dev[c], c))


def spec(task, method, eps, seed, clip, shape=None):
  """The settings that identify a row."""
  cfg = base(task, shape)
  return {
    "task": task,
    "method": method,
    "epsilon_target": eps,
    "seed": seed,
    "clip": clip,
    "steps": cfg.steps,
    "batch_size": cfg.batch_size,
  }


def spec_of(r):
  """A row's spec."""
  return {
    k: r[k] for k in ("task", "method", "epsilon_target", "seed", "clip", "steps", "batch_size")
  }


def config(task, method, eps, seed, clip, shape=None):
  """The dpjax config of one cell."""
  cfg = base(task, shape)
  cfg.seed = seed
  cfg.target_epsilon = eps
  cfg.noise_multiplier = None
  cfg.l2_clip_norm = clip
  parts = method.split("+")
  if method == "non-private":
    cfg.private = False
    cfg.target_epsilon = None
  if "automatic" in parts:
    cfg.automatic_clipping = 0.01
    cfg.l2_clip_norm = 1.0
  if "adaptive" in parts:
    cfg.adaptive_clipping = {"target_quantile": 0.5, "learning_rate": 0.2}
  if "bandmf" in parts:
    cfg.mf_bands = choose_bands(eps, cfg.steps, cfg.batch_size)["bands"]
  if "blt" in parts:
    cfg.mf_strategy = "blt"
    cfg.mf_buffers = BLT_BUFFERS
    cfg.mf_bands = choose_blt(eps, cfg.steps, cfg.batch_size)["bands"]
  if "adam-bc" in parts:
    cfg.optimizer = "adam_bc"
  return cfg


def run_cell(task, method, eps, seed, clip, shape=None):
  """One training run; its row."""
  cfg = config(task, method, eps, seed, clip, shape)
  t0 = time.time()
  res = train(cfg, build_task(cfg), None, progress=False)
  m = res.final_metrics
  if task == "shakespeare":
    scores = {
      f"{split}_perplexity": math.exp(m[f"{split}_nll_sum"] / m[f"{split}_tokens"])
      for split in ("test", "dev")
    }
  else:
    scores = {"test_accuracy": m["test_accuracy"], "dev_accuracy": m["dev_accuracy"]}
  return {
    **spec(task, method, eps, seed, clip, shape),
    "planned": shape is not None,
    "bands": int(cfg.mf_bands) if "mf_bands" in cfg else 1,
    "noise_multiplier": res.noise_multiplier,
    "epsilon": m.get("epsilon") if cfg.private else None,
    **scores,
    "final_clip_norm": m.get("clip_norm"),
    "wall_s": time.time() - t0,
  }


def cells(tasks, epsilons, seeds, methods, index, budget=None, model=None, batches=None):
  """(task, method, eps, seed, clip, shape) in run order; tuning first, then what it needs."""
  for task in tasks:
    if task == "rt-top2":
      for c in TUNE_CLIPS:
        yield task, "dp-sgd", 3.0, 0, c, None
    clip = tuned_clip(task, index)
    if clip is None:
      return
    for i, eps in enumerate(epsilons):
      shape = None if budget is None else planned_shape(task, eps, budget, model, batches)
      for method in methods:
        if method == "non-private" and i:
          continue  # one non-private run per seed, whatever the epsilons
        for seed in seeds:
          yield task, method, None if method == "non-private" else eps, seed, clip, shape


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("command", choices=("run", "report", "bands"))
  p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
  p.add_argument("--epsilons", type=float, nargs="+", default=[3.0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + ("non-private",))
  p.add_argument(
    "--budget", type=int, help="gradient evaluations; run at the planner's first point for it"
  )
  p.add_argument("--model", help="with --budget: rank by this fitted utility model's JSON")
  p.add_argument(
    "--batches",
    type=lambda s: tuple(int(b) for b in s.split(",")),
    help="with --model: the expected batches the planner tries, comma-separated",
  )
  args = p.parse_args(argv)
  if args.command == "bands":
    for task in args.tasks:
      cfg = base(task)
      for eps in args.epsilons:
        for name, choose in (("bandmf", choose_bands), ("blt", choose_blt)):
          ch = choose(eps, cfg.steps, cfg.batch_size)
          cand = ", ".join(
            f"b={b}: sigma {v['sigma']:.3f}, error {v['error']:.2f}, "
            f"sigma^2 x error {v['sigma'] ** 2 * v['error']:.2f}"
            for b, v in ch["candidates"].items()
          )
          print(f"{task} eps={eps:g} {name}: b {ch['bands']} ({cand})")
    return 0
  if args.command == "run":
    while True:  # re-plan after each run: the tuned clip is known only once tuning ran
      index = rows_lib.dedupe(rows_lib.load(NAME), spec_of)
      todo = [
        c
        for c in cells(
          args.tasks,
          args.epsilons,
          args.seeds,
          args.methods,
          index,
          args.budget,
          args.model,
          args.batches,
        )
        if rows_lib.find(index, spec(*c)) is None
      ]
      if not todo:
        break
      task, method, eps, seed, clip, shape = todo[0]
      at = "" if shape is None else f" {shape[0]} steps of {shape[1]}"
      print(
        f"[{len(todo)} left] {task} {method} eps={eps or math.inf:g} seed={seed} clip={clip:g}{at}",
        flush=True,
      )
      r = run_cell(task, method, eps, seed, clip, shape)
      rows_lib.append(NAME, [r])
      score = (
        f"test ppl {r['test_perplexity']:.3f} dev ppl {r['dev_perplexity']:.3f}"
        if task == "shakespeare"
        else f"test {100 * r['test_accuracy']:.2f}% dev {100 * r['dev_accuracy']:.2f}%"
      )
      print(
        f"  {score} eps {r['epsilon'] or math.inf:.3f} sigma {r['noise_multiplier'] or 0:.3f} "
        f"b={r['bands']} ({r['wall_s']:.0f} s)",
        flush=True,
      )
  for task in args.tasks:
    for eps in args.epsilons:
      print(f"\n{task}, eps = {eps:g}\n")
      print(report_lib.utility(task=task, epsilon=str(eps)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
