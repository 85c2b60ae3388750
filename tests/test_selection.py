"""Accounted tuning: the best of K ~ TNB(eta, gamma) private runs (Papernot & Steinke 2022).

Checked against independent computations: the TNB distribution's mass and mean by
summation; the RDP bound against the EXACT Renyi divergence of a selection computed
by quadrature -- each run a Gaussian mechanism N(mu, 1) with mu = 0 or Delta, the best
of K runs being their maximum, whose density is phi(x - mu) G'(Phi(x - mu)) with G
the probability generating function of K -- in both directions, at several orders.
"""

import math

import numpy as np
import pytest
from scipy import stats

from dpjax.core.accounting import events as ev
from dpjax.core.accounting import selection

TNBS = [(1.0, 0.1), (0.0, 0.05), (-0.5, 0.2), (2.0, 0.3)]


@pytest.mark.parametrize("eta,gamma", TNBS)
def test_the_tnb_distribution_sums_to_one_with_its_stated_mean(eta, gamma):
  k = np.arange(1, 20_000)
  p = selection.tnb_pmf(k, eta, gamma)
  assert np.all(p >= 0) and p.sum() == pytest.approx(1.0, abs=1e-9)
  assert (k * p).sum() == pytest.approx(selection.tnb_mean(eta, gamma), rel=1e-9)
  if eta == 1.0:  # the geometric distribution
    np.testing.assert_allclose(p[:50], gamma * (1 - gamma) ** (k[:50] - 1), rtol=1e-12)
  draws = [selection.sample_runs(np.random.default_rng(i), eta, gamma) for i in range(3000)]
  assert np.mean(draws) == pytest.approx(selection.tnb_mean(eta, gamma), rel=0.12)


def _exact_selection_rdp(order, delta_mu, eta, gamma):
  """max(D_order(A(D) || A(D')), D_order(A(D') || A(D))), by quadrature on a fine grid."""
  x = np.linspace(-15, 15 + delta_mu, 10_001)
  k = np.arange(1, 4000)
  p = selection.tnb_pmf(k, eta, gamma)
  keep = np.cumsum(p) < 1 - 1e-16  # K's mass past here is below 1e-16
  k, p = k[: keep.sum() + 1], p[: keep.sum() + 1]

  def log_density(mu):
    u = stats.norm.cdf(x - mu)
    # log G'(u) = log sum_k k p_k u^(k-1), stably
    terms = np.log(k * p)[None, :] + (k - 1)[None, :] * np.log(np.maximum(u, 1e-300))[:, None]
    top = terms.max(axis=1)
    return stats.norm.logpdf(x - mu) + top + np.log(np.exp(terms - top[:, None]).sum(axis=1))

  f, g = log_density(0.0), log_density(delta_mu)
  out = []
  for a, b in ((f, g), (g, f)):
    z = order * a + (1 - order) * b
    m = z.max()
    integral = np.exp(m) * np.trapezoid(np.exp(z - m), x)
    out.append(math.log(integral) / (order - 1))
  return max(out)


@pytest.mark.parametrize("eta,gamma", [(1.0, 0.1), (0.0, 0.05)])
@pytest.mark.parametrize("order", [2.0, 4.0, 8.0])
def test_the_bound_holds_over_the_exact_divergence_of_a_selection(eta, gamma, order):
  delta_mu = 0.5  # each run: (lambda, lambda * 0.125)-RDP, the Gaussian mechanism exactly
  exact = _exact_selection_rdp(order, delta_mu, eta, gamma)
  bound = selection.selection_rdp(lambda lam: lam * delta_mu**2 / 2, order, eta, gamma)
  assert order * delta_mu**2 / 2 < exact <= bound  # above one run's own divergence
  # not vacuous: below what a fixed count of runs as large as K's 99th percentile costs
  k99 = int(np.searchsorted(np.cumsum(selection.tnb_pmf(np.arange(1, 5000), eta, gamma)), 0.99))
  assert bound < (k99 + 1) * order * delta_mu**2 / 2


def test_a_tuning_costs_more_than_one_run_and_less_than_its_expected_runs():
  run = ev.dpsgd_event(1.0, 256 / 8441, 40)
  one = selection.selection_epsilon(run, 1e-5, 1.0, 0.999_999)  # K = 1 almost surely
  ten = selection.selection_epsilon(run, 1e-5, 1.0, 0.1)  # E[K] = 10
  from dp_accounting.rdp import rdp_privacy_accountant

  acc = rdp_privacy_accountant.RdpAccountant(orders=list(selection.ORDERS))
  base = acc.compose(run).get_epsilon(1e-5)
  assert base < ten and one == pytest.approx(base, abs=0.1)
  # ten runs composed by RDP would cost far more than the TNB selection's ~10 expected runs
  tenfold = rdp_privacy_accountant.RdpAccountant(orders=list(selection.ORDERS))
  assert ten < tenfold.compose(run, 10).get_epsilon(1e-5)


@pytest.mark.parametrize(
  "eta,gamma,msg", [(-1.0, 0.1, "eta must be a number > -1"), (1.0, 1.0, "gamma must be in (0, 1)")]
)
def test_bad_tnb_parameters_are_one_line(eta, gamma, msg):
  with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
    selection.tnb_mean(eta, gamma)
