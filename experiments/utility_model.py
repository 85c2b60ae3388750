"""A fitted model of utility against the operating point (sigma / B, T), per task family.

  python experiments/utility_model.py run [--family rt_top2]   # the grid below (resumes)
  python experiments/utility_model.py fit [--family rt_top2]   # the fit and its held-out error

Task families, each with a grid sized to this 2-core CPU; noise and batches from OS
entropy (the default), sigma calibrated by PLD for each (q, T), delta 1e-5:
  frozen_head  the quickstart's task (MiniLM frozen and cached, a cosine head trained
               with DP-SGD on RT, Adam lr 0.01, clip 1.0, physical batch 128): target
               epsilon 1 and 3, expected batch B in 256 / 1024 / 4096, steps T in
               50 / 150 / 450; 18 runs, about 20 min with cached features. Rows in
               results/utility_model.jsonl.
  rt_top2      the equal-budget study's task (`experiments/utility.py`'s rt-top2:
               MiniLM's top 2 layers and the cosine head, ghost clipping, the study's
               learning rates and tuned clip 0.3, seed 0): target epsilon 3, B in
               128 / 256 / 512, T in 20 / 40 / 80; 9 runs, about an hour (the study's
               point, 40 x 256, is the middle one). Rows in
               results/utility_model_rt_top2.jsonl.
  shakespeare  the study's byte-level language model (`experiments/utility.py`'s
               shakespeare: the decoder pretrained on public text, fine-tuned on the
               plays with per-example DP, ghost clipping, Adam 1e-3, clip 1): target
               epsilon 3, B in 64 / 128 / 256, T in 24 / 48 / 96; 9 runs, about 17 min
               after the public pretraining the first run does once (13 min; the
               study's point, 48 x 128, is the middle one); its target is the dev
               loss (mean NLL per byte, log perplexity), it has no accuracy. Rows in
               results/utility_model_shakespeare.jsonl.
A row: eps, batch, steps, sigma, q, noise_batch_ratio, tan, dev/test loss and accuracy,
seconds, revision, machine.

The fit (`fit`): the target (dev error by default, dev loss for shakespeare; `--target
dev_loss` and others) ~ a + b x + c y + d x^2 + e x y with x = log(sigma / B) and y = log T
(`dpjax.pipelines.planner.model_features`), least squares; its held-out error is
leave-one-out over the grid points (each point predicted by the fit to the others),
beside a constant-mean baseline's. It writes the model
(`experiments/results/utility_model_TARGET.json`) that `dpjax plan --model FILE` ranks
by; it describes THIS task at THIS learning rate, no other.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import rows as rows_lib  # noqa: E402

# family: (rows file, target epsilons, expected batches, steps, learning rates)
FAMILIES = {
  "frozen_head": ("utility_model", (1.0, 3.0), (256, 1024, 4096), (50, 150, 450), "Adam 0.01"),
  "rt_top2": (
    "utility_model_rt_top2",
    (3.0,),
    (128, 256, 512),
    (20, 40, 80),
    "Adam 1e-3 (layers) / 0.01 (head)",
  ),
  "shakespeare": ("utility_model_shakespeare", (3.0,), (64, 128, 256), (24, 48, 96), "Adam 1e-3"),
}
DEFAULT_TARGET = {"shakespeare": "dev_loss"}  # the others: dev_error
RT_TOP2_CLIP = 0.3  # the study's clip, tuned on dev at its own point (utility.py)


def point(row: dict) -> dict:
  """A row's grid point."""
  return {k: row[k] for k in ("eps", "batch", "steps")}


def value(row: dict, target: str) -> float:
  """A row's `target`: a recorded field, or dev_error / test_error (1 - accuracy)."""
  if target.endswith("_error"):
    return 1.0 - row[target[: -len("_error")] + "_accuracy"]
  return row[target]


def fit(rows, target: str = "dev_error"):
  """Least squares of `target` on `features`; (coefficients, leave-one-out errors)."""
  from dpjax.pipelines.planner import model_features

  X = model_features(
    np.array([r["noise_batch_ratio"] for r in rows]), np.array([r["steps"] for r in rows])
  )
  y = np.array([value(r, target) for r in rows])
  coef = np.linalg.lstsq(X, y, rcond=None)[0]
  held = []
  for i in range(len(rows)):
    keep = np.arange(len(rows)) != i
    c = np.linalg.lstsq(X[keep], y[keep], rcond=None)[0]
    held.append(float(X[i] @ c - y[i]))
  base = [float(np.mean(np.delete(y, i)) - y[i]) for i in range(len(rows))]
  return coef, np.array(held), np.array(base)


