"""LMO-DP's offline search (Yang et al. 2024, arXiv 2405.18776): the least noise for a budget.

The mechanism and its sound accountant live in the core
(`dpjax.core.mechanisms.lmo`, `dpjax.core.accounting.lmo`); this module only
chooses parameters: `lmo_search` takes the least-noise candidate of a grid
whose epsilon meets a target, `lmo_calibrate` scales one shape of b to it.
Every epsilon it compares is the core's upper bound.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional

import numpy as np
from tqdm.auto import tqdm

from dpjax import assets
from dpjax.core.accounting.calibrate import UnreachableTarget, calibrate_scale
from dpjax.core.accounting.lmo import (
  BINS,
  DISCRETIZATION,
  LMOParams,
  default_tail,
  lmo_epsilon,
  noise_magnitude,
  unit_noise,
)
from dpjax.core.checks import check_epsilon

PAPER_GRID = {
  "a": tuple(float(x) for x in np.round(np.linspace(0.1, 1.8, 18), 4)),
  "theta_k": ((1, 2), (2, 2), (3, 2), (5, 1), (9, 0.5), (7.5, 1), (0.5, 1)),
  "lam": (0.1, 0.5, 1.0, 5.0),
  "Ub_Ua": ((1, 0), (2, 1)),
}


def grid_candidates(grid: Optional[Dict] = None) -> List[LMOParams]:
  """All parameter sets of a grid in the paper's layout (a1 = a, a3, a4 from grid["a"]).

  Args:
    grid: {"a": [...], "a3": [...], "a4": [...], "k", "theta", "lam", "Ua", "Ub"}
      (None: the paper's grid).

  Returns:
    The candidate `LMOParams`.
  """
  g = dict(PAPER_GRID, **(grid or {}))
  out = []
  for a1 in g["a"]:
    for a3 in g["a"]:
      for a4 in g["a"]:
        for theta, k in g["theta_k"]:
          for lam in g["lam"]:
            for Ub, Ua in g["Ub_Ua"]:
              out.append(
                LMOParams(
                  a1=a1,
                  a3=a3,
                  a4=a4,
                  theta=float(theta),
                  k=float(k),
                  lam=float(lam),
                  Ua=float(Ua),
                  Ub=float(Ub),
                )
              )
  return out


def _cache_path() -> str:
  return os.path.join(assets.home(), "cache", "lmo_epsilon.json")


def lmo_search(
  target_epsilon: float,
  delta: float,
  sampling_rate: float,
  steps: int,
  *,
  grid: Optional[Dict] = None,
  candidates: Optional[Iterable[LMOParams]] = None,
  objective: str = "abs",
  bins: int = BINS,
  tail: Optional[float] = None,
  cache: bool = True,
  progress: bool = False,
) -> Dict:
  """The least-noise LMO parameters whose (sound) epsilon meets the target.

  Candidates (the paper's grid by default, or `grid`/`candidates`) are sorted
  by noise (`objective`: "abs" = E|Z|, "var" = Var Z, per unit sensitivity),
  vectorised; epsilons are then computed in that order with `lmo_epsilon`
  and the first candidate at or under the target is the answer -- the same
  as a brute-force minimum over all feasible candidates. Epsilons are cached
  on disk ($DPJAX_HOME/cache/lmo_epsilon.json) keyed by everything they
  depend on. Returns {"params", "noise", "epsilon", "evaluated"}.

  Args:
    target_epsilon: the epsilon to meet.
    delta: the delta.
    sampling_rate: q.
    steps: the number of steps.
    grid: a grid like `grid_candidates`' argument.
    candidates: explicit candidates instead of a grid.
    objective: "abs" or "var".
    bins: bins of b's distribution in the accountant.
    tail: the tail mass per step (None: `default_tail`).
    cache: read and write the on-disk epsilon cache.
    progress: show a progress bar.

  Returns:
    The dict above (raises ValueError when no candidate meets the target).
  """
  check_epsilon(target_epsilon)
  cands = list(candidates) if candidates is not None else grid_candidates(grid)
  if not cands:
    raise ValueError("no candidates to search")
  if tail is None:
    tail = default_tail(delta, steps)
  noise = unit_noise(cands, objective)
  order = np.argsort(noise, kind="stable")
  store: Dict[str, float] = {}
  path = _cache_path()
  if cache and os.path.exists(path):
    with open(path) as f:
      store = json.load(f)
  evaluated = 0
  result = None
  it = order
  if progress:
    it = tqdm(order, desc="lmo search", dynamic_ncols=True)
  try:
    for i in it:
      if not np.isfinite(noise[i]):
        break
      p = cands[i]
      key = json.dumps(
        [p.as_dict(), sampling_rate, steps, delta, bins, tail, DISCRETIZATION], sort_keys=True
      )
      if key in store:
        eps = store[key]
      else:
        eps = lmo_epsilon(p, sampling_rate, steps, delta, bins=bins, tail=tail)
        store[key] = eps
      evaluated += 1
      if eps <= target_epsilon:
        result = {
          "params": p,
          "noise": float(noise[i]),
          "epsilon": eps,
          "evaluated": evaluated,
          "objective": objective,
        }
        break
  finally:
    if cache:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path + ".tmp", "w") as f:
        json.dump(store, f)
      os.replace(path + ".tmp", path)
  if result is None:
    raise ValueError(
      f"no candidate reaches epsilon={target_epsilon} at delta={delta}, "
      f"q={sampling_rate}, {steps} steps (searched {evaluated} of {len(cands)})"
    )
  return result


def lmo_calibrate(
  shape: LMOParams,
  target_epsilon: float,
  delta: float,
  sampling_rate: float,
  steps: int,
  *,
  objective: str = "abs",
  bins: int = BINS,
  tail: Optional[float] = None,
  rtol: float = 2e-3,
) -> Dict:
  """Scale a shape of b (`LMOParams.scaled`) to the least noise meeting the target.

  For a fixed shape, scaling b up lowers the noise of every bin and raises
  the b-revealed epsilon monotonically, so the calibration bisection
  (`calibrate_scale`, on the noise scale 1 / scale) finds the largest scale
  whose sound epsilon is <= target (within `rtol` of it in epsilon; the
  returned point is always feasible). Returns {"params", "noise",
  "epsilon", "scale", "evaluated"} like `lmo_search`.

  Args:
    shape: the shape of b.
    target_epsilon: the epsilon to meet.
    delta: the delta.
    sampling_rate: q.
    steps: the number of steps.
    objective: "abs" or "var".
    bins: bins of b's distribution in the accountant.
    tail: the tail mass per step (None: `default_tail`).
    rtol: the relative tolerance in epsilon.

  Returns:
    The dict above.
  """
  check_epsilon(target_epsilon)
  if tail is None:
    tail = default_tail(delta, steps)
  n = [0]

  def eps_of_noise(s: float) -> float:  # noise scale s = 1 / (scale of b)
    n[0] += 1
    return lmo_epsilon(shape.scaled(1.0 / s), sampling_rate, steps, delta, bins=bins, tail=tail)

  try:
    s = calibrate_scale(eps_of_noise, target_epsilon, rel_tol=rtol)
  except UnreachableTarget:
    raise ValueError(
      f"no scale of {shape} reaches epsilon={target_epsilon} at delta={delta}, "
      f"q={sampling_rate}, {steps} steps"
    ) from None
  p = shape.scaled(1.0 / s)
  return {
    "params": p,
    "noise": noise_magnitude(p, objective=objective),
    "epsilon": eps_of_noise(s),
    "scale": 1.0 / s,
    "evaluated": n[0],
    "objective": objective,
  }
