"""Coarse-to-fine noise calibration: the exact curve certifies the result, whatever the coarse."""

import math

import numpy as np
import pytest
from dp_accounting import pld

from dpjax.core import accounting
from dpjax.core.accounting import calibrate as calibrate_lib
from dpjax.core.accounting.calibrate import UnreachableTarget, calibrate_scale


def _counted(f):
  calls = []

  def g(s):
    calls.append(s)
    return f(s)

  return g, calls


def _power_curve(c, p):
  return lambda s: c * s**-p


@pytest.mark.parametrize(
  "coarse_of",
  [
    lambda f: f,  # exact
    lambda f: lambda s: 1.05 * f(s),  # 5 % pessimistic
    lambda f: lambda s: 0.9 * f(s),  # 10 % optimistic
    lambda f: lambda s: f(1.3 * s),  # a shifted curve
    lambda f: lambda s: 3.0 * f(s) ** 0.5,  # another slope
    lambda f: lambda s: f(s) + 0.01 * math.sin(40 * s),  # not monotone
  ],
)
@pytest.mark.parametrize("target", [0.5, 3.0, 40.0])
def test_result_is_certified_by_the_exact_curve_whatever_the_coarse_one(coarse_of, target):
  exact = _power_curve(7.0, 1.7)
  f, calls = _counted(exact)
  s = calibrate_scale(f, target, 0.005, coarse=coarse_of(exact))
  want = (7.0 / target) ** (1 / 1.7)  # the closed-form root
  assert exact(s) <= target
  assert exact(s) >= target * 0.995
  assert want <= s <= want * 1.005
  assert len(calls) <= 24  # never worse than a bisection by much


def test_a_close_coarse_curve_needs_one_or_two_exact_evaluations():
  exact = _power_curve(7.0, 1.7)
  for coarse in (exact, lambda s: 1.02 * exact(s), lambda s: 0.98 * exact(s)):
    f, calls = _counted(exact)
    calibrate_scale(f, 3.0, 0.005, coarse=coarse)
    assert len(calls) <= 2
  f, calls = _counted(exact)
  calibrate_scale(f, 3.0, 0.005)  # the bisection alone
  assert len(calls) >= 6


def test_unreachable_and_no_noise_needed_as_without_coarse():
  with pytest.raises(UnreachableTarget):
    calibrate_scale(lambda s: 10.0, 3.0, coarse=lambda s: 10.0)
  with pytest.raises(UnreachableTarget):  # a coarse curve that lies cannot hide it
    calibrate_scale(lambda s: 10.0, 3.0, coarse=lambda s: 1.0 / s)
  assert calibrate_scale(lambda s: 0.0, 3.0, coarse=lambda s: 0.0) < 1e-3
  s = calibrate_scale(lambda s: 5.0 / s, 3.0, coarse=lambda s: math.inf)  # coarse useless
  assert 5.0 / s <= 3.0


@pytest.mark.parametrize(
  "q,steps,target",
  [(0.001, 10_000, 3.0), (0.01, 100_000, 3.0), (0.05, 100, 1.0), (0.2, 50, 8.0)],
)
def test_calibrated_sigma_certified_by_dp_accounting_pld(q, steps, target):
  """dp-accounting's own PLD accountant (1e-4 grid, not dpjax's memoised one) certifies it."""
  calibrate_lib._calibrated_noise.cache_clear()
  n = []
  real = calibrate_lib.epsilon_spent

  def spy(*a, **k):
    n.append(a[0])
    return real(*a, **k)

  calibrate_lib.epsilon_spent = spy
  try:
    sigma = accounting.calibrate_noise(target, 1e-5, q, steps)
  finally:
    calibrate_lib.epsilon_spent = real
  acc = pld.PLDAccountant(value_discretization_interval=1e-4)
  eps = acc.compose(accounting.dpsgd_event(sigma, q, steps)).get_epsilon(1e-5)
  assert target * 0.995 <= eps <= target
  assert len(n) <= 3  # exact PLD evaluations
  # and the same sigma as the bisection finds, to the tolerance
  plain = calibrate_scale(lambda s: real(s, q, steps, 1e-5), target)
  assert sigma == pytest.approx(plain, rel=0.01)


