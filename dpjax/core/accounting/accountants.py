"""Accountants by name, and epsilon/delta of any DpEvent.

`accountant="pld"` uses dp-accounting's privacy-loss-distribution accountant
with pessimistic discretisation (arXiv 2106.08567): its epsilon is an upper
bound. Events holding LMO-DP releases go to `lmo.LMOAccountant`, ELS mixtures
and every Gaussian/Laplace/mixture composition to `step_pld.StepPLDAccountant`
(dp-accounting's PLDs with each step's PLD memoised; both upper bounds).
`accountant="rdp"` uses Renyi DP (arXiv 1702.07476, 1908.10530), also an
upper bound, usually looser. `accountant="edgeworth"` is the Edgeworth
estimate of EW-Tune (NOT a bound) and `"edgeworth-bound"` its certified
Berry-Esseen variant (`edgeworth`). All take add/remove-one-unit events,
except fixed-batch (without-replacement) events, which are replace-one and
RDP only.

A new kind of release plugs in as a `DpEvent` and an accountant for it
(`events.LeafAccountant`), dispatched in `_pld_accountant`; a new way to
compose releases is an accountant added by name (`register`).
"""

from __future__ import annotations

import logging
from typing import Callable, Dict

import dp_accounting
from dp_accounting import pld, rdp

from dpjax.core import checks
from dpjax.core.accounting import events as ev
from dpjax.core.accounting.edgeworth import EdgeworthAccountant
from dpjax.core.accounting.lmo import LMOAccountant, LMODpEvent
from dpjax.core.accounting.step_pld import (
  MOG_DISCRETIZATION,
  PLD_DISCRETIZATION,
  StepPLDAccountant,
  numpy_fft,
)
from dpjax.core.checks import check_delta, check_epsilon

NeighborRel = dp_accounting.NeighboringRelation


def _relation(event) -> NeighborRel:
  return NeighborRel.REPLACE_ONE if ev.is_replace_one(event) else NeighborRel.ADD_OR_REMOVE_ONE


# A coarse PLD (`epsilon(..., coarse=True)`) uses a grid this many times wider:
# still an upper bound (pessimistic rounding), ~10x cheaper; calibration brackets
# with it and certifies with the fine one.
COARSE_FACTOR = 10


def _pld_accountant(event, coarse: bool = False):
  rel = _relation(event)
  if rel is NeighborRel.REPLACE_ONE:
    raise ValueError(
      "the PLD accountant does not support fixed-size batches sampled without "
      "replacement; use accountant='rdp' or Poisson sampling"
    )
  if ev.contains(event, LMODpEvent):
    return LMOAccountant()
  # Mixtures (user-level ELS) are built on a coarser grid (`MOG_DISCRETIZATION`),
  # and then the whole composition is; still an upper bound.
  mixture = ev.contains(event, dp_accounting.dp_event.MixtureOfGaussiansDpEvent)
  h = (MOG_DISCRETIZATION if mixture else PLD_DISCRETIZATION) * (COARSE_FACTOR if coarse else 1)
  memo = StepPLDAccountant(h)
  if memo.supports(event):
    return memo
  return pld.PLDAccountant(rel, value_discretization_interval=h)


def _rdp_accountant(event):
  return rdp.RdpAccountant(neighboring_relation=_relation(event))


def _edgeworth(certified: bool):
  def make(event):
    if _relation(event) is NeighborRel.REPLACE_ONE:
      raise ValueError("the Edgeworth accountant covers Poisson sampling (add/remove) only")
    return EdgeworthAccountant(order=1, certified=certified)

  return make


# Accountant name -> factory taking the event (`register` adds one).
# "edgeworth" is an ESTIMATE (not an upper bound); the others are upper bounds.
ACCOUNTANTS: Dict[str, Callable] = {
  "pld": _pld_accountant,
  "rdp": _rdp_accountant,
  "edgeworth": _edgeworth(False),
  "edgeworth-bound": _edgeworth(True),
}
ESTIMATES = {"edgeworth"}  # accountants whose epsilon is not a guarantee
BUILT_IN = tuple(ACCOUNTANTS)


