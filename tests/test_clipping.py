import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dpjax
from tests import models_tiny as mt


def loop_reference(loss_fn, params, batch, mask, clip, per_layer=False, ord_=2):
  """Per-example jax.grad, clip, sum: a Python loop, no vmap."""
  n = len(mask)
  total = jax.tree.map(jnp.zeros_like, params)
  for i in range(n):
    if mask[i] == 0:
      continue
    ex = jax.tree.map(lambda x: x[i], batch)
    g = jax.grad(loss_fn)(params, ex)
    if per_layer:
      g = {k: _clip(g[k], clip[k], ord_) for k in g}
    else:
      g = _clip(g, clip, ord_)
    total = jax.tree.map(jnp.add, total, g)
  return total


def _clip(tree, c, ord_):
  leaves = jax.tree.leaves(tree)
  if ord_ == 2:
    norm = math.sqrt(sum(float(jnp.sum(x**2)) for x in leaves))
  else:
    norm = sum(float(jnp.sum(jnp.abs(x))) for x in leaves)
  return jax.tree.map(lambda x: x * min(1.0, c / norm), tree)


def mlp_batch(n, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "x": jnp.asarray(rng.normal(size=(n, 5)) * 3, jnp.float32),
    "y": jnp.asarray(rng.integers(0, 3, n)),
  }


def seq_batch(n, seed=0):
  rng = np.random.default_rng(seed)
  return {"tokens": jnp.asarray(rng.integers(0, 11, (n, 6)))}


CASES = {
  "mlp": (mt.mlp_loss, mt.mlp_init, mlp_batch),
  "transformer": (mt.transformer_loss, mt.transformer_init, seq_batch),
}


@pytest.mark.parametrize("model", sorted(CASES))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("microbatch", [None, 3])
@pytest.mark.parametrize("per_layer", [False, True])
def test_matches_loop_reference(model, masked, microbatch, per_layer):
  loss_fn, init, make_batch = CASES[model]
  params = init(jax.random.PRNGKey(1))
  batch = make_batch(8)
  mask = np.ones(8, np.float32)
  if masked:
    mask[[1, 5, 6]] = 0
  if per_layer:
    clip = {k: 0.05 * (i + 1) for i, k in enumerate(sorted(params))}
  else:
    clip = 0.3
  grad_fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=clip, microbatch_size=microbatch)
  got, aux = jax.jit(grad_fn)(params, batch, mask=jnp.asarray(mask))
  want = loop_reference(loss_fn, params, batch, mask, clip, per_layer)
  mt.assert_trees_close(got, want, atol=1e-5, rtol=1e-5)
  assert int(aux.num_units) == int(mask.sum())
  # Clipping really happened (else the test would not test clipping).
  flat_norms = sum(jax.tree.leaves(aux.norms)) if per_layer else aux.norms
  assert float(jnp.max(flat_norms)) > 0.3


def test_l1_clipping_matches_loop():
  params = mt.mlp_init(jax.random.PRNGKey(0))
  batch = mlp_batch(6)
  mask = np.ones(6, np.float32)
  grad_fn = dpjax.clipped_grad(mt.mlp_loss, l1_clip_norm=0.7)
  got, _ = grad_fn(params, batch, mask=jnp.asarray(mask))
  mt.assert_trees_close(
    got, loop_reference(mt.mlp_loss, params, batch, mask, 0.7, ord_=1), atol=1e-5
  )
  assert grad_fn.sensitivity() == pytest.approx(0.7)


def test_masked_rows_contribute_exactly_zero():
  params = mt.mlp_init(jax.random.PRNGKey(0))
  batch = mlp_batch(4)
  grad_fn = dpjax.clipped_grad(mt.mlp_loss, l2_clip_norm=1.0)
  g, aux = grad_fn(params, batch, mask=jnp.zeros(4))
  for leaf in jax.tree.leaves(g):
    assert np.all(np.asarray(leaf) == 0.0)
  assert np.all(np.asarray(aux.norms) == 0.0)


