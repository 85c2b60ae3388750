"""BandMF: strategies, sensitivity, the streaming noise, its sampler and its epsilon.

References are independent of the code under test: dense numpy matrices
(inverse, products), brute force over participation patterns, dp-accounting's
own PLD composition, and the plain Gaussian transform's draws.
"""

import itertools
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import pld

from dpjax.core import matrix_factorization as mf
from dpjax.core import mechanisms
from dpjax.core.accounting import accountants, events
from dpjax.core.accounting.ledger import Ledger, Segment
from dpjax.core.sampling import CyclicPoissonSampler
from tests import models_tiny as mt


def test_full_band_sqrt_squares_to_the_prefix_sum_matrix():
  n = 9
  r = mf.sqrt_strategy(n)
  r = r / r[0]  # undo the unit-norm scaling: c_0 = 1
  R = mf.strategy_matrix(r, n)
  np.testing.assert_allclose(R @ R, np.tri(n), atol=1e-12)


@pytest.mark.parametrize("bands", [1, 2, 5])
def test_inverse_coefficients_invert_the_dense_strategy(bands):
  n = 12
  c = mf.sqrt_strategy(bands)
  d = mf.inverse_coefficients(c, n)
  np.testing.assert_allclose(mf.strategy_matrix(d, n), np.linalg.inv(mf.strategy_matrix(c, n)))


@pytest.mark.parametrize("bands,n", [(1, 16), (3, 16), (6, 40)])
def test_mean_error_is_the_dense_prefix_sum_error(bands, n):
  rng = np.random.default_rng(bands)
  for c in (mf.sqrt_strategy(bands), np.abs(rng.normal(size=bands)) + 0.1):
    C = mf.strategy_matrix(c, n)
    sens = np.max(np.linalg.norm(C, axis=0))
    dense = sens**2 * np.linalg.norm(np.tri(n) @ np.linalg.inv(C)) ** 2 / n
    assert mf.mean_error(c, n) == pytest.approx(dense, rel=1e-9)
  assert mf.mean_error([1.0], n) == pytest.approx((n + 1) / 2)


def test_optimal_strategy_beats_the_square_root_and_has_unit_norm():
  n = 64
  for bands in (2, 8):
    c = mf.optimal_strategy(bands, n)
    assert np.linalg.norm(c) == pytest.approx(1.0)
    assert mf.mean_error(c, n) < mf.mean_error(mf.sqrt_strategy(bands), n)
    assert mf.mean_error(c, n) < mf.mean_error([1.0], n)  # and DP-SGD
  np.testing.assert_array_equal(mf.optimal_strategy(1, n), [1.0])


def _brute_force_sensitivity(C, min_sep, k):
  """max ||C u|| over every pattern (<= k steps, pairwise >= min_sep apart) and sign vector u."""
  n = C.shape[0]
  best = 0.0
  for size in range(1, k + 1):
    for pattern in itertools.combinations(range(n), size):
      if any(b - a < min_sep for a, b in zip(pattern, pattern[1:])):
        continue
      cols = C[:, pattern]
      gram = cols.T @ cols
      # Disjoint supports: the Gram matrix is diagonal, so vector-valued
      # contributions of norm 1 cannot do better than the sign vectors below.
      np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-12)
      for signs in itertools.product((-1.0, 1.0), repeat=size):
        best = max(best, float(np.linalg.norm(cols @ np.array(signs))))
  return best


@pytest.mark.parametrize("bands,min_sep,k", [(1, 1, 3), (3, 3, 2), (3, 4, 3), (2, 5, 2)])
def test_sensitivity_equals_brute_force_over_participation_patterns(bands, min_sep, k):
  n = 10
  c = np.random.default_rng(bands).normal(size=bands) * 1.3  # any signs, not unit norm
  c[0] = abs(c[0]) + 0.1
  got = mf.sensitivity(c, n, min_separation=min_sep, max_participations=k)
  assert got == pytest.approx(_brute_force_sensitivity(mf.strategy_matrix(c, n), min_sep, k))
  assert mf.sensitivity(mf.sqrt_strategy(bands), n, bands, 1) == pytest.approx(1.0)


def test_sensitivity_refuses_overlapping_columns():
  with pytest.raises(ValueError, match="min_separation=2 < bands=3"):
    mf.sensitivity(mf.sqrt_strategy(3), 10, min_separation=2, max_participations=2)


def _bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_one_band_is_the_gaussian_transform_exactly():
  key = jax.random.key(3)
  g = {"a": jnp.ones((5, 3)), "b": jnp.arange(4.0)}
  plain, banded = (
    mechanisms.gaussian(0.9, 2.0, key),
    mechanisms.banded_gaussian(0.9, 2.0, key, [7.0]),
  )
  s1, s2 = plain.init(g), banded.init(g)
  assert _bytes(s2) == _bytes(s1)  # no history for one band
  for _ in range(3):
    o1, s1 = plain.update(g, s1)
    o2, s2 = banded.update(g, s2)
    mt.assert_trees_equal(o1, o2)


