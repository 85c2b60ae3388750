"""The audit estimators on scores whose answer is known in closed form."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from dpjax.auditing import estimators as est


def test_clopper_pearson_matches_the_binomial_tail():
  # The upper bound p_hi solves P(Binom(n, p_hi) <= k) = alpha; the lower P(Binom >= k) = alpha.
  lo, hi = est.clopper_pearson(7, 50, 0.05)
  assert stats.binom.cdf(7, 50, float(hi)) == pytest.approx(0.05, rel=1e-6)
  assert stats.binom.sf(6, 50, float(lo)) == pytest.approx(0.05, rel=1e-6)
  lo0, hi0 = est.clopper_pearson(0, 50, 0.05)
  assert float(lo0) == 0.0 and float(hi0) == pytest.approx(1 - 0.05 ** (1 / 50))


def test_gdp_mu_recovers_the_distance_of_two_gaussians():
  rng = np.random.default_rng(1)
  for mu in (0.5, 1.0, 2.0):
    out = rng.normal(0.0, 1.0, 50_000)
    inn = rng.normal(mu, 1.0, 50_000)
    r = est.gdp_mu(inn, out, confidence=0.95, seed=3)
    assert r.mu_lower < mu < r.mu_upper
    assert abs(r.mu - mu) < 0.1
    assert r.mu_upper - r.mu_lower < 0.4


def test_identical_distributions_show_no_privacy_loss():
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=20_000), rng.normal(size=20_000)
  for strategy in ("bonferroni", "split"):
    assert est.threshold_epsilon(a, b, 1e-5, strategy=strategy).epsilon < 0.05
  assert est.gdp_mu(a, b).mu_lower < 0.05
  scores = rng.normal(size=2000)
  included = rng.random(2000) < 0.5
  assert est.one_run_epsilon(scores, included, 1e-5).epsilon < 0.1


def test_threshold_bound_of_laplace_scores_is_the_log_likelihood_ratio():
  # Laplace(0, 1) vs Laplace(1, 1): TPR / FPR = e at every threshold >= 1, so
  # the best test proves eps = 1 (and no more): the bound must approach 1 from below.
  rng = np.random.default_rng(4)
  out = rng.laplace(0.0, 1.0, 400_000)
  inn = rng.laplace(1.0, 1.0, 400_000)
  for strategy in ("bonferroni", "split"):
    b = est.threshold_epsilon(inn, out, 1e-6, strategy=strategy, confidence=0.95)
    assert 0.93 < b.epsilon <= 1.0


def test_threshold_bound_is_a_lower_bound_for_the_gaussian_mechanism():
  # Scores of the Gaussian mechanism with sensitivity 1 at sigma 1: the true eps at
  # delta (dp-accounting, exact for one release) bounds every test's evidence.
  rng = np.random.default_rng(5)
  delta = 1e-5
  claimed = (
    dp_accounting.pld.PLDAccountant().compose(dp_accounting.GaussianDpEvent(1.0)).get_epsilon(delta)
  )
  bounds = []
  for _ in range(5):
    out = rng.normal(0.0, 1.0, 200_000)
    inn = rng.normal(1.0, 1.0, 200_000)
    bounds.append(est.threshold_epsilon(inn, out, delta).epsilon)
  assert max(bounds) <= claimed
  assert min(bounds) > 0.5 * claimed


def test_one_run_p_value_is_the_binomial_tail_without_delta():
  # With delta = 0 Theorem 5.2 is the Binomial(k, e^eps / (1 + e^eps)) tail.
  p = est._one_run_p_value(m=1000, guesses=100, correct=70, eps=1.0, delta=0.0)
  assert p == pytest.approx(stats.binom.sf(69, 100, math.exp(1) / (1 + math.exp(1))))


def test_one_run_bound_of_pure_randomised_response_is_below_its_epsilon():
  # Each canary's score is its membership bit flipped w.p. 1 / (1 + e^eps): randomised
  # response, exactly eps-DP per canary. The audit's bound must stay below eps and,
  # with many canaries, come close to it.
  rng = np.random.default_rng(6)
  eps, m = 2.0, 20_000
  included = rng.random(m) < 0.5
  keep = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
  scores = np.where(keep, included, ~included).astype(float) + 1e-6 * rng.random(m)
  b = est.one_run_epsilon(scores, included, 1e-6, confidence=0.95)
  assert b.epsilon <= eps
  assert b.epsilon > 0.8 * eps
  assert b.details["correct"] <= b.details["guesses"]


def test_gdp_epsilon_inverts_the_gaussian_privacy_curve():
  # mu-GDP is exactly the Gaussian mechanism with sigma = 1 / mu.
  for mu in (0.5, 1.0, 3.0):
    want = (
      dp_accounting.pld.PLDAccountant()
      .compose(dp_accounting.GaussianDpEvent(1.0 / mu))
      .get_epsilon(1e-5)
    )
    assert est.gdp_epsilon(mu, 1e-5) == pytest.approx(want, rel=2e-3)


def test_max_tpr_is_the_gaussian_trade_off_curve():
  # One Gaussian release at sigma: the best test has TPR = Phi(Phi^-1(FPR) + 1/sigma).
  ev = dp_accounting.GaussianDpEvent(1.0)
  for fpr in (1e-3, 1e-2, 0.1):
    want = stats.norm.cdf(stats.norm.ppf(fpr) + 1.0)
    got = est.max_tpr(ev, fpr)
    assert want <= got + 1e-9
    assert got == pytest.approx(want, rel=0.02)


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda: est.threshold_epsilon([1.0], [0.0, 1.0], 1e-5), "in scores: need at least 2"),
    (lambda: est.threshold_epsilon([1, 2], [0, float("nan")], 1e-5), "out scores must be finite"),
    (lambda: est.threshold_epsilon([1, 2], [0, 1], 2.0), "delta must be in (0, 1)"),
    (lambda: est.threshold_epsilon([1, 2], [0, 1], 1e-5, confidence=1.0), "confidence must be"),
    (lambda: est.threshold_epsilon([1, 2], [0, 1], 1e-5, strategy="x"), "strategy must be one of"),
    (lambda: est.one_run_epsilon([1, 2, 3], [1, 0], 1e-5), "one score per canary"),
    (lambda: est.one_run_epsilon([1, 2, 3], [1, 0, 1], 1e-5, guesses=[5]), "guesses must be"),
    (lambda: est.max_tpr(dp_accounting.GaussianDpEvent(1.0), 1.5), "fpr must be in [0, 1]"),
  ],
)
def test_bad_input_is_refused_with_one_line(call, message):
  with pytest.raises(
    ValueError,
    match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]"),
  ):
    call()


def test_the_same_bounds_as_jax_privacys_canary_score_auditor():
  # An independent implementation of the same theorems (optional: jax_privacy installed).
  auditing = pytest.importorskip("jax_privacy.auditing")
  rng = np.random.default_rng(7)
  m = 3000
  included = rng.random(m) < 0.5
  scores = rng.normal(size=m) + 1.5 * included
  inn, out = scores[included], scores[~included]
  for k in (100, 400):
    t = float(np.sort(scores)[::-1][k - 1])  # the k highest scores are guessed "in"
    ref = auditing.CanaryScoreAuditor(inn, out)
    explicit = auditing.Explicit(t)
    one_run = ref.epsilon_one_run(0.05, 1e-5, threshold_strategy=explicit)
    ours = est.one_run_epsilon(scores, included, 1e-5, confidence=0.95, guesses=[k], one_sided=True)
    assert ours.epsilon == pytest.approx(one_run, abs=1e-5)
    cp = ref.epsilon_clopper_pearson(0.05, 1e-5, one_sided=True, threshold_strategy=explicit)
    assert est.threshold_epsilon(inn, out, 1e-5, threshold=t).epsilon == pytest.approx(cp, abs=1e-9)
