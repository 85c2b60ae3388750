"""User-level accounting for ELS/ULS against example-level PLD, group privacy and brute force."""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld
from scipy import special, stats

from dpjax.core import accounting
from dpjax.core.accounting import user_level as U


def test_els_with_one_example_per_user_is_example_level():
  for sigma, q, steps in ((1.0, 0.01, 200), (0.7, 0.05, 20)):
    els = U.els_epsilon(sigma, q, steps, 1, 1e-5)
    # The same PLD accountant at the same discretisation, fed the example-level event.
    acc = pld.PLDAccountant(
      dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
      value_discretization_interval=U.MOG_DISCRETIZATION,
    )
    acc.compose(accounting.dpsgd_event(sigma, q, steps))
    assert els == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    ex = accounting.epsilon(accounting.dpsgd_event(sigma, q, steps), 1e-5, "pld")
    assert els == pytest.approx(ex, rel=2e-3)  # dpjax's default (finer) discretisation


def _brute_force_epsilon(sigma, q, G, steps, delta, h=2e-3):
  """A LOWER bound on ELS epsilon: losses rounded down on a fine grid, composed by convolution."""
  probs = stats.binom.pmf(np.arange(G + 1), G, q)
  x = np.linspace(-14 * sigma, G + 14 * sigma, 400_001)
  dx = x[1] - x[0]
  logp = stats.norm.logpdf(x, scale=sigma)
  logm = special.logsumexp(
    stats.norm.logpdf(x[:, None], loc=np.arange(G + 1), scale=sigma), b=probs, axis=1
  )
  deltas = []
  for num, loss in ((logm, logm - logp), (logp, logp - logm)):  # remove, add
    w = np.exp(num) * dx
    k = np.floor(loss / h).astype(np.int64)  # round DOWN: optimistic
    lo = k.min()
    pmf = np.bincount(k - lo, weights=w)
    total, off = pmf, lo
    for _ in range(steps - 1):
      total, off = np.convolve(total, pmf), off + lo
    vals = (np.arange(len(total)) + off) * h
    deltas.append(lambda e, t=total, v=vals: float(np.sum(t * np.maximum(0.0, 1 - np.exp(e - v)))))
  f = lambda e: max(d(e) for d in deltas) - delta
  if f(0.0) <= 0:
    return 0.0
  hi = 1.0
  while f(hi) > 0:
    hi *= 2
  lo = 0.0
  for _ in range(50):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
  return lo


@pytest.mark.parametrize("sigma,q,G,steps", [(0.8, 0.2, 3, 1), (1.0, 0.1, 3, 3), (1.5, 0.3, 2, 4)])
def test_els_between_brute_force_and_group_privacy(sigma, q, G, steps):
  delta = 1e-4
  els = U.els_epsilon(sigma, q, steps, G, delta)
  brute = _brute_force_epsilon(sigma, q, G, steps, delta)
  group = U.group_privacy_epsilon(sigma, q, steps, G, delta)
  assert brute <= els <= group, (brute, els, group)
  assert els <= brute * 1.02 + 1e-3  # and tight: PLD is close to the truth


def test_sampled_gaussian_rdp_is_the_renyi_divergence_of_the_mixture():
  # Brute force: D_alpha((1-q) N(0,s^2) + q N(1,s^2) || N(0,s^2)) by numerical integration.
  x = np.linspace(-40, 41, 800_001)
  dx = x[1] - x[0]
  for sigma, q, a in ((1.0, 0.05, 4), (2.0, 0.3, 7), (0.8, 1.0, 3)):
    l0 = stats.norm.logpdf(x, 0, sigma)
    l1 = (
      np.logaddexp(math.log1p(-q) + l0, math.log(q) + stats.norm.logpdf(x, 1, sigma))
      if q < 1
      else stats.norm.logpdf(x, 1, sigma)
    )
    brute = special.logsumexp(a * l1 + (1 - a) * l0 + math.log(dx)) / (a - 1)
    assert U.sampled_gaussian_rdp(sigma, q, a) == pytest.approx(brute, rel=1e-6)


def test_rdp_group_bound_is_dp_accountings_rdp_for_one_example():
  acc = dp_accounting.rdp.RdpAccountant(orders=list(U.RDP_GROUP_ORDERS))
  acc.compose(accounting.dpsgd_event(1.0, 0.05, 100))
  assert U.rdp_group_epsilon(1.0, 0.05, 100, 1, 1e-5) == pytest.approx(
    acc.get_epsilon(1e-5), rel=1e-9
  )


