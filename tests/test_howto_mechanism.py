"""How to add a mechanism: a new kind of noise, trained, resumed and accounted by `dpjax.train`.

docs/howto-mechanism.md shows this file as it is, so the page is what this test
runs. Nothing under dpjax/ names the mechanism defined here.
"""

import dataclasses
import json
from typing import ClassVar

import dp_accounting
import jax
import numpy as np
import pytest
from dp_accounting import pld

import dpjax
from dpjax.core.accounting import events
from dpjax.tasks import build_task
from dpjax.training.config import CONFIG_DIR, load_config


@dataclasses.dataclass(frozen=True)
class DoubledGaussian(dpjax.mechanisms.Mechanism):
  """Gaussian noise of standard deviation 2 sigma C: another scale rule for one sigma.

  Formal guarantees:
    One update on a sum of L2 sensitivity C is `GaussianDpEvent(2 sigma)`.
  """

  name: ClassVar[str] = "doubled_gaussian"  # the config's `mechanism`, the ledger's
  noise_multiplier: float  # what a target epsilon calibrates

  def transform(self, key, sensitivity):  # an optax transform on the clipped sum
    return dpjax.mechanisms.gaussian(2 * self.noise_multiplier, sensitivity, key)

  def step_event(self, sampling_rate):  # one Poisson-sampled release, for the accountants
    return events.gaussian_step(2 * self.noise_multiplier, sampling_rate)

  def noise_variance(self, sensitivity):  # per coordinate of the noised sum (DP-AdamBC)
    return (2 * self.noise_multiplier * sensitivity) ** 2


@pytest.fixture
def doubled():
  dpjax.mechanisms.register(DoubledGaussian)
  yield DoubledGaussian
  dpjax.mechanisms.unregister(DoubledGaussian.name)


def small(**overrides):
  cfg = load_config(f"{CONFIG_DIR}/synthetic.py")
  cfg.task.num_train, cfg.task.num_eval = 600, 100
  cfg.steps, cfg.batch_size, cfg.physical_batch_size = 6, 60, 32
  cfg.target_epsilon, cfg.noise_multiplier, cfg.noise_seed = None, 1.0, 7
  cfg.log_every = cfg.checkpoint_every = 3
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def train(cfg, workdir=None, **kw):
  return dpjax.train(cfg, build_task(cfg), workdir and str(workdir), progress=False, **kw)


def pld_epsilon(sigma, q=60 / 600, steps=6, delta=1e-5):
  """dp-accounting's own PLD epsilon of `steps` Poisson-sampled Gaussian releases."""
  acc = pld.PLDAccountant(
    dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4
  )
  acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
  return acc.get_epsilon(delta)


def test_a_registered_mechanism_trains_resumes_and_is_accounted(doubled, tmp_path):
  cfg = small(mechanism="doubled_gaussian")
  train(cfg, tmp_path / "run", stop_at_step=3)
  resumed = train(cfg, tmp_path / "run")  # from the checkpoint at step 3
  # Its releases are Gaussian at 2 sigma: the epsilon dp-accounting gives them.
  assert resumed.final_metrics["epsilon"] == pytest.approx(pld_epsilon(2.0), rel=1e-9)
  record = json.load(open(tmp_path / "run" / "privacy.json"))
  assert [(s["mechanism"], s["steps"]) for s in record["ledger"]] == [("doubled_gaussian", 6)]
  # And its noise is: the same run with the Gaussian at 2 sigma draws the same noise.
  gaussian = train(small(noise_multiplier=2.0))
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(gaussian.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert gaussian.final_metrics["epsilon"] == resumed.final_metrics["epsilon"]


def test_a_registered_mechanism_is_calibrated_to_a_target(doubled):
  got = train(small(mechanism="doubled_gaussian", target_epsilon=4.0, noise_multiplier=None))
  want = train(small(target_epsilon=4.0, noise_multiplier=None))  # the Gaussian's sigma
  assert got.noise_multiplier == pytest.approx(want.noise_multiplier / 2, rel=1e-3)
  assert got.final_metrics["epsilon"] <= 4.0


def test_an_unregistered_mechanism_is_one_line():
  with pytest.raises(ValueError, match=r"mechanism must be one of 'gaussian', .*'nope'"):
    train(small(mechanism="nope"))
