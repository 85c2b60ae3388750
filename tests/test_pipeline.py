"""A private step on an 8-device CPU mesh equals the same step on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax.data.pipeline import make_mesh, replicate, shard_batch


def _loss(params, ex):
  h = jnp.tanh(ex["x"] @ params["w1"])
  return -jax.nn.log_softmax(h @ params["w2"])[ex["y"]]


def _run(mesh, steps=3, key=42):
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32) / 3,
            "w2": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32) / 3}
  grad_fn = dpjax.clipped_grad(_loss, l2_clip_norm=0.5)
  tx = optax.chain(dpjax.mechanisms.gaussian(1.0, 0.5, jax.random.PRNGKey(key)),
                   dpjax.normalize(16.0), optax.adam(0.05))
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