def test_nan_safe_drops_bad_unit():
  params = mt.mlp_init(jax.random.PRNGKey(0))
  batch = mlp_batch(4)
  batch["x"] = batch["x"].at[2].set(jnp.nan)
  mask = jnp.ones(4)
  safe = dpjax.clipped_grad(mt.mlp_loss, l2_clip_norm=1.0)
  g, aux = safe(params, batch, mask=mask)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))
  assert int(aux.num_dropped) == 1 and int(aux.num_units) == 3
  want, _ = safe(params, batch, mask=mask.at[2].set(0))
  mt.assert_trees_close(g, want)
  unsafe = dpjax.clipped_grad(mt.mlp_loss, l2_clip_norm=1.0, nan_safe=False)
  g_bad, _ = unsafe(params, batch, mask=mask)
  assert not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g_bad))


def test_grouped_units_mean_then_clip():
  """A unit of G examples: loss is the group's mean; clipping is per group."""
  params = mt.mlp_init(jax.random.PRNGKey(0))
  flat = mlp_batch(12)
  groups = jax.tree.map(lambda x: x.reshape((4, 3) + x.shape[1:]), flat)

  def user_loss(p, unit):  # unit: [G, ...]
    return jnp.mean(jax.vmap(mt.mlp_loss, in_axes=(None, 0))(p, unit))

  got, aux = dpjax.clipped_grad(user_loss, l2_clip_norm=0.2)(params, groups)
  want = loop_reference(user_loss, params, groups, np.ones(4), 0.2)
  mt.assert_trees_close(got, want, atol=1e-6)
  assert aux.norms.shape == (4,)


def test_keep_batch_dim_and_has_aux():
  params = mt.mlp_init(jax.random.PRNGKey(0))
  batch = mlp_batch(5)

  def batched_loss(p, b):  # b: [1, ...]
    losses = jax.vmap(mt.mlp_loss, in_axes=(None, 0))(p, b)
    return jnp.sum(losses), {"n": b["x"].shape[0]}

  g1, aux = dpjax.clipped_grad(batched_loss, l2_clip_norm=0.5, keep_batch_dim=True, has_aux=True)(
    params, batch
  )
  g2, _ = dpjax.clipped_grad(mt.mlp_loss, l2_clip_norm=0.5)(params, batch)
  mt.assert_trees_close(g1, g2, atol=1e-6)
  np.testing.assert_array_equal(aux.loss_aux["n"], np.ones(5))
  np.testing.assert_allclose(
    aux.loss, jax.vmap(mt.mlp_loss, in_axes=(None, 0))(params, batch), rtol=1e-6
  )


def test_sensitivity_values_and_errors():
  f = dpjax.clipped_grad(mt.mlp_loss, l2_clip_norm={"dense": 3.0, "out": 4.0})
  assert f.sensitivity() == pytest.approx(5.0)
  assert f.sensitivity("replace_one") == pytest.approx(10.0)
  with pytest.raises(ValueError, match="relation"):
    f.sensitivity("zero_out_everything")
  with pytest.raises(ValueError, match="l2_clip_norm must be finite and > 0"):
    dpjax.clipped_grad(mt.mlp_loss, l2_clip_norm=-1.0)
  with pytest.raises(ValueError, match="exactly one"):
    dpjax.clipped_grad(mt.mlp_loss)
  with pytest.raises(ValueError, match="microbatch_size"):
    dpjax.clipped_grad(mt.mlp_loss, l2_clip_norm=1.0, microbatch_size=0)
  g = dpjax.clipped_grad(mt.mlp_loss, l2_clip_norm=1.0)
  with pytest.raises(ValueError, match="mask must have shape"):
    g(mt.mlp_init(jax.random.PRNGKey(0)), mlp_batch(4), mask=jnp.ones(3))


_PARAMS = mt.mlp_init(jax.random.PRNGKey(3))
_GRAD = jax.jit(dpjax.clipped_grad(mt.mlp_loss, l2_clip_norm=0.8))


@settings(max_examples=40, deadline=None)
@given(
  x=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=5, max_size=5),
  y=st.integers(0, 2),
  seed=st.integers(0, 10_000),
)
def test_adding_one_example_moves_sum_by_at_most_clip(x, y, seed):
  base = mlp_batch(6, seed)
  mask = jnp.asarray([1, 1, 1, 1, 1, 0], jnp.float32)
  added = {"x": base["x"].at[5].set(jnp.asarray(x, jnp.float32)), "y": base["y"].at[5].set(y)}
  g0, _ = _GRAD(_PARAMS, added, mask=mask)
  g1, _ = _GRAD(_PARAMS, added, mask=mask.at[5].set(1.0))
  diff = math.sqrt(
    sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
  )
  assert diff <= 0.8 * (1 + 1e-5)
