"""`dpjax plan`: the operating points (batch, steps, noise) that meet a privacy target in a budget.

Input: the target (epsilon, delta) per unit, the number of units N, and a
compute budget in gradient evaluations E (units processed: steps x expected
batch), or a fixed steps x batch. For each expected batch B on a grid the run
takes T = floor(E / B) steps; the noise multiplier sigma is calibrated by the
accountant for (q = B / N, T) and certified there (the epsilon column is the
accountant's upper bound at that sigma, never above the target).

Ranking. Until a fitted utility model is given (`criterion`), points are ranked
by the total amount of noise, TAN = sigma / (q sqrt(T)) (Sander, Stock and
Sablayrolles, "TAN without a burn", ICML 2023, arXiv 2210.03403): the noise of
the sum of T averaged updates against its signal, smaller is better; it is
the noise-batch ratio sigma / B (McKenna et al., ICML 2025) times N / sqrt(T).
At a fixed budget TAN falls as the batch grows (amplification by sampling is
worth less than the steps it costs), down to one giant step, which no
optimiser can use: points with fewer than `min_steps` steps are left out,
and the output says so. The planner suggests no learning rate of its own (the
same paper tunes hyper-parameters at a small batch with sigma / B held fixed
and carries them over); a fitted model names the rate its grid ran at, and
the output repeats it.

Tuning. The plan is for ONE run. Trying several configurations on the
private data and keeping the best is a release too: with `tuning=(eta,
gamma)` each point's sigma is calibrated so that the best of K ~ TNB(eta,
gamma) runs at that point (each with its own noise) meets the target
(`dpjax.core.accounting.selection`, Papernot and Steinke 2022; RDP, so
the calibration is by the RDP accountant whatever `accountant` says).
Without it, choose among the points on public or held-out data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from dpjax.core import accounting
from dpjax.core.accounting import events as ev
from dpjax.core.accounting import selection
from dpjax.core.accounting.calibrate import calibrate_scale
from dpjax.core.checks import check_delta, check_epsilon, check_unit

MIN_STEPS = 40  # the fewest steps a ranked point may take (the utility study's 40)
MIN_BATCH = 16  # the smallest expected batch on the default grid


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
  """One way to spend the budget: its noise, certified, and its rank's key."""

  batch: int  # expected units per step B
  steps: int  # T
  noise_multiplier: float  # sigma, calibrated for (q, T) and the target
  sampling_rate: float  # q = B / N
  epsilon: float  # the accountant's upper bound at sigma (<= the target)
  noise_batch_ratio: float  # sigma / B
  epochs: float  # T B / N
  tan: float  # sigma / (q sqrt(T)): the total amount of noise
  score: float  # the criterion's value (smaller is better)
  expected_runs: float = 1.0  # E[K] of the tuning the epsilon covers (1: one run)


def model_features(ratio, steps):
  """A utility model's inputs: 1, x, y, x^2, x y with x = log(sigma / B), y = log T.

  Args:
    ratio: sigma / B (array or float).
    steps: T (same shape).

  Returns:
    The design matrix [..., 5].
  """
  x, y = np.log(np.asarray(ratio, float)), np.log(np.asarray(steps, float))
  return np.stack([np.ones_like(x), x, y, x * x, x * y], axis=-1)


