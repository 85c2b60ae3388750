"""Adaptive quantile clipping (arXiv 1905.03871): call-time bound, count, its noise, its cost.

References: a per-example loop for the clipped sums and counts, the
Mahalanobis norm of the joint release's worst shift for its noise
multiplier, dp-accounting's PLD for the run's epsilon.
"""

import json
import math
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpjax
from dpjax.core import mechanisms
from dpjax.training.spec import SpecError

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_plan import cfg_of, reference_epsilon, run  # noqa: E402


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(jnp.tanh(nn.Dense(8)(x)))[..., 0]


@pytest.mark.parametrize("method", ["vmap", "ghost"])
def test_call_time_clip_norm_and_unclipped_count_match_a_per_example_loop(method):
  model = _MLP()
  x = jax.random.normal(jax.random.key(0), (12, 5)) * jnp.linspace(0.1, 3.0, 12)[:, None]
  y = jnp.linspace(-1.0, 1.0, 12)
  params = model.init(jax.random.key(1), x)["params"]
  mask = jnp.ones(12).at[-2:].set(0.0)

  def loss(p, ex):
    return (model.apply({"params": p}, ex["x"][None])[0] - ex["y"]) ** 2

  grad_fn = dpjax.clipped_grad(loss, l2_clip_norm=100.0, method=method)
  for c in (0.05, 0.3, 2.0):
    got, aux = jax.jit(lambda c: grad_fn(params, {"x": x, "y": y}, mask=mask, clip_norm=c))(c)
    want, count = jax.tree.map(jnp.zeros_like, params), 0
    for i in range(10):  # the two masked rows never count
      g = jax.grad(loss)(params, {"x": x[i], "y": y[i]})
      norm = float(jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g))))
      want = jax.tree.map(lambda a, b: a + b * min(1.0, c / norm), want, g)
      count += norm <= c
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    assert int(aux.num_unclipped) == count
  assert 0 < count < 10  # the bounds above straddle the norms


def test_the_joint_release_is_one_gaussian_of_the_effective_multiplier():
  sigma_g, sigma_b, c = 0.9, 3.0, 0.7
  # Worst shift of (clipped sum, count): (C, 1/2); noise stds (sigma_g C, sigma_b).
  shift = np.array([c, 0.5])
  cov = np.diag([(sigma_g * c) ** 2, sigma_b**2])
  mu = math.sqrt(shift @ np.linalg.solve(cov, shift))
  eff = mechanisms.effective_noise_multiplier(sigma_g, sigma_b)
  assert eff == pytest.approx(1.0 / mu, rel=1e-12)
  assert mechanisms.gradient_noise_multiplier(eff, sigma_b) == pytest.approx(sigma_g, rel=1e-12)
  with pytest.raises(ValueError, match="must exceed noise_multiplier / 2"):
    mechanisms.gradient_noise_multiplier(1.0, 0.5)


def test_update_rule_and_noise_scales():
  kw = dict(initial_clip_norm=0.5, target_quantile=0.7, learning_rate=0.3, expected_batch_size=40.0)
  quiet = mechanisms.quantile_clipped_gaussian(0.8, 1e-9, jax.random.key(2), **kw)
  zeros = jnp.zeros(200_000)
  out, state = quiet.update(zeros, quiet.init(zeros), quantile_count=6.0)  # 26 of 40 unclipped
  want = 0.5 * math.exp(-0.3 * (6.0 / 40.0 + 0.5 - 0.7))
  assert float(state.clip_norm) == pytest.approx(want, rel=1e-6)
  assert float(jnp.std(out)) == pytest.approx(0.8 * 0.5, rel=0.01)  # sigma_g times this step's C
  out2, _ = quiet.update(zeros, state, quantile_count=6.0)
  assert float(jnp.std(out2)) == pytest.approx(0.8 * want, rel=0.01)  # the new C scales the noise

  noisy = mechanisms.quantile_clipped_gaussian(0.8, 4.0, jax.random.key(3), **kw)
  g = jnp.zeros(1)

  def next_log_c(key):
    tx = mechanisms.quantile_clipped_gaussian(0.8, 4.0, key, **kw)
    return jnp.log(tx.update(g, tx.init(g), quantile_count=6.0)[1].clip_norm)

  logs = jax.vmap(next_log_c)(jax.random.split(jax.random.key(4), 20_000))
  # log C' = log C - eta (b~ / B + 1/2 - gamma): its std is eta sigma_b / B.
  assert float(jnp.std(logs)) == pytest.approx(0.3 * 4.0 / 40.0, rel=0.03)
  assert float(jnp.mean(logs)) == pytest.approx(math.log(want), abs=5e-4)
  del noisy
  with pytest.raises(ValueError, match="needs quantile_count"):
    quiet.update(zeros, quiet.init(zeros))


def test_a_run_charges_the_count_and_moves_the_clip_norm_to_the_quantile(tmp_path):
  adaptive = {"target_quantile": 0.5, "learning_rate": 0.5}
  res = run(
    cfg_of(adaptive_clipping=adaptive, l2_clip_norm=1e-3, steps=8, log_every=2), tmp_path / "w"
  )
  q, sigma_b = 0.1, 60 / 20  # 60 expected of 600; the default count noise B / 20
  want = reference_epsilon([(1.0, q, 8)])  # the accounted sigma is the joint one, 1.0
  assert res.final_metrics["epsilon"] == pytest.approx(want, rel=1e-9)
  sigma_g = (1.0 - (2 * sigma_b) ** -2) ** -0.5
  assert (
    reference_epsilon([(sigma_g, q, 8)]) < want
  )  # counting the gradient alone would under-report
  rows = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
  assert rows[0]["gradient_noise_multiplier"] == pytest.approx(sigma_g, rel=1e-12)
  by_step = {r["step"]: r["clip_norm"] for r in rows if "clip_norm" in r}
  norms = [by_step[k] for k in sorted(by_step)]
  assert norms[0] > 1e-3 and all(b > a for a, b in zip(norms, norms[1:]))  # every unit clipped: up
  seg = json.load(open(tmp_path / "w" / "privacy.json"))["ledger"][0]
  assert seg["origin"]["adaptive_clipping"]["count_noise"] is None  # as configured
  assert seg["noise_multiplier"] == 1.0

  high = run(cfg_of(adaptive_clipping=adaptive, l2_clip_norm=1e3, steps=4, log_every=1))
  assert high.final_metrics["clip_norm"] < 1e3 * math.exp(-0.5 * 0.4 * 3)  # none clipped: down


@pytest.mark.parametrize(
  "overrides,match",
  [
    (dict(adaptive_clipping={"quantile": 0.5}), "unknown 'quantile'"),
    (dict(adaptive_clipping={"target_quantile": 1.0}), r"target_quantile must be in \(0, 1\)"),
    (dict(adaptive_clipping={}, automatic_clipping=0.01), "no clip norm to adapt"),
    (dict(adaptive_clipping={}, mf_bands=2), "correlated noise"),
    (dict(adaptive_clipping={}, mf_strategy="blt"), "correlated noise"),
    (dict(adaptive_clipping={"count_noise": 0.4}), "count_noise.*must exceed"),
  ],
)
def test_bad_settings_are_refused(overrides, match):
  with pytest.raises(SpecError, match=match):
    run(cfg_of(**overrides))
