"""Epsilon of DP-SGD runs and noise calibration: one bisection, used by every caller.

`calibrate_scale` finds the least noise scale meeting a target epsilon for
any epsilon-of-scale function that is non-increasing (true of every
accountant's epsilon of a fixed event shape); `calibrate_noise` applies it to
DP-SGD's noise multiplier per privacy unit. The plan, DistilDP's histogram
and LMO-DP's scale search all calibrate through `calibrate_scale`.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

from dpjax.core.accounting import events as ev
from dpjax.core.accounting.accountants import ESTIMATES, epsilon
from dpjax.core.accounting.edgeworth import bound_report
from dpjax.core.accounting.user_level import els_epsilon
from dpjax.core.checks import (
  check_accountant_covers,
  check_delta,
  check_epsilon,
  check_sampling_rate,
  check_steps,
  check_unit,
)


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
  check_accountant_covers(mechanism, unit, sampling, accountant)
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
    delta, sampling_rate, steps, accountant, mechanism, unit, sampling,
      max_examples_per_user: as in `epsilon_spent`.
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

  try:
    return calibrate_scale(eps_of, target_epsilon, rel_tol)
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
) -> float:
  """Smallest noise scale s (to `rel_tol` in epsilon) with `eps_of(s) <= target_epsilon`.

  `eps_of` must be non-increasing in s (more noise never costs more), as
  every accountant's epsilon of a fixed event shape is. Bracketed bisection
  on log(s); raises ValueError when even `max_scale` misses the target.

  Args:
    eps_of: the epsilon of noise scale s (a run's whole ledger, LMO's scale
      of b, DistilDP's histogram, ...).
    target_epsilon: finite and > 0.
    rel_tol: stop once eps_of(s) is within this fraction below the target.
    max_scale: the largest scale tried.

  Returns:
    s with eps_of(s) <= target_epsilon.

  Raises:
    UnreachableTarget: no scale up to `max_scale` meets the target.
  """
  check_epsilon(target_epsilon)
  hi = 1.0
  while eps_of(hi) > target_epsilon:
    hi *= 2.0
    if hi > max_scale:
      raise UnreachableTarget(
        f"target_epsilon={target_epsilon} is unreachable with noise scale <= {max_scale:g}"
      )
  lo = hi / 2.0
  while eps_of(lo) <= target_epsilon:
    hi, lo = lo, lo / 2.0
    if lo < 1e-4:
      return hi
  e_hi = eps_of(hi)
  while e_hi < target_epsilon * (1.0 - rel_tol) and hi / lo > 1.0 + 1e-6:
    mid = math.sqrt(lo * hi)
    e_mid = eps_of(mid)
    if e_mid <= target_epsilon:
      hi, e_hi = mid, e_mid
    else:
      lo = mid
  return hi
