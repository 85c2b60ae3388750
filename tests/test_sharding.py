"""A private step on an 8-device CPU mesh equals the same step on one device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax.training.sharding import make_mesh, param_sharding, replicate, shard_batch, shard_params


def _loss(params, ex):
  h = jnp.tanh(ex["x"] @ params["w1"])
  return -jax.nn.log_softmax(h @ params["w2"])[ex["y"]]


def _run(mesh, steps=3, key=42):
  rng = np.random.default_rng(0)
  params = {
    "w1": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32) / 3,
    "w2": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32) / 3,
  }
  grad_fn = dpjax.clipped_grad(_loss, l2_clip_norm=0.5)
  tx = optax.chain(
    dpjax.mechanisms.gaussian(1.0, 0.5, jax.random.PRNGKey(key)),
    dpjax.normalize(16.0),
    optax.adam(0.05),
  )
  state = tx.init(params)

  def step(params, state, batch, mask):
    g, _ = grad_fn(params, batch, mask=mask)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  if mesh is not None:
    params, state = replicate(params, mesh), replicate(state, mesh)
  step = jax.jit(step)
  for t in range(steps):
    r = np.random.default_rng(t)
    batch = {"x": r.normal(size=(16, 6)).astype(np.float32), "y": r.integers(0, 3, 16)}
    mask = (r.random(16) < 0.8).astype(np.float32)
    if mesh is not None:
      batch, mask = shard_batch(batch, mesh), shard_batch(mask, mesh)
      assert len(batch["x"].sharding.device_set) == len(mesh.devices.flat)
    params, state = step(params, state, batch, mask)
  return params


def test_eight_devices_equal_one():
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set in conftest)")
  one = _run(None)
  eight = _run(make_mesh(jax.devices()[:8]))
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # Control: a different noise key gives different parameters.
  assert not np.allclose(np.asarray(one["w1"]), np.asarray(_run(None, key=7)["w1"]))


def test_indivisible_batch_is_a_clear_error():
  if jax.device_count() < 8:
    pytest.skip("needs 8 virtual devices")
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    shard_batch({"x": np.zeros((10, 2))}, make_mesh(jax.devices()[:8]))


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x)))


def _flax_run(mesh, method):
  model = _MLP()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 6)))["params"]

  def loss(p, ex):
    return -jax.nn.log_softmax(model.apply({"params": p}, ex["x"]))[ex["y"]]

  grad_fn = dpjax.clipped_grad(loss, l2_clip_norm=0.5, method=method)
  tx = optax.chain(
    dpjax.mechanisms.gaussian(1.0, 0.5, jax.random.PRNGKey(3)),
    dpjax.normalize(16.0),
    optax.adam(0.05),
  )
  state = tx.init(params)
  if mesh is not None:
    params, state = shard_params(params, mesh), shard_params(state, mesh)

  @jax.jit
  def step(params, state, batch):
    g, _ = grad_fn(params, batch)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  for t in range(3):
    r = np.random.default_rng(t)
    batch = {"x": r.normal(size=(16, 6)).astype(np.float32), "y": r.integers(0, 3, 16)}
    if mesh is not None:
      batch = shard_batch(batch, mesh)
    params, state = step(params, state, batch)
  return params


# The ghost path exercises more of the sharding (taps, book-keeping sums) by
# default; the vmap variant is opt-in (-m slow), as is train ULS on 4 x 2.
@pytest.mark.parametrize("method", [pytest.param("vmap", marks=pytest.mark.slow), "ghost"])
def test_data_by_model_mesh_equals_one_device(method):
  """A 4 x 2 ("data", "model") mesh, parameters split FSDP-style, gives one device's result."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 virtual devices")
  mesh = make_mesh(jax.devices()[:8], model=2)
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  one, split = _flax_run(None, method), _flax_run(mesh, method)
  assert any("model" in str(x.sharding.spec) for x in jax.tree.leaves(split))
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(split)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_param_sharding_replicates_what_does_not_divide():
  if jax.device_count() < 8:
    pytest.skip("needs 8 virtual devices")
  mesh = make_mesh(jax.devices()[:8], model=4)
  sh = param_sharding({"a": jnp.zeros((3, 5)), "b": jnp.zeros((6, 8)), "s": jnp.zeros(())}, mesh)
  assert sh["a"].spec == jax.sharding.PartitionSpec()
  assert sh["b"].spec == jax.sharding.PartitionSpec(None, "model")
  assert sh["s"].spec == jax.sharding.PartitionSpec()
  with pytest.raises(ValueError, match="must be >= 1 and divide"):
    make_mesh(jax.devices()[:8], model=3)
