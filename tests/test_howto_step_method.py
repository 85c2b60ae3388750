"""How to add a step-level method: an optax transform chained after the noise.

docs/howto-step-method.md shows this file as it is, so the page is what this test
runs: the private step written with dpjax's public parts, a new method in it.
"""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting import pld

import dpjax

SIGMA, CLIP, Q, STEPS, N = 1.0, 1.0, 0.05, 100, 2000


def centralized() -> optax.GradientTransformation:
  """Gradient centralisation: each weight matrix's gradient less its mean over the inputs.

  It reads only the released (noised) gradient, so it is post-processing: the
  run's epsilon is the noise's, whatever it does.
  """

  def update(updates, state, params=None):
    del params
    center = lambda g: g - g.mean(axis=0, keepdims=True) if g.ndim > 1 else g
    return jax.tree.map(center, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def data(seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, N)
  direction = np.array([1.0, -1.0, 0, 0, 0, 0, 0, 0])  # the classes differ along it
  x = rng.normal(size=(N, 8)) + 1.5 * (2 * y[:, None] - 1) * direction
  return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}


def loss_fn(params, ex):  # ONE example
  logits = ex["x"] @ params["w"] + params["b"]
  return jnp.mean(jnp.logaddexp(0.0, logits) - ex["y"][None] * logits)


def private_optimizer(key):
  """noise (once, on the clipped sum) -> normalize -> the new method -> the optimizer."""
  return optax.chain(
    dpjax.mechanisms.gaussian(SIGMA, CLIP, key),
    dpjax.normalize(Q * N),
    centralized(),
    optax.sgd(0.5),
  )


def test_a_step_level_method_is_a_transform_after_the_noise():
  train, key = data(), jax.random.key(0)
  params = {"w": jnp.zeros((8, 2)), "b": jnp.zeros(2)}
  grad_fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP)
  tx = private_optimizer(key)
  state, rng = tx.init(params), np.random.default_rng(1)

  @jax.jit
  def step(params, state, mask):
    gsum, _ = grad_fn(params, train, mask=mask)  # every example, Poisson-masked
    updates, state = tx.update(gsum, state, params)
    return optax.apply_updates(params, updates), state, gsum

  before = float(jnp.mean(jax.vmap(loss_fn, (None, 0))(params, train)))
  for _ in range(STEPS):
    mask = jnp.asarray(rng.random(N) < Q, jnp.float32)  # Poisson sampling at rate Q
    old_params, old_state = params, state
    params, state, gsum = step(params, state, mask)
  after = float(jnp.mean(jax.vmap(loss_fn, (None, 0))(params, train)))
  assert after < before - 0.05  # it trains

  # The method saw the released gradient only: the last update is the noise's
  # output (the Gaussian alone, from the same state), normalized, centralized.
  noise = dpjax.mechanisms.gaussian(SIGMA, CLIP, key)
  released, _ = noise.update(gsum, old_state[0])
  mean = jax.tree.map(lambda g: g / (Q * N), released)
  want = jax.tree.map(lambda p, g: p - 0.5 * g, old_params, centralized().update(mean, None)[0])
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

  # And the run's epsilon is the noise's: STEPS Poisson-sampled Gaussian releases.
  eps = dpjax.accounting.epsilon(dpjax.accounting.dpsgd_event(SIGMA, Q, STEPS), 1e-5)
  acc = pld.PLDAccountant(
    dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4
  )
  acc.compose(dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(SIGMA)), STEPS)
  assert eps == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