@dataclasses.dataclass(frozen=True)
class UtilityModel:
  """A fitted model of a task family's loss against (sigma / B, T) (`model_features`).

  Fitted by `experiments/utility_model.py` on a grid of private runs; valid inside
  the grid's ranges (`ratio_range`, `steps_range`), for that task and learning rate.
  """

  family: str
  target: str  # what it predicts, e.g. "dev_loss"
  coef: tuple
  ratio_range: tuple  # (min, max) sigma / B of the grid
  steps_range: tuple  # (min, max) T of the grid
  loo_rmse: float  # its leave-one-out error on the grid
  constant_rmse: float  # the leave-one-out error of predicting the grid's mean
  source: str  # how it was fitted
  learning_rate: Optional[str] = None  # the learning rate(s) of the grid's runs

  @staticmethod
  def load(path: str) -> UtilityModel:
    """A model from its JSON file (`experiments/utility_model.py fit` writes one).

    Args:
      path: the file.

    Returns:
      The model (raises ValueError, one line, when there is none).
    """
    if not os.path.isfile(path):
      raise ValueError(f"--model {path!r}: no such file (experiments/utility_model.py fits one)")
    try:
      with open(path) as f:
        fields = json.load(f)
      return UtilityModel(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except (json.JSONDecodeError, TypeError) as e:
      raise ValueError(f"--model {path!r} is not a utility model's JSON: {e}") from None

  def predict(self, point: OperatingPoint) -> float:
    """The predicted loss at a point (smaller is better).

    Args:
      point: an operating point.

    Returns:
      The model's prediction of its target there.
    """
    return float(model_features(point.noise_batch_ratio, point.steps) @ np.asarray(self.coef))

  def inside(self, point: OperatingPoint) -> bool:
    """Whether the point lies in the grid the model was fitted on.

    Args:
      point: an operating point.

    Returns:
      True when its sigma / B and T are within the grid's ranges.
    """
    (r0, r1), (t0, t1) = self.ratio_range, self.steps_range
    return r0 <= point.noise_batch_ratio <= r1 and t0 <= point.steps <= t1

  def inside_first(self, points: Sequence[OperatingPoint]) -> List[OperatingPoint]:
    """The points inside the model's grid first, each part in its given order.

    Args:
      points: operating points, ranked by this model (`plan_points(criterion=predict)`).

    Returns:
      The same points, those the model was fitted near first (a stable sort).
    """
    return sorted(points, key=lambda p: not self.inside(p))


def batch_grid(num_units: int, budget: int, min_steps: int, min_batch: int = MIN_BATCH) -> list:
  """Expected batches to try: 2^k and 3 * 2^(k-1) from `min_batch` to what the budget allows.

  Args:
    num_units: N.
    budget: gradient evaluations E.
    min_steps: the fewest steps a point may take.
    min_batch: the smallest batch.

  Returns:
    The batches B (each with min_batch <= B <= min(N, E / min_steps)), ascending.
  """
  top = min(num_units, budget // max(min_steps, 1))
  out, b = set(), 1
  while b <= top:
    out.update(x for x in (b, 3 * b // 2) if min_batch <= x <= top)
    b *= 2
  return sorted(out)


def plan_points(
  target_epsilon: float,
  delta: float,
  num_units: int,
  *,
  budget: Optional[int] = None,
  steps: Optional[int] = None,
  batch: Optional[int] = None,
  batches: Optional[Sequence[int]] = None,
  min_steps: int = MIN_STEPS,
  unit: str = "example",
  sampling: Optional[str] = None,
  max_examples_per_user: int = 1,
  accountant: str = "pld",
  criterion: Optional[Callable[[OperatingPoint], float]] = None,
  tuning: Optional[Tuple[float, float]] = None,
  progress: Optional[Callable[[int, int, int], None]] = None,
) -> List[OperatingPoint]:
  """The operating points meeting the target within the budget, best first.

  Args:
    target_epsilon: epsilon per unit, finite and > 0.
    delta: in (0, 1).
    num_units: N, the units (examples, or users) the run samples from.
    budget: gradient evaluations E (steps x expected batch); or give `steps` and `batch`.
    steps: with `batch`, the one point to certify (no budget).
    batch: see `steps`.
    batches: the expected batches to try (default: `batch_grid`).
    min_steps: the fewest steps a point may take.
    unit: "example" or "user".
    sampling: for users, "uls" or "els".
    max_examples_per_user: ELS's cap G.
    accountant: a name in `dpjax.core.accounting.ACCOUNTANTS` that bounds epsilon.
    criterion: a point -> its predicted loss (smaller is better); default TAN.
    tuning: (eta, gamma): the epsilon covers the best of K ~ TNB(eta, gamma) runs.
    progress: called as (i, n, batch) before the i-th of n calibrations, or None.

  Returns:
    The points, ranked (raises ValueError, one line, when none can be planned).
  """
  check_epsilon(target_epsilon)
  check_delta(delta)
  check_unit(unit, sampling, max_examples_per_user)
  if tuning is not None:
    selection.check_tnb(*tuning)
    if unit != "example":
      raise ValueError("a tuning's epsilon is planned per example only (unit='example')")
  if accountant not in accounting.ACCOUNTANTS:
    raise ValueError(
      f"accountant must be one of {sorted(accounting.ACCOUNTANTS)}, got {accountant!r}"
    )
  if accountant in accounting.ESTIMATES:
    raise ValueError(f"accountant {accountant!r} estimates epsilon; a plan is certified by a bound")
  if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 1:
    raise ValueError(f"the number of units must be an integer >= 1, got {num_units!r}")
  if (steps is None) != (batch is None) or (steps is None) == (budget is None):
    raise ValueError("give a budget of gradient evaluations, or steps and batch (not both)")
  if steps is not None:
    if steps < 1 or not 1 <= batch <= num_units:
      raise ValueError(
        f"steps must be >= 1 and 1 <= batch <= {num_units} units, got {steps} x {batch}"
      )
    grid, min_steps = [batch], 1
  else:
    if budget < 1:
      raise ValueError(f"the budget must be >= 1 gradient evaluation, got {budget}")
    grid = sorted(batches) if batches else batch_grid(num_units, budget, min_steps)
    grid = [b for b in grid if 1 <= b <= num_units and budget // b >= min_steps]
    if not grid:
      which = f"none of the batches {sorted(batches)}" if batches else f"no batch >= {MIN_BATCH}"
      raise ValueError(
        f"a budget of {budget} gradient evaluations allows {which} (each <= N = {num_units}) "
        f"for {min_steps} steps: raise the budget or lower the fewest steps (--min-steps)"
      )
  points = []
  for i, b in enumerate(grid, 1):
    if progress is not None:
      progress(i, len(grid), b)
    t = steps if steps is not None else budget // b
    q = b / num_units
    if tuning is None:
      kw = dict(unit=unit, sampling=sampling, max_examples_per_user=max_examples_per_user)
      sigma = accounting.calibrate_noise(target_epsilon, delta, q, t, accountant, **kw)
      eps, runs = accounting.epsilon_spent(sigma, q, t, delta, accountant, **kw), 1.0
    else:
      sigma, eps = _tuned_noise(target_epsilon, delta, q, t, *tuning)
      runs = selection.tnb_mean(*tuning)
    tan = sigma / (q * math.sqrt(t))
    p = OperatingPoint(b, t, sigma, q, eps, sigma / b, t * b / num_units, tan, tan, runs)
    points.append(dataclasses.replace(p, score=criterion(p)) if criterion else p)
  return sorted(points, key=lambda p: (p.score, -p.batch))


def _tuned_noise(target_epsilon, delta, q, steps, eta, gamma) -> Tuple[float, float]:
  """The least sigma (to 0.5 % in epsilon) whose best-of-TNB tuning meets the target."""

  def eps_of(sigma: float) -> float:
    return selection.selection_epsilon(ev.dpsgd_event(sigma, q, steps), delta, eta, gamma)

  sigma = calibrate_scale(eps_of, target_epsilon)
  return sigma, eps_of(sigma)


def report(
  points: Sequence[OperatingPoint],
  *,
  target_epsilon,
  delta,
  unit,
  accountant,
  min_steps,
  budget=None,
  top: int = 10,
  model: Optional[UtilityModel] = None,
) -> str:
  """The points as `dpjax plan` prints them.

  Args:
    points: ranked points (`plan_points`).
    target_epsilon: the target.
    delta: its delta.
    unit: the privacy unit.
    accountant: the accountant.
    min_steps: the fewest steps a point could take.
    budget: the budget, or None for a fixed point.
    top: how many points to print.
    model: the fitted model that ranked them, or None (TAN).

  Returns:
    The text.
  """
  what = f"a budget of {budget} gradient evaluations" if budget else "the given steps x batch"
  runs = points[0].expected_runs if points else 1.0
  if runs != 1.0:  # a tuning: RDP's selection bound, over the best of K runs
    what += (
      f" per run; the epsilon covers releasing the best of K random runs (E[K] = {runs:.3g}, "
      "Papernot-Steinke TNB), each with the sigma shown"
    )
    accountant = "rdp"
  ranked = "TAN = sigma / (q sqrt(T)), smaller first"
  if model is not None:
    ranked = (
      f"the fitted {model.family} model's predicted {model.target} (leave-one-out RMSE "
      f"{model.loo_rmse:.3g}; a constant's {model.constant_rmse:.3g}), smaller first; * outside "
      "its grid, ranked after"
    )
  lines = [
    f"({target_epsilon}, {delta})-DP per {unit}, {what}; sigma calibrated and epsilon "
    f"certified by the {accountant} accountant (an upper bound); ranked by {ranked}"
    + (f"; points under {min_steps} steps left out" if budget else ""),
    f"{'rank':>4s} {'batch':>7s} {'steps':>7s} {'sigma':>8s} {'q':>9s} {'sigma/B':>10s} "
    f"{'epochs':>7s} {'TAN':>8s} {'epsilon':>8s}" + ("  predicted" if model else ""),
  ]
  for i, p in enumerate(points[:top], 1):
    lines.append(
      f"{i:4d} {p.batch:7d} {p.steps:7d} {p.noise_multiplier:8.4f} {p.sampling_rate:9.5f} "
      f"{p.noise_batch_ratio:10.3g} {p.epochs:7.2f} {p.tan:8.4g} {p.epsilon:8.4f}"
      + (f" {p.score:10.4f}{'' if model.inside(p) else ' *'}" if model else "")
    )
  if len(points) > top:
    lines.append(f"({len(points) - top} more; --top N shows them)")
  if model is not None and model.learning_rate:
    lines.append(
      f"learning rate: {model.learning_rate}, the rate the model's grid ran at (its "
      "predictions hold for it; Sander et al. carry a rate over at fixed sigma / B)"
    )
  return "\n".join(lines)


def _progress(i: int, n: int, batch: int) -> None:
  """One overwritten stderr line per calibration (a terminal only)."""
  end = "\n" if i == n else ""
  print(f"\rcalibrating sigma {i}/{n} (batch {batch})", end=end, file=sys.stderr, flush=True)


def parse_tuning(text: str) -> Tuple[float, float]:
  """'1,0.1' -> (1.0, 0.1): TNB's eta and gamma.

  Args:
    text: ETA,GAMMA.

  Returns:
    (eta, gamma) (raises ValueError, one line, naming what is allowed).
  """
  try:
    eta, gamma = (float(x) for x in text.split(","))
  except ValueError:
    raise ValueError(f"--tuning must be ETA,GAMMA (e.g. 1,0.1), got {text!r}") from None
  selection.check_tnb(eta, gamma)
  return eta, gamma


def parse_batches(text: str) -> List[int]:
  """'64,256' -> [64, 256].

  Args:
    text: B,B,... (integers >= 1).

  Returns:
    The batches (raises ValueError, one line, naming what is allowed).
  """
  try:
    out = [int(x) for x in text.split(",")]
  except ValueError:
    out = []
  if not out or min(out) < 1:
    raise ValueError(f"--batches must be integers >= 1 like 64,256, got {text!r}")
  return out


def add_unit_arguments(parser, per_user: str, per_example: str) -> None:
  """The privacy unit's options (`--unit`, `--user-sampling`, `--max-examples-per-user`).

  Args:
    parser: the (sub)parser.
    per_user: what ULS means for the command's sampling option, e.g. "--units is users".
    per_example: the same for ELS.
  """
  parser.add_argument(
    "--unit", default="example", choices=["example", "user"], help="the privacy unit"
  )
  parser.add_argument(
    "--user-sampling",
    default="uls",
    choices=["uls", "els"],
    help=f"with --unit user: sample users (uls; {per_user}) or examples (els; {per_example})",
  )
  parser.add_argument(
    "--max-examples-per-user",
    "--G",
    dest="G",
    type=int,
    default=1,
    help="with --unit user and els: the cap on each user's examples (G in the papers)",
  )


def add_arguments(parser) -> None:
  """`dpjax plan`'s arguments.

  Args:
    parser: its argparse parser.
  """
  parser.add_argument("--target-epsilon", type=float, required=True, help="epsilon per unit")
  parser.add_argument("--delta", type=float, default=1e-5)
  parser.add_argument("--units", type=int, required=True, help="N: examples (or users) sampled")
  parser.add_argument("--budget", type=int, help="gradient evaluations: steps x expected batch")
  parser.add_argument("--steps", type=int, help="with --batch: certify this one point")
  parser.add_argument("--batch", type=int, help="expected units per step (with --steps)")
  parser.add_argument(
    "--batches",
    metavar="B,B,...",
    help="the expected batches to try (default: 2^k and 3 x 2^(k-1) from 16 to what fits)",
  )
  parser.add_argument(
    "--min-steps", type=int, default=MIN_STEPS, help="the fewest steps a ranked point may take"
  )
  add_unit_arguments(parser, "--units is users", "--units is the examples kept")
  parser.add_argument("--accountant", default="pld")
  parser.add_argument(
    "--tuning",
    metavar="ETA,GAMMA",
    help="the epsilon covers the best of K ~ TNB(ETA, GAMMA) runs, e.g. 1,0.1 (geometric, "
    "10 runs expected): hyper-parameter search on the private data, accounted",
  )
  parser.add_argument("--top", type=int, default=10, help="points printed")
  parser.add_argument("--json", action="store_true", help="one JSON line per point instead")
  parser.add_argument(
    "--model",
    help="rank by a fitted utility model, its JSON file (experiments/utility_model.py fits one)",
  )


def command(args) -> int:
  """`dpjax plan`: every input checked (one line), then the calibrations, then the table.

  Args:
    args: the parsed arguments (`add_arguments`).

  Returns:
    The exit status.
  """
  import json

  if args.top < 1 or args.min_steps < 1:
    raise ValueError(f"--top and --min-steps must be >= 1, got {args.top} and {args.min_steps}")
  user = args.unit == "user"
  model = UtilityModel.load(args.model) if args.model else None  # before any calibration
  kw = dict(
    target_epsilon=args.target_epsilon,
    delta=args.delta,
    unit=args.unit,
    accountant=args.accountant,
    min_steps=args.min_steps,
  )
  points = plan_points(
    num_units=args.units,
    budget=args.budget,
    steps=args.steps,
    batch=args.batch,
    sampling=args.user_sampling if user else None,
    max_examples_per_user=args.G if user else 1,
    tuning=parse_tuning(args.tuning) if args.tuning else None,
    batches=parse_batches(args.batches) if args.batches else None,
    progress=_progress if sys.stderr.isatty() else None,
    criterion=model.predict if model else None,
    **kw,
  )
  if model is not None:
    points = model.inside_first(points)
  if args.json:
    for p in points[: args.top]:
      print(json.dumps(dataclasses.asdict(p)))
  else:
    print(report(points, budget=args.budget, top=args.top, model=model, **kw))
  return 0