def register(name: str, factory: Callable, *, estimate: bool = False) -> None:
  """Adds an accountant: `accountant=name` then composes a run's releases with it.

  Args:
    name: a new name (letters, digits, '_' or '-').
    factory: event -> a fresh `dp_accounting.PrivacyAccountant` that supports
      it (`epsilon` composes the event into it and asks for epsilon).
    estimate: its epsilon is an estimate, not an upper bound: a run then
      reports the PLD bound as its guarantee, beside this estimate.
  """
  if not name or not name.replace("_", "").replace("-", "").isalnum():
    raise ValueError(f"an accountant needs a name of letters, digits, '_' or '-', got {name!r}")
  if name in BUILT_IN or (name in ACCOUNTANTS and ACCOUNTANTS[name] is not factory):
    raise ValueError(f"accountant name {name!r} is taken")
  if not callable(factory):
    raise TypeError(f"an accountant's factory is a function of the event, got {factory!r}")
  ACCOUNTANTS[name] = factory
  if estimate:
    ESTIMATES.add(name)


def unregister(name: str) -> None:
  """Removes an accountant `register` added (a test's own, after it).

  Args:
    name: its name.
  """
  if name in BUILT_IN:
    raise ValueError(f"accountant {name!r} is built in")
  ACCOUNTANTS.pop(name, None)
  ESTIMATES.discard(name)


def names() -> tuple:
  """The accountants' names: the built-in ones, then the registered ones."""
  return tuple(ACCOUNTANTS)


def bound_accountant(accountant: str) -> str:
  """The accountant whose epsilon is reported as the guarantee: PLD in place of an estimate.

  Args:
    accountant: an accountant's name (`ACCOUNTANTS`).

  Returns:
    "pld" when `accountant` only estimates (Edgeworth), else `accountant`.
  """
  return "pld" if accountant in ESTIMATES else accountant


def check_accountable(event: dp_accounting.DpEvent) -> None:
  """Refuses, in one line and before any PLD is built, an event no accountant here can finish.

  A PLD's grid grows with the privacy loss of each release and with the
  number of releases: noise of a tiny multiplier or billions of steps would
  exhaust memory long before an epsilon came out (and would say nothing
  meaningful). Held to: at most `checks.MAX_RELEASES` releases; each
  Gaussian or mixture release with sensitivity at most
  `checks.MAX_RELEASE_SCALE` noise standard deviations, each Laplace
  release with a scale of at least 1 / `MAX_RELEASE_SCALE`; and the RDP
  bound of the whole (where RDP covers it; cheap and never larger than
  needed to decide) at most `checks.MAX_EPSILON`. LMO releases have a
  bounded grid of their own.

  Example:
    >>> check_accountable(ev.dpsgd_event(1.0, 0.01, 1000))  # nothing to refuse
    >>> check_accountable(ev.dpsgd_event(0.05, 0.1, 20))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the planned releases cannot be accounted: Gaussian noise multiplier 0.05 < 0.1 ...

  Args:
    event: the planned releases.
  """
  why = None
  leaves = ev.leaf_events(event)
  releases = sum(count for _, count in leaves)
  floor = 1.0 / checks.MAX_RELEASE_SCALE
  if releases > checks.MAX_RELEASES:
    why = f"{releases} releases > {checks.MAX_RELEASES}"
  for leaf, _ in leaves:
    inner = leaf.event if isinstance(leaf, dp_accounting.PoissonSampledDpEvent) else leaf
    if why is not None:
      break
    if isinstance(inner, dp_accounting.GaussianDpEvent) and inner.noise_multiplier < floor:
      why = (
        f"Gaussian noise multiplier {inner.noise_multiplier:g} < {floor:g} (a sensitivity of "
        f"{1 / max(inner.noise_multiplier, 1e-300):.3g} noise stds per release)"
      )
    elif isinstance(inner, dp_accounting.LaplaceDpEvent) and inner.noise_multiplier < floor:
      why = f"Laplace noise multiplier {inner.noise_multiplier:g} < {floor:g}"
    elif isinstance(inner, dp_accounting.dp_event.MixtureOfGaussiansDpEvent):
      scale = max(abs(x) for x in inner.sensitivities) / inner.standard_deviation
      if scale > checks.MAX_RELEASE_SCALE:
        why = f"a mixture release of {scale:.3g} noise stds > {checks.MAX_RELEASE_SCALE:g}"
  if why is None:
    rdp_acc = _rdp_accountant(event)
    if rdp_acc.supports(event):
      absl = logging.getLogger("absl")  # orders RDP cannot evaluate are dropped, said loudly
      level = absl.level
      absl.setLevel(logging.ERROR)
      try:
        rdp_eps = float(rdp_acc.compose(event).get_epsilon(1e-7))
      finally:
        absl.setLevel(level)
      if not rdp_eps <= checks.MAX_EPSILON:
        why = f"its RDP epsilon at delta 1e-7 is {rdp_eps:.4g} > {checks.MAX_EPSILON:g}"
  if why is not None:
    raise ValueError(
      f"the planned releases cannot be accounted: {why}; dpjax accounts at most "
      f"{checks.MAX_RELEASES} releases, noise multipliers of at least {floor:g} and an RDP "
      f"epsilon of at most {checks.MAX_EPSILON:g}: raise noise_multiplier, lower steps or the "
      "sampling rate"
    )


