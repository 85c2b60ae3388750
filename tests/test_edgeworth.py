"""The Edgeworth accountant against closed forms, Gauss-Hermite, Monte Carlo and PLD."""

import math
import warnings

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from dpjax.core import accounting
from dpjax.core.accounting import accountants
from dpjax.core.accounting.edgeworth import (
  EdgeworthAccountant,
  _loss,
  compose_steps,
  delta_estimate,
  edgeworth_sf,
  step_cumulants,
)


def test_single_step_q1_closed_form():
  # q = 1: L = mu x - mu^2/2 is Gaussian: means -/+ mu^2/2, variance mu^2, no skew.
  sigma = 1.7
  mu = 1 / sigma
  cm, cp = step_cumulants(sigma, 1.0)
  for c, mean in ((cm, mu * mu / 2), (cp, -mu * mu / 2)):
    assert c.k1 == pytest.approx(mean, rel=1e-10)
    assert c.k2 == pytest.approx(mu * mu, rel=1e-10)
    assert abs(c.k3) < 1e-12 and abs(c.k4) < 1e-12
    assert c.rho3 == pytest.approx(mu**3 * 2 * math.sqrt(2 / math.pi), rel=1e-10)


@pytest.mark.parametrize("q,sigma", [(0.01, 0.8), (0.1, 2.0), (0.03, 0.6), (0.5, 1.0)])
def test_cumulants_match_gauss_hermite(q, sigma):
  """Adaptive quadrature vs 150-node Gauss-Hermite (an independent rule): 1e-10 relative."""
  mu = 1 / sigma
  x, w = np.polynomial.hermite_e.hermegauss(150)
  w = w / math.sqrt(2 * math.pi)
  cm, cp = step_cumulants(sigma, q)

  def cumulants(vals, weights):
    m = sum(np.sum(wt * v) for v, wt in zip(vals, weights))
    c = [sum(np.sum(wt * (v - m) ** k) for v, wt in zip(vals, weights)) for k in (2, 3, 4)]
    return m, c[0], c[1], c[2] - 3 * c[0] ** 2

  ref_p = cumulants([_loss(x, q, mu)], [w])
  ref_m = cumulants([_loss(x, q, mu), _loss(x + mu, q, mu)], [(1 - q) * w, q * w])
  for c, ref in ((cp, ref_p), (cm, ref_m)):
    np.testing.assert_allclose([c.k1, c.k2, c.k3, c.k4], ref, rtol=1e-10)


def test_cumulants_match_monte_carlo():
  q, sigma, n = 0.05, 1.0, 10**7
  mu = 1 / sigma
  rng = np.random.default_rng(0)
  cm, cp = step_cumulants(sigma, q)
  x = rng.normal(size=n)
  for c, shift in ((cp, 0.0), (cm, mu * (rng.random(n) < q))):
    L = _loss(x + shift, q, mu)
    m = L.mean()
    d = L - m
    for est, ref, samples in (
      (m, c.k1, L),
      (np.mean(d**2), c.k2, d**2),
      (np.mean(d**3), c.k3, d**3),
    ):
      se = samples.std() / math.sqrt(n)
      assert abs(est - ref) < 5 * se, (est, ref, se)


@pytest.mark.parametrize("n", [2 * 10**6, pytest.param(10**7, marks=pytest.mark.slow)])
def test_composed_cdf_matches_monte_carlo(n):
  """Edgeworth CDFs of a 20-step sum vs n simulated sums; each order improves on normal."""
  q, sigma, steps = 0.1, 1.0, 20
  mu = 1 / sigma
  comp = compose_steps([(sigma, q, steps)])
  rng = np.random.default_rng(1)
  total = np.zeros(n)
  for _ in range(steps):
    for lo in range(0, n, 2 * 10**6):  # chunks keep memory flat
      m = min(n, lo + 2 * 10**6) - lo
      x = rng.normal(size=m) + mu * (rng.random(m) < q)
      total[lo : lo + m] += _loss(x, q, mu)
  cy = comp.y[0]
  errs = {o: [] for o in (0, 1, 2)}
  for t in np.quantile(total, [0.5, 0.8, 0.95, 0.99]):
    mc = np.mean(total > t)
    for o in errs:
      errs[o].append(abs(edgeworth_sf(t, cy, o) - mc))
  assert max(errs[2]) < 2e-3
  assert max(errs[1]) < max(errs[0]) and max(errs[2]) < max(errs[0])


