"""DP-Flat: private SAM and its accounting, flatness probe, prefix removal, weight distillation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax.methods import flatness
from dpjax.models import adapters
from dpjax.models.decoder import Decoder, DecoderConfig
from dpjax.models.decoder import init_params as init_decoder


def _loss(params, ex):
  pred = jnp.tanh(ex["x"] @ params["w1"]) @ params["w2"] + params["b"]
  return jnp.mean((pred - ex["y"]) ** 2)


def _setup(seed=0, n=16):
  rng = np.random.default_rng(seed)
  params = {
    "w1": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
    "b": jnp.zeros(2, jnp.float32),
  }
  batch = {
    "x": jnp.asarray(rng.normal(size=(n, 5)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=(n, 2)), jnp.float32),
  }
  return params, batch


def _run(params, batches, sam=None):
  grad_fn = dpjax.clipped_grad(_loss, l2_clip_norm=1.0)
  noise = dpjax.mechanisms.gaussian(
    noise_multiplier=0.7, l2_sensitivity=1.0, key=jax.random.PRNGKey(3)
  )
  parts = [noise] + ([sam] if sam is not None else []) + [dpjax.normalize(16.0), optax.adam(0.05)]
  tx = optax.chain(*parts)
  state = tx.init(params)
  for batch in batches:
    at = sam.perturb(params, flatness.find_state(state)) if sam is not None else params
    g, _ = grad_fn(at, batch)
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_rho_zero_equals_plain_private_optimizer_exactly():
  params, _ = _setup()
  batches = [_setup(seed=s)[1] for s in range(1, 5)]
  plain, _ = _run(params, batches)
  with_sam, _ = _run(params, batches, flatness.dp_sam(0.0))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(with_sam)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... and a positive rho does change the trajectory (the test above can fail).
  moved, _ = _run(params, batches, flatness.dp_sam(0.05))
  assert (
    max(
      float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(moved))
    )
    > 1e-4
  )


def test_free_mode_perturbation_reads_only_released_values():
  params, _ = _setup()
  sam = flatness.dp_sam(0.1)
  _, state = _run(params, [_setup(seed=1)[1], _setup(seed=2)[1]], sam)
  sam_state = flatness.find_state(state)
  at = sam.perturb(params, sam_state)
  # The perturbation is a function of (params, last privatised gradient) only:
  # evaluating the next step on two different private batches does not move it.
  grad_fn = dpjax.clipped_grad(_loss, l2_clip_norm=1.0)
  for seed in (7, 8):
    g, _ = grad_fn(at, _setup(seed=seed)[1])
    again = sam.perturb(params, sam_state)
    for a, b in zip(jax.tree.leaves(at), jax.tree.leaves(again)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # It is exactly the layer-wise step along the released (noised) gradient.
  expect = flatness.perturbation(params, sam_state.direction, 0.1)
  for p, a, v in zip(jax.tree.leaves(params), jax.tree.leaves(at), jax.tree.leaves(expect)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(p + v), rtol=1e-6)
  # A different released gradient gives a different perturbation.
  other = sam_state._replace(direction=jax.tree.map(lambda d: -d, sam_state.direction))
  assert not np.allclose(np.asarray(sam.perturb(params, other)["w1"]), np.asarray(at["w1"]))


def test_layerwise_perturbation_norms_and_active_steps():
  params, _ = _setup()
  d = jax.tree.map(lambda p: jnp.ones_like(p) * 3.0, params)
  params["b"] = jnp.ones(2)
  v = flatness.perturbation(params, d, 0.2)
  for p, x in zip(jax.tree.leaves(params), jax.tree.leaves(v)):
    assert float(jnp.linalg.norm(x)) == pytest.approx(0.2 * float(jnp.linalg.norm(p)), rel=1e-5)
  g = flatness.perturbation(params, d, 0.2, layerwise=False)
  assert float(optax.global_norm(g)) == pytest.approx(0.2, rel=1e-5)
  zero = flatness.perturbation(params, jax.tree.map(jnp.zeros_like, params), 0.2)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(zero))
  sam = flatness.dp_sam(0.2, active_steps=1)
  st = flatness.SAMState(d, jnp.asarray(1, jnp.int32))  # past the active window
  np.testing.assert_array_equal(np.asarray(sam.perturb(params, st)["w1"]), np.asarray(params["w1"]))


def test_charged_mode_needs_a_direction_and_is_charged_twice():
  params, _ = _setup()
  sam = flatness.dp_sam(0.1, mode="charged")
  state = sam.init(params)
  with pytest.raises(ValueError, match="privatised ascent gradient"):
    sam.perturb(params, state)
  d = jax.tree.map(jnp.ones_like, params)
  np.testing.assert_allclose(
    np.asarray(sam.perturb(params, state, direction=d)["w1"]),
    np.asarray(params["w1"] + flatness.perturbation(params, d, 0.1)["w1"]),
  )
  with pytest.raises(ValueError, match="do not pass"):
    flatness.dp_sam(0.1).perturb(params, state, direction=d)
  assert flatness.releases(100, mode="free") == 100
  assert flatness.releases(100, mode=None) == 100
  assert flatness.releases(100, mode="charged") == 200
  assert flatness.releases(100, mode="charged", active_steps=50) == 150
  with pytest.raises(ValueError):
    flatness.dp_sam(-1.0)
  with pytest.raises(ValueError):
    flatness.dp_sam(0.1, mode="raw")


def test_flatness_probe_ranks_a_sharp_group_last():
  # loss = 100 * |a|^2 + |b|^2 around a non-zero point: group "a" is sharp.
  params = {"a": jnp.ones(3), "b": jnp.ones(3)}

  def loss(p):
    return 100.0 * jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 2)

  direction = {"a": jnp.ones(3), "b": jnp.ones(3)}
  curves = flatness.flatness_probe(
    loss,
    params,
    direction,
    [lambda n: n.startswith("a"), lambda n: n.startswith("b")],
    alphas=[0.0, 0.1, 0.2],
  )
  # Closed form: moving group g by alpha*||g|| along the unit direction.
  assert curves[0, 1] == pytest.approx(100 * 3 * 1.1**2 + 3, rel=1e-5)
  assert curves[1, 2] == pytest.approx(300 + 3 * 1.2**2, rel=1e-5)
  assert flatness.select_layers(curves, keep=1) == [False, True]
  assert flatness.select_layers(curves, keep=2) == [True, True]
  with pytest.raises(ValueError, match="matches no parameter"):
    flatness.flatness_probe(loss, params, direction, [lambda n: n == "c"], [0.0, 1.0])


def test_removed_prefix_equals_a_model_without_it_and_zeroing_does_not():
  cfg = DecoderConfig(
    family="llama",
    vocab_size=50,
    hidden_size=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    rope_theta=100.0,
  )
  params = init_decoder(cfg, jax.random.PRNGKey(0))
  model = Decoder(cfg)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 6)), jnp.int32)
  full = adapters.init_prefix(
    jax.random.PRNGKey(1), num_layers=3, num_tokens=4, num_kv_heads=2, head_dim=8, scale=1.0
  )
  keep = flatness.select_layers(np.array([[0, 5.0], [0, 0.1], [0, 9.0]]), keep=1)
  assert keep == [False, True, False]
  kept = adapters.select_prefix_layers(full, keep)
  only = {"layer_1": full["layer_1"]}
  a, _ = model.apply({"params": params}, ids, prefixes=adapters.prefix_layers(kept))
  b, _ = model.apply({"params": params}, ids, prefixes=adapters.prefix_layers(only))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Zeroed keys/values are NOT removal: the zero keys still take attention mass.
  zeroed = dict(kept, layer_0=jax.tree.map(jnp.zeros_like, full["layer_0"]))
  c, _ = model.apply({"params": params}, ids, prefixes=adapters.prefix_layers(zeroed))
  assert float(jnp.max(jnp.abs(c - a))) > 1e-4


def test_weight_anchor_term_is_clipped_with_each_example():
  params, batch = _setup()
  ref = jax.tree.map(lambda p: p + 0.5, params)
  loss = flatness.weight_anchor(_loss, ref, lam=0.01)
  ex = jax.tree.map(lambda x: x[0], batch)
  gap = float(
    jnp.sqrt(
      sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))
    )
  )
  assert float(loss(params, ex)) == pytest.approx(float(_loss(params, ex)) + 0.01 * gap, rel=1e-6)
  # Zero at the reference, with a finite (zero) gradient of the term there.
  at_ref = flatness.weight_anchor(lambda p, e: jnp.zeros(()), params, lam=0.01)
  g = jax.grad(at_ref)(params, ex)
  assert all(
    np.all(np.isfinite(np.asarray(x))) and not np.any(np.asarray(x)) for x in jax.tree.leaves(g)
  )
  # Inside clipped_grad the term is part of EACH unit's gradient: unclipped,
  # the batch sum holds n copies of the regulariser's gradient.
  grad_fn = dpjax.clipped_grad(loss, l2_clip_norm=1e6)
  base_fn = dpjax.clipped_grad(_loss, l2_clip_norm=1e6)
  n = batch["x"].shape[0]
  g_wd, _ = grad_fn(params, batch)
  g_base, _ = base_fn(params, batch)
  g_reg = jax.grad(
    lambda p: (
      0.01
      * jnp.sqrt(
        sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref)))
      )
    )
  )(params)
  for a, b, r in zip(jax.tree.leaves(g_wd), jax.tree.leaves(g_base), jax.tree.leaves(g_reg)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b + n * r), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError):
    flatness.weight_anchor(_loss, ref, lam=-1.0)
