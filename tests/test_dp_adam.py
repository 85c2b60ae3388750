"""DP-AdamBC (arXiv 2312.14334): Adam with the known noise variance removed from its 2nd moment."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax.methods import dp_adam
from dpjax.tasks import build_task
from dpjax.training.config import CONFIG_DIR, load_config
from dpjax.training.loop import prepare, train

CONFIG = os.path.join(CONFIG_DIR, "synthetic.py")


def _run(tx, grads):
  """Every update of `tx` over the gradients `[steps, ...]` (one scan): `[steps, ...]`."""
  grads = jnp.asarray(grads, jnp.float32)

  def step(state, g):
    u, state = tx.update(g, state)
    return state, u

  return np.asarray(jax.lax.scan(step, tx.init(grads[0]), grads)[1])


def test_without_noise_it_is_adam():
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(20, 5))
  ours = _run(dp_adam.dp_adam_bc(0.1, noise_variance=0.0, gamma=1e-30), grads)
  np.testing.assert_allclose(ours, _run(optax.adam(0.1, eps=0.0), grads), rtol=1e-5)


def test_the_correction_recovers_the_signal_to_noise_of_the_clean_gradient():
  # A constant gradient g under N(0, phi) noise: Adam's step shrinks to g / sqrt(g^2 + phi)
  # (DP-SGD-like), the corrected step returns to ~sign(g) = Adam's step without noise.
  g, phi, steps = 0.05, 1.0, 4000
  rng = np.random.default_rng(1)
  grads = [jnp.asarray(g + rng.normal(size=256) * np.sqrt(phi), jnp.float32) for _ in range(steps)]
  bc = np.mean(
    [np.asarray(u) for u in _run(dp_adam.scale_by_adam_bc(phi, gamma=1e-4), grads)[-500:]]
  )
  plain = np.mean([np.asarray(u) for u in _run(optax.scale_by_adam(eps=0.0), grads)[-500:]])
  assert plain == pytest.approx(g / np.sqrt(g * g + phi), rel=0.25)
  assert bc > 10 * plain


def test_the_plan_knows_the_variance_of_the_noise_it_adds():
  cfg = load_config(CONFIG)
  cfg.task.num_train, cfg.task.num_eval = 400, 100
  cfg.target_epsilon, cfg.noise_multiplier, cfg.l2_clip_norm = None, 1.3, 0.7
  task = build_task(cfg)
  _, plan, _ = prepare(cfg, task)
  want = (1.3 * 0.7 / plan.expected_batch_size) ** 2
  assert plan.noise_variance() == pytest.approx(want, rel=1e-12)
  # Empirically: the transform's noise on a zero sum, divided by the expected batch size.
  tx = plan.noise_transform(jax.random.PRNGKey(0))
  z, _ = tx.update(jnp.zeros(200_000), tx.init(None))
  assert float(jnp.var(z / plan.expected_batch_size)) == pytest.approx(want, rel=0.02)
  cfg.mechanism, cfg.l1_clip_norm = "laplace", 0.5
  _, lap, _ = prepare(cfg, task)
  tx = lap.noise_transform(jax.random.PRNGKey(1))
  z, _ = tx.update(jnp.zeros(200_000), tx.init(None))
  got = float(jnp.var(z / lap.expected_batch_size))
  assert lap.noise_variance() == pytest.approx(got, rel=0.03)


def test_optimizer_adam_bc_trains_a_private_run():
  cfg = load_config(CONFIG)
  cfg.task.num_train, cfg.task.num_eval = 400, 100
  cfg.steps, cfg.log_every = 5, 5
  cfg.target_epsilon, cfg.noise_multiplier = None, 1.0
  cfg.optimizer = "adam_bc"
  res = train(cfg, build_task(cfg), None, progress=False)
  assert np.isfinite(res.final_metrics["test_loss"])


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="noise_variance must be finite and >= 0"):
    dp_adam.scale_by_adam_bc(-1.0)
  with pytest.raises(ValueError, match="b2 must be in"):
    dp_adam.scale_by_adam_bc(0.1, b2=1.0)