def test_q1_delta_equals_gaussian_closed_form():
  sigma, steps = 3.0, 50
  mu = math.sqrt(steps) / sigma
  comp = compose_steps([(sigma, 1.0, steps)])
  for eps in (0.5, 1.0, 3.0):
    exact = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
    assert delta_estimate(comp, eps, order=2) == pytest.approx(exact, rel=1e-9)
  ev = accounting.dpsgd_event(sigma, 1.0, steps)
  pld = accounting.epsilon(ev, 1e-5, "pld")
  assert accounting.epsilon(ev, 1e-5, "edgeworth") == pytest.approx(pld, rel=2e-3)


def test_estimate_converges_to_pld_as_steps_grow():
  gaps = []
  for steps in (10, 100, 1000, 10000):
    ev = accounting.dpsgd_event(1.0, 0.01, steps)
    pld = accounting.epsilon(ev, 1e-5, "pld")
    gaps.append(abs(accounting.epsilon(ev, 1e-5, "edgeworth") - pld) / pld)
  assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
  assert gaps[-1] < 0.05


def test_heterogeneous_phases_add_cumulants():
  phases = [(1.0, 0.01, 300), (0.7, 0.02, 100)]
  comp = compose_steps(phases)
  a, b = step_cumulants(1.0, 0.01)[0], step_cumulants(0.7, 0.02)[0]
  assert comp.y[0].k3 == pytest.approx(300 * a.k3 + 100 * b.k3, rel=1e-12)
  event = accounting.compose([accounting.dpsgd_event(s, q, n) for s, q, n in phases])
  acc = EdgeworthAccountant()
  acc.compose(event)
  assert acc.composed() == comp
  with pytest.raises(dp_accounting.UnsupportedEventError):
    EdgeworthAccountant().compose(accounting.dpsgd_event(1.0, 0.1, 5, "laplace"))


GRID = [(q, s, n) for q in (0.01, 0.1, 1.0) for s in (0.8, 2.0) for n in (100, 10**4)]


def _gaussian_eps(mu: float, delta: float) -> float:
  """Exact epsilon of a mu-GDP Gaussian mechanism (closed-form delta, root-found)."""
  from scipy import optimize, special

  f = lambda e: (
    special.ndtr(-e / mu + mu / 2) - math.exp(e + special.log_ndtr(-e / mu - mu / 2)) - delta
  )
  return 0.0 if f(0.0) <= 0 else optimize.brentq(f, 0.0, 10 * mu * mu + 50, xtol=1e-12)


def test_certified_bound_is_never_below_pld():
  finite = 0
  for q, sigma, n in GRID:
    ev = accounting.dpsgd_event(sigma, q, n)
    # Each accountant composed once per grid point, then queried at every delta.
    certified = accountants.composed(ev, "edgeworth-bound")
    ref = None if q == 1.0 else accountants.composed(ev, "pld")
    for d in (1e-5, 0.05, 0.2):
      bound = float(certified.get_epsilon(d))
      # q = 1: n Gaussian steps are one Gaussian mechanism with mu = sqrt(n) / sigma.
      pld = _gaussian_eps(math.sqrt(n) / sigma, d) if q == 1.0 else float(ref.get_epsilon(d))
      assert bound >= pld, (q, sigma, n, d, bound, pld)
      finite += math.isfinite(bound)
  assert finite >= 8  # the grid does exercise informative bounds


def test_bound_report_says_when_vacuous():
  acc = EdgeworthAccountant(certified=True)
  acc.compose(accounting.dpsgd_event(0.8, 2000 / 67349, 673))
  rep = acc.report(1e-5)
  assert rep["vacuous"] and "Berry-Esseen error" in rep["reason"]
  assert math.isinf(acc.get_epsilon(1e-5))
  with pytest.raises(ValueError, match="certified Edgeworth bound cannot reach"):
    accounting.calibrate_noise(3.0, 1e-5, 0.01, 1000, accountant="edgeworth-bound")


def test_calibrating_with_the_estimate_warns():
  with pytest.warns(UserWarning, match="estimate, not an upper bound"):
    sigma = accounting.calibrate_noise(8.0, 1e-5, 0.03, 600, accountant="edgeworth")
  est = accounting.epsilon(accounting.dpsgd_event(sigma, 0.03, 600), 1e-5, "edgeworth")
  assert est <= 8.0 and est > 8.0 * 0.99
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    accounting.calibrate_noise(8.0, 1e-5, 0.03, 600, accountant="pld")