def _config(family: str, eps: float, batch: int, steps: int):
  """The dpjax config of one grid point of `family`."""
  from dpjax.training.config import CONFIG_DIR, load_config

  if family in ("rt_top2", "shakespeare"):
    import utility  # experiments/utility.py: the study's own config of the task

    task, clip = ("rt-top2", RT_TOP2_CLIP) if family == "rt_top2" else ("shakespeare", 1.0)
    return utility.config(task, "dp-sgd", eps, 0, clip, shape=(steps, batch))
  over = [
    f"target_epsilon={eps}",
    f"batch_size={batch}",
    f"steps={steps}",
    f"log_every={steps}",
    f"checkpoint_every={steps}",
  ]
  return load_config(os.path.join(CONFIG_DIR, "quickstart.py"), over)


def scores(m: dict) -> dict:
  """A run's dev and test scores: loss and accuracy, or (a language model) loss per token
  and perplexity."""
  if "dev_nll_sum" in m:
    loss = {s: m[f"{s}_nll_sum"] / m[f"{s}_tokens"] for s in ("dev", "test")}
    return {
      **{f"{s}_loss": v for s, v in loss.items()},
      **{f"{s}_perplexity": math.exp(v) for s, v in loss.items()},
    }
  return {k: m[k] for k in ("dev_loss", "dev_accuracy", "test_loss", "test_accuracy")}


def run(a) -> int:
  from dpjax.tasks import build_task
  from dpjax.training.loop import train

  name, epsilons, batches, steps_grid, _ = FAMILIES[a.family]
  done = rows_lib.dedupe(rows_lib.load(name), point)
  task = None
  for eps, batch, steps in itertools.product(epsilons, batches, steps_grid):
    if rows_lib.find(done, dict(eps=eps, batch=batch, steps=steps)) is not None:
      continue
    cfg = _config(a.family, eps, batch, steps)
    task = task or build_task(cfg)  # the same data (and cached features) for every point
    t0 = time.time()
    res = train(cfg, task, None, progress=False)
    m = res.final_metrics
    q = batch / len(next(iter(task.train.values())))
    sigma = res.noise_multiplier
    row = dict(
      eps=eps,
      batch=batch,
      steps=steps,
      sigma=sigma,
      q=q,
      noise_batch_ratio=sigma / batch,
      tan=sigma / (q * math.sqrt(steps)),
      epsilon=m["epsilon"],
      **scores(m),
      seconds=round(time.time() - t0, 1),
    )
    rows_lib.append(name, [row])
    print(json.dumps(row), flush=True)
  return 0


def report(a) -> int:
  name = FAMILIES[a.family][0]
  rows = list(rows_lib.dedupe(rows_lib.load(name), point).values())
  coef, held, base = fit(rows, a.target)
  print(f"{len(rows)} points; coefficients (1, x, y, x^2, xy): {np.round(coef, 4).tolist()}")
  loo, const = np.sqrt(np.mean(held**2)), np.sqrt(np.mean(base**2))
  print(f"leave-one-out RMSE {loo:.4f} (constant mean {const:.4f})")
  ratios, steps = [r["noise_batch_ratio"] for r in rows], [r["steps"] for r in rows]
  model = dict(
    family=a.family,
    learning_rate=FAMILIES[a.family][4],
    target=a.target,
    coef=[round(float(c), 6) for c in coef],
    ratio_range=[min(ratios), max(ratios)],
    steps_range=[min(steps), max(steps)],
    loo_rmse=round(float(loo), 6),
    constant_rmse=round(float(const), 6),
    source=f"experiments/utility_model.py fit --family {a.family}: {len(rows)} runs "
    f"(eps {sorted(set(r['eps'] for r in rows))}), revisions "
    f"{sorted(set(r['revision'] for r in rows))}",
  )
  path = rows_lib.path(f"{name}_{a.target}")[: -len(".jsonl")] + ".json"
  with open(path, "w") as f:
    json.dump(model, f, indent=1)
    f.write("\n")
  print(f"wrote {path}")
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("action", choices=["run", "fit"])
  p.add_argument("--family", default="frozen_head", choices=list(FAMILIES))
  p.add_argument(
    "--target", help="dev_error (shakespeare: dev_loss), dev_loss, test_error, test_loss, ..."
  )
  a = p.parse_args(argv)
  a.target = a.target or DEFAULT_TARGET.get(a.family, "dev_error")
  return run(a) if a.action == "run" else report(a)


if __name__ == "__main__":
  sys.exit(main())
