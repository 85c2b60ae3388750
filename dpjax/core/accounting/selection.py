"""Hyper-parameter tuning that is accounted: the best of a random number of private runs.

Trying K configurations on the private data and keeping the best is a release
of its own. With K fixed the cost grows with K; with K drawn from a truncated
negative binomial distribution TNB(eta, gamma) it is at most a few times one
run's, whatever K turned out to be (Papernot and Steinke, "Hyperparameter
tuning with Renyi differential privacy", ICLR 2022, arXiv 2110.03620,
Theorem 2). The procedure: draw K ~ TNB(eta, gamma); run K independent
private trainings, each with a configuration drawn from a fixed distribution
(or the grid in a random order with replacement) and its own fresh noise;
release the best (its score computed privately too or on public data, and
its parameters). If each run is (lambda, eps(lambda))-RDP for all lambda, the
whole is (lambda, eps'(lambda))-RDP with

  eps'(lambda) = eps(lambda) + (1 + eta) (1 - 1/lh) eps(lh)
                 + (1 + eta) log(1/gamma) / lh + log(E[K]) / (lambda - 1)

for every lh >= 1 (the least over lh is taken). eta = 1 is the geometric
distribution (Liu and Talwar 2019), eta = 0 the logarithmic one.

TNB(eta, gamma), eta > -1, 0 < gamma < 1, on k = 1, 2, ...:
  P[K = k] = (1 - gamma)^k / (gamma^-eta - 1) * prod_{l<k} (l + eta) / (l + 1)   (eta != 0)
  P[K = k] = (1 - gamma)^k / (k log(1/gamma))                                    (eta == 0)
  E[K] = eta (1 - gamma) / (gamma (1 - gamma^eta))  (eta != 0),  (1/gamma - 1) / log(1/gamma).
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant

from dpjax.core.checks import check_delta

ORDERS = tuple(
  sorted(set(np.round(np.concatenate([np.linspace(1.01, 8, 140), np.geomspace(8, 1024, 120)]), 6)))
)


def check_tnb(eta: float, gamma: float) -> None:
  """Raises ValueError (one line) unless eta > -1 and 0 < gamma < 1.

  Args:
    eta: TNB's shape.
    gamma: TNB's stopping probability.
  """
  if not (eta > -1 and math.isfinite(eta)):
    raise ValueError(f"the TNB shape eta must be a number > -1, got {eta}")
  if not 0 < gamma < 1:
    raise ValueError(f"the TNB parameter gamma must be in (0, 1), got {gamma}")


def tnb_mean(eta: float, gamma: float) -> float:
  """E[K] for K ~ TNB(eta, gamma).

  Args:
    eta: the shape, > -1.
    gamma: in (0, 1).

  Returns:
    The expected number of runs.
  """
  check_tnb(eta, gamma)
  if eta == 0:
    return (1 / gamma - 1) / math.log(1 / gamma)
  return eta * (1 - gamma) / (gamma * (1 - gamma**eta))


def tnb_pmf(k: np.ndarray, eta: float, gamma: float) -> np.ndarray:
  """P[K = k] for K ~ TNB(eta, gamma), k >= 1.

  Args:
    k: integers >= 1.
    eta: the shape, > -1.
    gamma: in (0, 1).

  Returns:
    The probabilities.
  """
  check_tnb(eta, gamma)
  k = np.asarray(k, dtype=np.float64)
  if eta == 0:
    return np.exp(k * math.log1p(-gamma) - np.log(k) - math.log(math.log(1 / gamma)))
  # prod_{l<k} (l + eta) / (l + 1) = Gamma(k + eta) / (Gamma(eta) Gamma(k + 1)), as logs
  from scipy.special import gammaln

  if eta > 0:
    log_prod = gammaln(k + eta) - gammaln(eta) - gammaln(k + 1)
    sign = 1.0
  else:  # -1 < eta < 0: the l = 0 factor is eta (< 0), the others positive
    log_prod = gammaln(k + eta) - gammaln(eta + 1) - gammaln(k + 1) + math.log(-eta)
    sign = -1.0
  norm = gamma**-eta - 1  # < 0 when eta < 0: the signs cancel
  return np.exp(k * math.log1p(-gamma) + log_prod - math.log(abs(norm))) * (
    sign * math.copysign(1.0, norm)
  )


def sample_runs(rng: np.random.Generator, eta: float, gamma: float) -> int:
  """One draw of K ~ TNB(eta, gamma) (by its CDF; the tail past 1 - 1e-12 is cut).

  Args:
    rng: the generator (a secret one for a real tuning: K itself is private).
    eta: the shape.
    gamma: in (0, 1).

  Returns:
    K >= 1.
  """
  u = rng.random()
  k, total, chunk = 0, 0.0, 256
  while True:
    ks = np.arange(k + 1, k + chunk + 1)
    cdf = total + np.cumsum(tnb_pmf(ks, eta, gamma))
    hit = np.nonzero(cdf >= min(u, 1 - 1e-12))[0]
    if hit.size:
      return int(ks[hit[0]])
    k, total = k + chunk, float(cdf[-1])


def selection_rdp(
  run_rdp: Callable[[float], float],
  order: float,
  eta: float,
  gamma: float,
  hat_orders: Sequence[float] = ORDERS,
) -> float:
  """eps'(order) of the best of K ~ TNB(eta, gamma) runs, each (lambda, run_rdp(lambda))-RDP.

  Args:
    run_rdp: one run's RDP epsilon at an order > 1 (and at 1: its KL bound, or inf).
    order: lambda > 1.
    eta: TNB's shape.
    gamma: TNB's parameter.
    hat_orders: the lh tried (the least bound is taken; lh = 1 is always tried).

  Returns:
    The RDP epsilon of the whole tuning at `order`.
  """
  check_tnb(eta, gamma)
  if order <= 1:
    raise ValueError(f"an RDP order must be > 1, got {order}")
  extra = (1 + eta) * math.log(1 / gamma)  # lh = 1: the (1 - 1/lh) eps(lh) term is 0
  for lh in hat_orders:
    extra = min(extra, (1 + eta) * ((1 - 1 / lh) * run_rdp(lh) + math.log(1 / gamma) / lh))
  return run_rdp(order) + extra + math.log(tnb_mean(eta, gamma)) / (order - 1)


def selection_epsilon(
  run: dp_accounting.DpEvent,
  delta: float,
  eta: float,
  gamma: float,
  orders: Sequence[float] = ORDERS,
) -> float:
  """Epsilon at `delta` of releasing the best of K ~ TNB(eta, gamma) runs, each `run`.

  Each run's RDP curve is dp-accounting's RDP accountant's (the run's event:
  e.g. `events.dpsgd_event`); the tuning's curve is `selection_rdp`, turned
  into (epsilon, delta) by dp-accounting's conversion.

  Args:
    run: one training run's DpEvent.
    delta: in (0, 1).
    eta: TNB's shape.
    gamma: TNB's parameter.
    orders: the RDP orders.

  Returns:
    The tuning's epsilon (an upper bound).
  """
  check_delta(delta)
  check_tnb(eta, gamma)
  acc = rdp_privacy_accountant.RdpAccountant(orders=list(orders))
  # dp-accounting logs each order near 1 whose series does not converge at small sigma;
  # it leaves that order's epsilon infinite (never used by the bound): not the user's concern.
  log = logging.getLogger("absl")  # the logger absl's logging writes through
  was = log.level
  log.setLevel(logging.ERROR)
  try:
    acc.compose(run)
  finally:
    log.setLevel(was)
  curve = dict(zip(orders, acc.rdp))  # the accountant's curve of one run, order by order

  def run_rdp(lam: float) -> float:
    return float(curve[lam])

  total = [selection_rdp(run_rdp, lam, eta, gamma, orders) for lam in orders]
  eps, _ = rdp_privacy_accountant.compute_epsilon(list(orders), total, delta)
  return float(eps)