def test_coarse_pld_is_a_looser_upper_bound():
  for sigma, q, steps in [(0.6, 0.001, 10_000), (4.5, 0.01, 100_000), (1.0, 0.05, 100)]:
    event = accounting.dpsgd_event(sigma, q, steps)
    fine = accounting.epsilon(event, 1e-5)
    coarse = accounting.epsilon(event, 1e-5, coarse=True)
    assert fine <= coarse <= fine * 1.05
  rdp = accounting.dpsgd_event(1.0, 0.05, 100)
  assert accounting.epsilon(rdp, 1e-5, "rdp", coarse=True) == accounting.epsilon(rdp, 1e-5, "rdp")


def test_calibration_is_memoised_per_event_and_target():
  calibrate_lib._calibrated_noise.cache_clear()
  a = accounting.calibrate_noise(2.0, 1e-5, 0.02, 300)
  b = accounting.calibrate_noise(2.0, 1e-5, 0.02, 300)
  assert a == b
  assert calibrate_lib._calibrated_noise.cache_info().hits == 1
  assert accounting.calibrate_noise(2.5, 1e-5, 0.02, 300) < a


@pytest.mark.parametrize(
  "std,q,h",
  [
    (0.573, 0.001, 1e-4),
    (1.08, 0.05, 1e-4),
    (0.8, 0.3, 1e-3),
    (2.0, 0.999, 1e-4),
    (0.5, 1e-5, 1e-4),
    (10.0, 0.2, 1e-3),
  ],
)
def test_vectorised_sampled_gaussian_pld_equals_dp_accounting(std, q, h):
  """The faster build gives dp-accounting's own PLD, value for value."""
  from dp_accounting.pld import privacy_loss_distribution as pld_lib

  from dpjax.core.accounting import step_pld

  want = pld_lib.from_gaussian_mechanism(std, value_discretization_interval=h, sampling_prob=q)
  got = step_pld._sampled_gaussian_pld(std, q, h)
  for e in [-1.0, 0.0, 0.3, 1.0, 4.0]:
    assert got.get_delta_for_epsilon(e) == want.get_delta_for_epsilon(e)
  assert got.self_compose(50).get_epsilon_for_delta(1e-5) == (
    want.self_compose(50).get_epsilon_for_delta(1e-5)
  )


@pytest.mark.parametrize("q", [1e-4, 0.01, 0.3, 0.9])
@pytest.mark.parametrize("kind", ["ADD", "REMOVE"])
def test_vectorised_hockey_stick_equals_the_scalar_one_at_every_point(q, kind):
  """At random points and at the edges +-log(1 - q) and 0, array in == one point at a time."""
  from dp_accounting.pld import privacy_loss_mechanism as mech

  from dpjax.core.accounting import step_pld

  adjacency = getattr(mech.AdjacencyType, kind)
  loss = step_pld._SampledGaussianLoss(0.9, sampling_prob=q, adjacency_type=adjacency)
  ref = mech.GaussianPrivacyLoss(0.9, sampling_prob=q, adjacency_type=adjacency)
  edge = math.log(1 - q)
  rng = np.random.default_rng(0)
  eps = np.concatenate(
    [
      rng.uniform(-3, 6, 300),
      [0.0, edge, -edge, np.nextafter(edge, 0), np.nextafter(-edge, 0), edge * (1 + 1e-10)],
      [math.log1p(-q), -math.log1p(-q), 30.0, -30.0],
    ]
  )
  got = loss.get_delta_for_epsilon(eps)
  want = np.array([ref.get_delta_for_epsilon(float(e)) for e in eps])
  np.testing.assert_array_equal(got, want)
