"""BLT (buffered linear Toeplitz) noise: coefficients, sensitivity, strategy, streaming noise and
its epsilon, each against an independent computation (dense numpy matrices, brute force over
participation patterns, the Gaussian mechanism's closed-form privacy curve)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, stats

from dpjax.core import matrix_factorization as mf
from dpjax.core import mechanisms
from dpjax.core.accounting import accountants, events
from tests import models_tiny as mt


def _dense(coefs, n):
  c = np.zeros(n)
  c[: len(coefs)] = coefs[:n]
  return sum(v * np.eye(n, k=-j) for j, v in enumerate(c))


def test_coefficients_are_the_sum_of_geometric_sequences():
  d, s = [0.9, 0.3], [0.25, 0.5]
  c = mf.blt_coefficients(d, s, 6)
  want = [1.0] + [0.25 * 0.9 ** (k - 1) + 0.5 * 0.3 ** (k - 1) for k in range(1, 6)]
  np.testing.assert_allclose(c, want, rtol=1e-12)


@pytest.mark.parametrize(
  "decay,scale,match",
  [([1.0], [0.5], "decay < 1"), ([0.5], [-0.1], "scale >= 0"), ([0.5, 0.4], [0.6, 0.5], "<= 1")],
)
def test_parameters_outside_the_proved_case_are_refused(decay, scale, match):
  with pytest.raises(ValueError, match=match):
    mf.blt_coefficients(decay, scale, 5)


def _brute_force(C, min_sep, k):
  """max over patterns (<= k steps, >= min_sep apart) of sum_ij |G_ij|, G the patterns' Gram:
  an upper bound for contributions of norm <= 1 in any dimension, attained by equal ones when
  G >= 0 (checked)."""
  n = C.shape[0]
  best = 0.0
  for size in range(1, k + 1):
    for pattern in itertools.combinations(range(n), size):
      if any(b - a < min_sep for a, b in zip(pattern, pattern[1:])):
        continue
      gram = C[:, pattern].T @ C[:, pattern]
      assert np.all(gram >= -1e-12)
      best = max(best, float(np.sum(np.abs(gram))))
  return math.sqrt(best)


@pytest.mark.parametrize("min_sep,k", [(1, 1), (1, 3), (3, 2), (4, 3), (2, 9)])
def test_sensitivity_equals_brute_force_over_participation_patterns(min_sep, k):
  n = 11
  for d, s in (([0.8], [0.6]), ([0.95, 0.2], [0.3, 0.4]), ([0.5, 0.6, 0.99], [0.1, 0.2, 0.3])):
    c = mf.blt_coefficients(d, s, n)
    got = mf.toeplitz_sensitivity(c, n, min_sep, k)
    assert got == pytest.approx(_brute_force(_dense(c, n), min_sep, k), rel=1e-12)
  assert mf.toeplitz_sensitivity([1.0], n, 3, 2) == pytest.approx(math.sqrt(2))  # C = I


def test_sensitivity_refuses_coefficients_outside_the_theorem():
  with pytest.raises(ValueError, match="non-increasing"):
    mf.toeplitz_sensitivity([1.0, 0.2, 0.5], 6, 2, 2)
  with pytest.raises(ValueError, match="non-increasing"):
    mf.toeplitz_sensitivity([1.0, -0.2], 6, 2, 2)


def test_error_is_the_dense_prefix_sum_error_and_the_strategy_beats_the_identity():
  n, b, k = 24, 8, 3
  d, s = mf.blt_strategy(2, n, b, k, iterations=60)
  C = _dense(mf.blt_coefficients(d, s, n), n)
  sens = mf.toeplitz_sensitivity(mf.blt_coefficients(d, s, n), n, b, k)
  dense = sens**2 * np.linalg.norm(np.tri(n) @ np.linalg.inv(C)) ** 2 / n
  assert mf.blt_error(d, s, n, b, k) == pytest.approx(dense, rel=1e-9)
  identity = mf.blt_error([0.0, 0.0], [0.0, 0.0], n, b, k)
  assert identity == pytest.approx(k * (n + 1) / 2)
  assert mf.blt_error(d, s, n, b, k) < 0.6 * identity


@pytest.mark.parametrize("variant", mt.VARIANTS)
def test_streaming_noise_is_the_dense_inverse_times_the_gaussian_draws(variant):
  steps, key, d, s = 12, jax.random.key(5), [0.9, 0.4], [0.3, 0.2]
  zeros = {"w": jnp.zeros((3, 2)), "v": jnp.zeros(5)}
  plain = mechanisms.gaussian(0.7, 1.5, key)
  blt = mechanisms.blt_gaussian(0.7, 1.5, key, d, s)
  Z, W, sb = mt.noise_streams(plain, blt, zeros, steps, variant)
  C = _dense(mf.blt_coefficients(d, s, steps), steps)
  np.testing.assert_allclose(W, np.linalg.solve(C, Z), rtol=1e-4, atol=1e-5)
  assert sum(x.size for x in jax.tree.leaves(sb.buffers)) == 2 * 11  # m x params


def test_zero_scales_are_the_gaussian_transform_exactly():
  key, zeros = jax.random.key(3), jnp.zeros(4)
  a, b = mechanisms.gaussian(1.0, 2.0, key), mechanisms.blt_gaussian(1.0, 2.0, key, [0.5], [0.0])
  assert type(b.init(zeros)) is type(a.init(zeros))
  np.testing.assert_array_equal(
    a.update(zeros, a.init(zeros))[0], b.update(zeros, b.init(zeros))[0]
  )


def _gaussian_mechanism_epsilon(sigma, delta):
  """The exact (eps, delta) curve of one Gaussian mechanism (Balle & Wang 2018), solved for eps."""
  curve = lambda e: (
    stats.norm.cdf(0.5 / sigma - e * sigma) - math.exp(e) * stats.norm.cdf(-0.5 / sigma - e * sigma)
  )
  return optimize.brentq(lambda e: curve(e) - delta, 0.0, 100.0)


@pytest.mark.parametrize("sigma", [0.8, 1.5, 4.0])
def test_blt_event_is_one_gaussian_mechanism(sigma):
  got = accountants.epsilon(events.blt_event(sigma), 1e-5, "pld")
  assert got == pytest.approx(_gaussian_mechanism_epsilon(sigma, 1e-5), rel=2e-3)
  assert got >= _gaussian_mechanism_epsilon(sigma, 1e-5) * (1 - 1e-9)  # never below