def composed(
  event: dp_accounting.DpEvent, accountant: str, *, coarse: bool = False
) -> dp_accounting.PrivacyAccountant:
  """A fresh accountant of kind `accountant` with `event` composed into it.

  Args:
    event: what was released, as a `DpEvent` (compose several with `compose`).
    accountant: a name in `ACCOUNTANTS` ("pld", "rdp", "edgeworth",
      "edgeworth-bound").
    coarse: the PLD accountant on a `COARSE_FACTOR` times wider grid (still
      an upper bound, looser; for bracketing a calibration, never reported);
      the other accountants are unchanged.

  Returns:
    The accountant, to query at several deltas or epsilons without composing
    again.
  """
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {accountant!r}")
  if coarse and accountant == "pld":
    acc = _pld_accountant(event, coarse=True)
  else:
    acc = ACCOUNTANTS[accountant](event)
  if not acc.supports(event):
    raise ValueError(f"accountant {accountant!r} does not support event {event}")
  with numpy_fft():  # no FFT plans kept per composition length (`step_pld.numpy_fft`)
    acc.compose(event)
  return acc


def epsilon(
  event: dp_accounting.DpEvent, delta: float, accountant: str = "pld", *, coarse: bool = False
) -> float:
  """Upper bound on epsilon at `delta` for everything described by `event`.

  Example:
    >>> from dpjax.core.accounting import events
    >>> round(epsilon(events.dpsgd_event(1.0, 0.01, 1000), 1e-5), 2)
    1.83

  Args:
    event: what was released (add/remove-one-unit events; fixed-batch events
      are replace-one and take "rdp").
    delta: in (0, 1).
    accountant: a name in `ACCOUNTANTS`; "edgeworth" is an estimate, not a
      bound (`ESTIMATES`).
    coarse: as in `composed` (a looser, cheaper upper bound).

  Returns:
    epsilon (inf when the accountant gives no finite bound).
  """
  check_delta(delta)
  return float(composed(event, accountant, coarse=coarse).get_epsilon(delta))


def delta(event: dp_accounting.DpEvent, epsilon: float, accountant: str = "pld") -> float:
  """Upper bound on delta at `epsilon` for everything described by `event`.

  Args:
    event: what was released.
    epsilon: finite and >= 0.
    accountant: a name in `ACCOUNTANTS`.

  Returns:
    delta in [0, 1].
  """
  check_epsilon(epsilon, allow_zero=True)
  return float(composed(event, accountant).get_delta(epsilon))
