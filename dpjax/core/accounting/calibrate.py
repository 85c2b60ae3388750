"""Epsilon of DP-SGD runs and noise calibration: one search, used by every caller.

`calibrate_scale` finds the least noise scale meeting a target epsilon for
any epsilon-of-scale function that is non-increasing (true of every
accountant's epsilon of a fixed event shape); `calibrate_noise` applies it to
DP-SGD's noise multiplier per privacy unit. The plan, DistilDP's histogram
and LMO-DP's scale search all calibrate through `calibrate_scale`. With the
PLD accountant, `calibrate_noise` and the plan search on a 10x coarser PLD
grid first and certify on the reported one (`calibrate_scale(coarse=...)`):
one or two fine evaluations instead of a dozen, the same guarantee.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional

from scipy import optimize

from dpjax.core.accounting import events as ev
from dpjax.core.accounting.accountants import ESTIMATES, epsilon
from dpjax.core.accounting.edgeworth import bound_report
from dpjax.core.accounting.user_level import els_epsilon
from dpjax.core.checks import (
  check_delta,
  check_epsilon,
  check_sampling_rate,
  check_steps,
  check_unit,
)
from dpjax.core.mechanisms import base as mechanisms


def epsilon_spent(
  noise_multiplier: float,
  sampling_rate: float,
  steps: int,
  delta: float,
  accountant: str = "pld",
  mechanism: str = "gaussian",
  *,
  unit: str = "example",
  sampling=None,
  max_examples_per_user: int = 1,
) -> float:
  """Epsilon after `steps` Poisson-sampled DP-SGD steps (0.0 before the first), per `unit`.

  unit="example": one example is the unit, `sampling_rate` is per example.
  unit="user", sampling="uls": users are sampled with `sampling_rate`, each
  contributes one clipped (mean) gradient: the subsampled Gaussian per user.
  unit="user", sampling="els": examples are sampled with `sampling_rate` after
  each user was capped to G examples: the user-level ELS accountant
  (`user_level.els_epsilon`, PLD of a mixture of Gaussians; PLD only).

  Args:
    noise_multiplier: sigma (0: no noise, epsilon inf).
    sampling_rate: q in (0, 1], per `unit` (per example for ELS).
    steps: releases, an integer >= 0.
    delta: in (0, 1).
    accountant: a name in `ACCOUNTANTS`.
    mechanism: "gaussian" or "laplace".
    unit: "example" or "user".
    sampling: for users, "els" or "uls".
    max_examples_per_user: the cap G of ELS (users only).

  Returns:
    epsilon, per `unit`, at `delta`.
  """
  G = max_examples_per_user  # the papers' G
  check_unit(unit, sampling, G)
  check_delta(delta)
  check_sampling_rate(sampling_rate)
  check_steps(steps, minimum=0)
  if steps == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  mechanisms.get(mechanism).check_accountant(unit, sampling, accountant)
  if unit == "user" and sampling == "els":
    return els_epsilon(noise_multiplier, sampling_rate, steps, G, delta)
  return epsilon(
    ev.dpsgd_event(noise_multiplier, sampling_rate, steps, mechanism), delta, accountant
  )


def calibrate_noise(
  target_epsilon: float,
  delta: float,
  sampling_rate: float,
  steps: int,
  accountant: str = "pld",
  mechanism: str = "gaussian",
  rel_tol: float = 0.005,
  *,
  unit: str = "example",
  sampling=None,
  max_examples_per_user: int = 1,
) -> float:
  """Smallest noise multiplier (to `rel_tol` in epsilon) meeting the target.

  Returns sigma such that `epsilon_spent(sigma, q, steps, delta, ...) <=
  target_epsilon` (per `unit`, see `epsilon_spent`) and, unless sigma is pinned
  to the bracket's resolution, the epsilon is within `rel_tol` below the
  target. Epsilon is monotone decreasing in sigma, so a bracketed bisection on
  log(sigma) cannot fail.

  Example:
    >>> sigma = calibrate_noise(3.0, 1e-5, 0.01, 1000)
    >>> epsilon_spent(sigma, 0.01, 1000, 1e-5) <= 3.0
    True

  Args:
    target_epsilon: finite and > 0.
    delta: in (0, 1), as in `epsilon_spent`.
    sampling_rate: q in (0, 1], per `unit`.
    steps: releases, an integer >= 1.
    accountant: a name in `ACCOUNTANTS`.
    mechanism: "gaussian" or "laplace".
    unit: "example" or "user".
    sampling: for users, "els" or "uls".
    max_examples_per_user: the cap G of ELS (users only).
    rel_tol: how far below the target the epsilon of the returned sigma may be.

  Returns:
    The noise multiplier sigma.
  """
  G = max_examples_per_user  # the papers' G
  check_epsilon(target_epsilon)
  check_delta(delta)
  check_sampling_rate(sampling_rate)
  check_steps(steps)
  check_unit(unit, sampling, G)
  if accountant in ESTIMATES:
    warnings.warn(
      f"accountant={accountant!r} gives an estimate, not an upper bound: the noise "
      f"it calibrates may give epsilon > {target_epsilon}. Report the PLD epsilon "
      "of the noise used (dpjax.accounting.epsilon(..., accountant='pld')).",
      UserWarning,
      stacklevel=2,
    )

  return _calibrated_noise(
    float(target_epsilon),
    float(delta),
    float(sampling_rate),
    int(steps),
    accountant,
    mechanism,
    float(rel_tol),
    unit,
    sampling,
    G,
  )


@functools.lru_cache(maxsize=128)
def _calibrated_noise(
  target_epsilon, delta, sampling_rate, steps, accountant, mechanism, rel_tol, unit, sampling, G
) -> float:
  # Memoised per (event, target): a run, its resume and `dpjax account` ask again.
  def eps_of(sigma: float) -> float:
    return epsilon_spent(
      sigma,
      sampling_rate,
      steps,
      delta,
      accountant,
      mechanism,
      unit=unit,
      sampling=sampling,
      max_examples_per_user=G,
    )

  coarse = None
  if accountant == "pld" and sampling != "els":  # ELS has its own (mixture) PLD

    def coarse(sigma: float) -> float:
      event = ev.dpsgd_event(sigma, sampling_rate, steps, mechanism)
      return epsilon(event, delta, accountant, coarse=True)

  try:
    return calibrate_scale(eps_of, target_epsilon, rel_tol, coarse=coarse)
  except UnreachableTarget:
    if accountant == "edgeworth-bound":
      why = bound_report(1e5, sampling_rate, steps, delta)["reason"]
      raise ValueError(
        f"the certified Edgeworth bound cannot reach eps={target_epsilon} at "
        f"any noise level: {why} after {steps} steps"
      ) from None
    raise ValueError(
      f"target_epsilon={target_epsilon} is unreachable with noise_multiplier "
      f"<= 1e5 (delta={delta}, q={sampling_rate}, steps={steps})"
    ) from None


class UnreachableTarget(ValueError):
  """No noise scale within the search range meets the target epsilon."""


def calibrate_scale(
  eps_of: Callable[[float], float],
  target_epsilon: float,
  rel_tol: float = 0.005,
  max_scale: float = 1e5,
  *,
  coarse: Optional[Callable[[float], float]] = None,
) -> float:
  """Smallest noise scale s (to `rel_tol` in epsilon) with `eps_of(s) <= target_epsilon`.

  `eps_of` must be non-increasing in s (more noise never costs more), as
  every accountant's epsilon of a fixed event shape is. Without `coarse`:
  bracketed bisection on log(s). With `coarse` (a cheap approximation of
  `eps_of`, e.g. the same PLD on a wider grid): the coarse curve's root is
  found by Brent's method, then `eps_of` is evaluated there and moved along
  the coarse curve's log-log slope (secant steps once two exact points exist)
  until it lands in [target (1 - rel_tol), target] -- one or two exact
  evaluations in the usual case. The returned s is always certified by
  `eps_of` itself, whatever `coarse` returns; an unhelpful `coarse` only
  costs the bisection it would have replaced.

  Args:
    eps_of: the epsilon of noise scale s (a run's whole ledger, LMO's scale
      of b, DistilDP's histogram, ...).
    target_epsilon: finite and > 0.
    rel_tol: stop once eps_of(s) is within this fraction below the target.
    max_scale: the largest scale tried.
    coarse: optional cheap, non-increasing approximation of `eps_of` that
      brackets the search; never trusted for the result.

  Returns:
    s with eps_of(s) <= target_epsilon.

  Raises:
    UnreachableTarget: no scale up to `max_scale` meets the target.
  """
  check_epsilon(target_epsilon)
  if coarse is not None:
    s = _coarse_to_fine(eps_of, coarse, target_epsilon, rel_tol, max_scale)
    if s is not None:
      return s
  return _bisect(eps_of, target_epsilon, rel_tol, max_scale, 1.0)


def _bisect(eps_of, target: float, rel_tol: float, max_scale: float, hi: float, lo=None):
  """Bisection on log(s) in [lo, hi], bracketing from `hi` first when `lo` is None."""
  if lo is not None:
    return _narrow(eps_of, target, rel_tol, lo, hi)
  while eps_of(hi) > target:
    hi *= 2.0
    if hi > max_scale:
      raise UnreachableTarget(
        f"target_epsilon={target} is unreachable with noise scale <= {max_scale:g}"
      )
  lo = hi / 2.0
  while eps_of(lo) <= target:
    hi, lo = lo, lo / 2.0
    if lo < _MIN_SCALE:
      return hi
  return _narrow(eps_of, target, rel_tol, lo, hi)


def _narrow(eps_of, target: float, rel_tol: float, lo: float, hi: float) -> float:
  """Bisection of a bracket eps_of(lo) > target >= eps_of(hi) until hi is within rel_tol."""
  e_hi = eps_of(hi)
  while e_hi < target * (1.0 - rel_tol) and hi / lo > 1.0 + 1e-6:
    mid = math.sqrt(lo * hi)
    e_mid = eps_of(mid)
    if e_mid <= target:
      hi, e_hi = mid, e_mid
    else:
      lo = mid
  return hi


_MIN_SCALE = 1e-4  # below this a scale is "no noise needed"; the bisection stops
_FINE_STEPS = 8  # exact evaluations the coarse-to-fine search may spend before bisecting


def _log_excess(f, level: float):
  """u -> log(f(e^u) / level), memoised (Brent's method asks for its bracket's ends again)."""
  seen: dict = {}

  def g(u: float) -> float:
    if u not in seen:
      e = f(math.exp(u))
      seen[u] = math.log(e / level) if 0 < e < math.inf else (math.inf if e > 0 else -math.inf)
    return seen[u]

  g.seen = seen
  return g


def _slope_at(g, u: float) -> float:
  """d g / d u near u from two points g already saw (>= 0.01 apart), else one more evaluation."""
  pts = sorted((abs(v - u), v) for v, y in g.seen.items() if math.isfinite(y))
  for _, v in pts[1:]:
    if abs(v - pts[0][1]) >= 0.01:
      a = pts[0][1]
      return (g.seen[v] - g.seen[a]) / (v - a)
  return (g(u + 0.02) - g(u)) / 0.02


def _coarse_to_fine(eps_of, coarse, target: float, rel_tol: float, max_scale: float):
  """`calibrate_scale` through `coarse`'s root; None when the coarse curve cannot bracket it."""
  aim = target * (1.0 - rel_tol / 2.0)
  g = _log_excess(coarse, aim)
  hi = 1.0
  while g(math.log(hi)) > 0:
    hi *= 2.0
    if hi > max_scale:
      return None  # the exact search decides whether the target is reachable
  lo = hi / 2.0
  while g(math.log(lo)) <= 0:
    hi, lo = lo, lo / 2.0
    if lo < _MIN_SCALE:
      return None
  u = optimize.brentq(g, math.log(lo), math.log(hi), xtol=1e-3)
  # The coarse curve's log-log slope at its root: the exact curve's first guess.
  slope = _slope_at(g, u)
  bad, good = None, None  # exact bracket: eps_of(bad) > target >= eps_of(good)
  last = None
  for _ in range(_FINE_STEPS):
    s = math.exp(u)
    e = eps_of(s)
    if e <= target:
      good = s if good is None else min(good, s)
      if e >= target * (1.0 - rel_tol):
        return s
    else:
      bad = s if bad is None else max(bad, s)
    v = math.log(e / aim) if 0 < e < math.inf else None
    if v is not None and last is not None and last[0] != u and last[1] != v:
      secant = (v - last[1]) / (u - last[0])
      slope = secant if secant < 0 else slope
    if v is None or not slope < 0:
      break
    last = (u, v)
    u = u - v / slope
    if bad is not None and good is not None:
      lo_u, hi_u = math.log(bad), math.log(good)
      if not lo_u < u < hi_u:
        u = 0.5 * (lo_u + hi_u)
  if good is None:
    return None
  return _bisect(eps_of, target, rel_tol, max_scale, good, bad)