def test_history_costs_bands_minus_one_copies_of_the_params():
  g = {"a": jnp.ones((5, 3)), "b": jnp.arange(4.0)}
  one = mechanisms.gaussian(1.0, 1.0, jax.random.key(0)).init(g)
  four = mechanisms.banded_gaussian(1.0, 1.0, jax.random.key(0), mf.sqrt_strategy(4)).init(g)
  assert _bytes(four) - _bytes(one) == 3 * _bytes(g)


@pytest.mark.parametrize("variant", mt.VARIANTS)
def test_streaming_noise_is_the_dense_inverse_times_the_gaussian_draws(variant):
  steps, key = 12, jax.random.key(11)
  coefs = mf.check_coefficients([1.0, -0.4, 0.3, 0.2])
  zeros = {"w": jnp.zeros((3, 2)), "v": jnp.zeros(5)}
  plain = mechanisms.gaussian(0.7, 1.5, key)
  banded = mechanisms.banded_gaussian(0.7, 1.5, key, coefs)
  Z, W, _ = mt.noise_streams(plain, banded, zeros, steps, variant)
  C = mf.strategy_matrix(coefs, steps)
  np.testing.assert_allclose(W, np.linalg.solve(C, Z), rtol=1e-4, atol=1e-5)


def _dp_accounting_epsilon(sigma, q, count, delta=1e-5):
  acc = pld.PLDAccountant(
    dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4
  )
  acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), count)
  return acc.get_epsilon(delta)


@pytest.mark.parametrize("steps,bands", [(40, 1), (40, 4), (41, 4), (40, 40)])
def test_bandmf_epsilon_is_dpsgd_over_ceil_steps_over_bands(steps, bands):
  sigma, q = 1.1, 0.2
  want = _dp_accounting_epsilon(sigma, q, math.ceil(steps / bands))
  got = accountants.epsilon(events.bandmf_event(sigma, q, steps, bands), 1e-5, "pld")
  assert got == pytest.approx(want, rel=1e-3)
  seg = Segment(
    mechanism="gaussian", noise_multiplier=sigma, sampling_rate=q, steps=steps, bands=bands
  )
  assert Ledger((seg,)).epsilon(1e-5, "pld") == pytest.approx(want, rel=1e-3)
  if bands == 1:
    dpsgd = accountants.epsilon(events.dpsgd_event(sigma, q, steps), 1e-5, "pld")
    assert got == dpsgd


def test_a_bandmf_segment_refuses_what_its_bound_does_not_cover():
  with pytest.raises(ValueError, match="bands=4 .*needs mechanism 'gaussian'"):
    Segment(mechanism="laplace", noise_multiplier=1.0, sampling_rate=0.1, steps=8, bands=4)
  with pytest.raises(ValueError, match="bands=4"):
    Segment(
      mechanism="gaussian",
      noise_multiplier=1.0,
      sampling_rate=0.1,
      steps=8,
      extra_releases=2,
      bands=4,
    )
  banded = Ledger(
    (Segment(mechanism="gaussian", noise_multiplier=1.0, sampling_rate=0.1, steps=8, bands=4),)
  )
  with pytest.raises(ValueError, match="cannot share a ledger"):
    banded.record(
      Segment(mechanism="gaussian", noise_multiplier=2.0, sampling_rate=0.1, steps=8, bands=4)
    )
  old = Segment.from_json({k: v for k, v in banded.segments[0].to_json().items() if k != "bands"})
  assert old.bands == 1  # ledgers written before BandMF load as DP-SGD


def test_cyclic_poisson_samples_each_unit_only_in_its_group_at_rate_q():
  n, bands, q, steps = 103, 4, 0.3, 800
  s = CyclicPoissonSampler(n, q, 16, seed=5, bands=bands)
  members = np.concatenate(s.groups)
  np.testing.assert_array_equal(np.sort(members), np.arange(n))  # a partition
  assert sum(len(g) for g in s.groups) == n  # sizes vary (test_sampling: binomial)
  seen = np.zeros((steps, n))
  for t in range(steps):
    idx = s.sample_indices(t)
    assert set(idx) <= set(s.groups[t % bands])
    seen[t, idx] = 1
  group_of = {int(u): g for g, units in enumerate(s.groups) for u in units}
  for u in range(n):  # every participation congruent to the unit's group: b apart
    assert set(np.nonzero(seen[:, u])[0] % bands) <= {group_of[u]}
  own = np.array([seen[group_of[u] :: bands, u].mean() for u in range(n)])
  rounds = steps // bands
  assert abs(own.mean() - q) < 4 * math.sqrt(q * (1 - q) / (rounds * n))
  assert s.expected_batch_size == pytest.approx(n * q / bands)