@pytest.mark.parametrize(
  "G", [4, pytest.param(2, marks=pytest.mark.slow), pytest.param(8, marks=pytest.mark.slow)]
)
def test_group_privacy_is_finite_and_above_the_tight_user_level_bounds(G):
  sigma, q, steps, delta = 1.0, 0.05, 100, 1e-5
  group = U.group_privacy_epsilon(sigma, q, steps, G, delta)
  assert math.isfinite(group)
  assert group >= U.els_epsilon(sigma, q, steps, G, delta)
  # Without sampling a group of G examples is exactly the Gaussian with shift G.
  exact = accounting.epsilon(accounting.dpsgd_event(sigma * 4 / G, 1.0, 1), delta)
  assert U.rdp_group_epsilon(sigma * 4, 1.0, 1, G, delta) >= exact


def test_els_grows_with_G_and_uls_is_the_user_level_gaussian():
  eps = [U.els_epsilon(1.0, 0.05, 20, G, 1e-5) for G in (1, 2, 4)]
  assert eps[0] < eps[1] < eps[2]
  assert U.uls_event(1.0, 0.05, 20) == accounting.dpsgd_event(1.0, 0.05, 20)


def test_bad_group_size_is_a_clear_error():
  with pytest.raises(ValueError, match="G must be an integer >= 1, got 0"):
    U.els_event(1.0, 0.1, 10, 0)


def test_per_user_clipping_on_uls_batches_matches_a_loop():
  """ULS batch [users, G] -> mean over each user's real examples, then clip per user."""
  import jax.numpy as jnp

  import dpjax
  from dpjax.core.sampling import ULSSampler, bound_contributions

  rng = np.random.default_rng(0)
  ids = rng.integers(0, 12, 90)
  x = rng.normal(size=(90, 5)).astype(np.float32)
  y = rng.normal(size=90).astype(np.float32)
  idx = bound_contributions(ids, 4, seed=0)
  (b, *_) = ULSSampler(idx, 0.5, physical_users=12, seed=0).batches(0)
  w = jnp.asarray(rng.normal(size=5), jnp.float32)

  def user_loss(w, unit):  # unit: the user's [G, ...] rows and their mask
    per = (unit["x"] @ w - unit["y"]) ** 2
    return jnp.sum(per * unit["m"]) / jnp.maximum(jnp.sum(unit["m"]), 1.0)

  batch = {"x": x[b.indices], "y": y[b.indices], "m": b.example_mask}
  total, aux = dpjax.clipped_grad(user_loss, l2_clip_norm=0.3)(w, batch, mask=b.mask)
  ref = np.zeros(5)
  for u in range(12):
    if b.mask[u] == 0:
      continue
    rows = b.indices[u][b.example_mask[u] > 0]
    g = np.mean([2 * (x[i] @ np.asarray(w) - y[i]) * x[i] for i in rows], axis=0)
    ref += g * min(1.0, 0.3 / np.linalg.norm(g))
  np.testing.assert_allclose(np.asarray(total), ref, rtol=1e-5, atol=1e-6)
  assert int(aux.num_units) == int(b.mask.sum()) > 0


@pytest.mark.slow  # the ELS-vs-group-privacy ordering runs by default (brute-force test)
def test_group_size_tradeoff_rows():
  counts = np.array([1, 2, 3, 8, 20])
  rows = U.group_size_tradeoff(counts, [1, 3], 1.0, 2.0, 5, 1e-5)
  assert [r["examples_kept"] for r in rows] == [5, 1 + 2 + 3 + 3 + 3]
  assert rows[0]["sampling_rate"] == pytest.approx(2 / 5)
  assert rows[0]["epsilon_els"] == pytest.approx(
    accounting.epsilon(accounting.dpsgd_event(1.0, 0.4, 5), 1e-5), rel=2e-3
  )
  for r in rows:
    assert r["epsilon_els"] <= r["epsilon_group"] * (1 + 1e-3)  # coarser discretisation at G=1
  with pytest.raises(ValueError, match="sampling_rate"):
    U.group_size_tradeoff(counts, [1], 1.0, 10.0, 5, 1e-5)  # 10 expected of 5 kept
