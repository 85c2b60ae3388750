"""Automatic clipping (arXiv 2206.07136): C g / (||g|| + gamma) per unit, on both strategies."""

from __future__ import annotations

import os

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax.tasks import build_task
from dpjax.training.config import CONFIG_DIR, load_config
from dpjax.training.loop import prepare, train

CONFIG = os.path.join(CONFIG_DIR, "synthetic.py")


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x)))


MODEL = MLP()
PARAMS = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))["params"]


def loss_fn(params, ex):
  logits = MODEL.apply({"params": params}, ex["x"][None])[0]
  return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])


def _batch(scale, n=6, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "x": jnp.asarray(scale * rng.normal(size=(n, 5)), jnp.float32),
    "y": jnp.asarray(rng.integers(0, 3, n)),
  }


def _reference(batch, clip, gamma):
  """Per-example loop: sum of C g / (||g|| + gamma)."""
  total = None
  for i in range(len(batch["y"])):
    g = jax.grad(loss_fn)(PARAMS, jax.tree.map(lambda v: v[i], batch))
    scaled = jax.tree.map(lambda x: x * clip / (optax.global_norm(g) + gamma), g)
    total = scaled if total is None else jax.tree.map(jnp.add, total, scaled)
  return total


@pytest.mark.parametrize("method", ["vmap", "ghost"])
def test_automatic_clipping_is_the_normalised_sum(method):
  batch = _batch(3.0)
  fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=2.0, automatic=0.01, method=method)
  got, _ = jax.jit(fn)(PARAMS, batch)
  want = _reference(batch, 2.0, 0.01)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
  assert fn.sensitivity() == 2.0  # the bound of a clipped unit is kept


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(
  scale=st.floats(1e-4, 1e4), gamma=st.floats(1e-6, 10.0), clip=st.floats(0.1, 10.0)
)
def test_every_unit_contributes_less_than_the_clip_norm(scale, gamma, clip):
  batch = _batch(scale, n=1, seed=int(scale * 1000) % 97)
  fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=clip, automatic=gamma)
  got, _ = fn(PARAMS, batch)
  norm = float(optax.global_norm(got))
  raw = float(optax.global_norm(jax.grad(loss_fn)(PARAMS, jax.tree.map(lambda v: v[0], batch))))
  assert norm < clip * (1 + 1e-6)
  assert norm == pytest.approx(clip * raw / (raw + gamma), rel=1e-4)


def test_per_layer_automatic_clipping_bounds_each_group():
  clip = {"Dense_0": 1.0, "Dense_1": 0.5}
  fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=clip, automatic=1e-3)
  got, _ = fn(PARAMS, _batch(100.0, n=1))
  for name, c in clip.items():
    n = float(optax.global_norm(got[name]))
    assert c * 0.99 < n < c  # a large gradient is normalised to just under its group's bound


def test_the_config_key_reaches_the_plan_and_keeps_the_guarantee():
  cfg = load_config(CONFIG)
  cfg.task.num_train, cfg.task.num_eval = 400, 100
  cfg.target_epsilon, cfg.noise_multiplier = None, 1.0
  task = build_task(cfg)
  _, plain, _ = prepare(cfg, task)
  cfg.automatic_clipping = 0.01
  _, auto, _ = prepare(cfg, task)
  assert plain.grad_fn.automatic is None and auto.grad_fn.automatic == 0.01
  # The sensitivity, and with it the noise and the epsilon, are those of clipping at C.
  assert auto.grad_fn.sensitivity() == plain.grad_fn.sensitivity()
  assert auto.ledger_at(cfg.steps).epsilon(1e-5) == plain.ledger_at(cfg.steps).epsilon(1e-5)


def test_bad_stability_is_refused():
  with pytest.raises(ValueError, match="automatic"):
    dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0, automatic=0.0)
  cfg = load_config(CONFIG)
  cfg.automatic_clipping = -1.0
  with pytest.raises(ValueError, match="automatic_clipping"):
    train(cfg, build_task(cfg), None, progress=False)
