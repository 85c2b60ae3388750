"""Epsilon, delta and noise calibration for DpEvents, with a choice of accountant.

`accountant="pld"` uses dp-accounting's privacy-loss-distribution accountant
with pessimistic discretisation (arXiv 2106.08567): its epsilon is an upper
bound. `accountant="rdp"` uses Renyi DP (arXiv 1702.07476, 1908.10530), also
an upper bound, usually looser. `accountant="edgeworth"` is the Edgeworth
estimate of EW-Tune (NOT a bound; calibrating with it warns) and
`"edgeworth-bound"` its certified Berry-Esseen variant
(dpjax.accounting.edgeworth). All take add/remove-one-unit events, except
fixed-batch (without-replacement) events, which are replace-one and RDP only.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict

import dp_accounting
from dp_accounting import pld, rdp

from dpjax.accounting import events as ev

NeighborRel = dp_accounting.NeighboringRelation

# Finer than dp-accounting's 1e-4 default costs time without changing the
# epsilons we report beyond the third decimal; coarser stays an upper bound.
PLD_DISCRETIZATION = 1e-4
MOG_DISCRETIZATION = 1e-3


def check_delta(delta: float) -> None:
  if not (0.0 < delta < 1.0):
    raise ValueError(f"delta must be in (0, 1), got {delta}")


def check_epsilon(epsilon: float) -> None:
  if not (epsilon > 0 and math.isfinite(epsilon)):
    raise ValueError(f"epsilon must be finite and > 0, got {epsilon}")


def _relation(event) -> NeighborRel:
  return NeighborRel.REPLACE_ONE if ev.is_replace_one(event) else NeighborRel.ADD_OR_REMOVE_ONE


def _pld_accountant(event):
  rel = _relation(event)
  if rel is NeighborRel.REPLACE_ONE:
    raise ValueError("the PLD accountant does not support fixed-size batches sampled without "
                     "replacement; use accountant='rdp' or Poisson sampling")
  from dpjax.accounting.lmo import LMOAccountant, LMODpEvent
  if ev.contains(event, LMODpEvent):
    return LMOAccountant()
  # The mixture's PLD (user-level ELS) is built on the coarser grid its own
  # accountant uses (`MOG_DISCRETIZATION`); still an upper bound.
  if ev.contains(event, dp_accounting.dp_event.MixtureOfGaussiansDpEvent):
    from dpjax.accounting.user_level import MixtureAccountant
    mixture = MixtureAccountant()
    if mixture.supports(event):
      return mixture
    return pld.PLDAccountant(rel, value_discretization_interval=MOG_DISCRETIZATION)
  return pld.PLDAccountant(rel, value_discretization_interval=PLD_DISCRETIZATION)


def _rdp_accountant(event):
  return rdp.RdpAccountant(neighboring_relation=_relation(event))


def _edgeworth(certified: bool):
  def make(event):
    from dpjax.accounting.edgeworth import EdgeworthAccountant
    if _relation(event) is NeighborRel.REPLACE_ONE:
      raise ValueError("the Edgeworth accountant covers Poisson sampling (add/remove) only")
    return EdgeworthAccountant(order=1, certified=certified)
  return make


# Accountant name -> factory taking the event. Other modules register more.
# "edgeworth" is an ESTIMATE (not an upper bound); the others are upper bounds.
ACCOUNTANTS: Dict[str, Callable] = {"pld": _pld_accountant, "rdp": _rdp_accountant,
                                    "edgeworth": _edgeworth(False),
                                    "edgeworth-bound": _edgeworth(True)}
ESTIMATES = frozenset({"edgeworth"})   # accountants whose epsilon is not a guarantee


def bound_accountant(accountant: str) -> str:
  """The accountant whose epsilon is reported as the guarantee: PLD in place of an estimate."""
  return "pld" if accountant in ESTIMATES else accountant


def _composed(event, accountant: str):
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {accountant!r}")
  acc = ACCOUNTANTS[accountant](event)
  if not acc.supports(event):
    raise ValueError(f"accountant {accountant!r} does not support event {event}")
  acc.compose(event)
  return acc


def epsilon(event: dp_accounting.DpEvent, delta: float, accountant: str = "pld") -> float:
  """Upper bound on epsilon at `delta` for everything described by `event`."""
  check_delta(delta)
  return float(_composed(event, accountant).get_epsilon(delta))


def delta(event: dp_accounting.DpEvent, epsilon: float, accountant: str = "pld") -> float:
  """Upper bound on delta at `epsilon` for everything described by `event`."""
  if not (epsilon >= 0 and math.isfinite(epsilon)):
    raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
  return float(_composed(event, accountant).get_delta(epsilon))


UNITS = ("example", "user")
USER_SAMPLING = ("els", "uls")


def check_unit(unit: str, sampling, G: int) -> None:
  """Validates a privacy unit and, for users, how batches sample them."""
  if unit not in UNITS:
    raise ValueError(f"privacy unit must be one of {UNITS}, got {unit!r}")
  if unit == "user":
    if sampling not in USER_SAMPLING:
      raise ValueError(f"user-level DP needs sampling in {USER_SAMPLING} "
                       f"(example- or user-level sampling), got {sampling!r}")
    if int(G) != G or G < 1:
      raise ValueError(f"max examples per user G must be an integer >= 1, got {G}")
  elif sampling not in (None, "poisson"):
    raise ValueError(f"example-level DP samples examples (Poisson); sampling={sampling!r} "
                     "applies to privacy_unit='user'")


def epsilon_spent(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
                accountant: str = "pld", mechanism: str = "gaussian", *,
                unit: str = "example", sampling=None, G: int = 1) -> float:
  """Epsilon after `steps` Poisson-sampled DP-SGD steps (0.0 before the first), per `unit`.

  unit="example": one example is the unit, `sampling_rate` is per example.
  unit="user", sampling="uls": users are sampled with `sampling_rate`, each
  contributes one clipped (mean) gradient: the subsampled Gaussian per user.
  unit="user", sampling="els": examples are sampled with `sampling_rate` after
  each user was capped to G examples: the user-level ELS accountant
  (`user_level.els_epsilon`, PLD of a mixture of Gaussians; PLD only).
  """
  check_unit(unit, sampling, G)
  check_delta(delta)
  ev.check_sampling_rate(sampling_rate)
  if int(steps) != steps or steps < 0:
    raise ValueError(f"steps must be an integer >= 0, got {steps}")
  if steps == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  if unit == "user" and sampling == "els":
    if mechanism != "gaussian" or accountant != "pld":
      raise ValueError("the user-level ELS accountant covers Gaussian noise with "
                       f"accountant='pld', got mechanism={mechanism!r}, accountant={accountant!r}")
    from dpjax.accounting.user_level import els_epsilon
    check_delta(delta)
    return els_epsilon(noise_multiplier, sampling_rate, steps, G, delta)
  return epsilon(ev.dpsgd_event(noise_multiplier, sampling_rate, steps, mechanism), delta,
                 accountant)


def calibrate_noise(target_epsilon: float, delta: float, sampling_rate: float, steps: int,
                    accountant: str = "pld", mechanism: str = "gaussian",
                    rel_tol: float = 0.005, *, unit: str = "example", sampling=None,
                    G: int = 1) -> float:
  """Smallest noise multiplier (to `rel_tol` in epsilon) meeting the target.

  Returns sigma such that `epsilon_spent(sigma, q, steps, delta, ...) <=
  target_epsilon` (per `unit`, see `run_epsilon`) and, unless sigma is pinned
  to the bracket's resolution, the epsilon is within `rel_tol` below the
  target. Epsilon is monotone decreasing in sigma, so a bracketed bisection on
  log(sigma) cannot fail.
  """
  check_epsilon(target_epsilon)
  check_delta(delta)
  ev.check_sampling_rate(sampling_rate)
  ev.check_steps(steps)
  check_unit(unit, sampling, G)
  if accountant in ESTIMATES:
    warnings.warn(f"accountant={accountant!r} gives an estimate, not an upper bound: the noise "
                  f"it calibrates may give epsilon > {target_epsilon}. Report the PLD epsilon "
                  "of the noise used (dpjax.accounting.epsilon(..., accountant='pld')).",
                  UserWarning, stacklevel=2)

  def eps_of(sigma: float) -> float:
    return epsilon_spent(sigma, sampling_rate, steps, delta, accountant, mechanism,
                         unit=unit, sampling=sampling, G=G)

  try:
    return calibrate_scale(eps_of, target_epsilon, rel_tol)
  except UnreachableTarget:
    if accountant == "edgeworth-bound":
      from dpjax.accounting.edgeworth import bound_report
      why = bound_report(1e5, sampling_rate, steps, delta)["reason"]
      raise ValueError(f"the certified Edgeworth bound cannot reach eps={target_epsilon} at "
                       f"any noise level: {why} after {steps} steps") from None
    raise ValueError(f"target_epsilon={target_epsilon} is unreachable with noise_multiplier "
                     f"<= 1e5 (delta={delta}, q={sampling_rate}, steps={steps})") from None


class UnreachableTarget(ValueError):
  """No noise scale within the search range meets the target epsilon."""


def calibrate_scale(eps_of: Callable[[float], float], target_epsilon: float,
                    rel_tol: float = 0.005, max_scale: float = 1e5) -> float:
  """Smallest noise scale s (to `rel_tol` in epsilon) with `eps_of(s) <= target_epsilon`.

  `eps_of` must be non-increasing in s (more noise never costs more), as
  every accountant's epsilon of a fixed event shape is. Bracketed bisection
  on log(s); raises ValueError when even `max_scale` misses the target.
  """
  check_epsilon(target_epsilon)
  hi = 1.0
  while eps_of(hi) > target_epsilon:
    hi *= 2.0
    if hi > max_scale:
      raise UnreachableTarget(f"target_epsilon={target_epsilon} is unreachable with noise "
                              f"scale <= {max_scale:g}")
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
