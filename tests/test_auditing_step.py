"""The white-box step audit: below the claim for honest mechanisms, above it for a lying one."""

from __future__ import annotations

import dataclasses
import os

import dp_accounting
import pytest

from dpjax.auditing import step_audit as sa
from dpjax.tasks import build_task
from dpjax.training import loop
from dpjax.training.config import CONFIG_DIR, load_config
from dpjax.training.plan import PrivacyPlan

CONFIGS = os.path.join(CONFIG_DIR)
TRIALS = 1_000_000


def _synthetic(**overrides):
  cfg = load_config(os.path.join(CONFIGS, "synthetic.py"))
  cfg.task.num_train = 200
  cfg.task.num_eval = 50
  cfg.steps = 1
  cfg.target_epsilon = None
  cfg.noise_multiplier = 1.0
  cfg.sampling_rate = 1.0
  cfg.physical_batch_size = 8
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


class HalfNoise(PrivacyPlan):
  """A mis-specified plan for the test: it adds half the noise its ledger claims."""

  def noise_transform(self, key):
    half = dataclasses.replace(self.mechanism, noise_multiplier=self.noise_multiplier / 2)
    honest = dataclasses.replace(PrivacyPlan(**_fields(self)), mechanism=half)
    return honest.noise_transform(key)


def _fields(plan):
  return {f.name: getattr(plan, f.name) for f in dataclasses.fields(PrivacyPlan)}


def _audit(cfg, lying=False, trials=TRIALS):
  task = build_task(cfg)
  spec, plan, _ = loop.prepare(cfg, task)
  if lying:
    plan = HalfNoise(**_fields(plan))
  return sa.audit_plan(spec, plan, trials=trials, seed=1)


# Laplace's bound converges fast (its privacy loss is +-1 on half the mass): fewer trials do.
@pytest.mark.parametrize("mechanism, trials", [("gaussian", TRIALS), ("laplace", 200_000)])
def test_one_release_audit_is_close_below_the_claim_and_catches_half_noise(mechanism, trials):
  cfg = _synthetic(mechanism=mechanism, l1_clip_norm=1.0)
  honest = _audit(cfg, trials=trials)
  exact = dp_accounting.pld.PLDAccountant().compose(
    dp_accounting.GaussianDpEvent(1.0)
    if mechanism == "gaussian"
    else dp_accounting.LaplaceDpEvent(1.0)
  )
  assert honest.claimed_epsilon == pytest.approx(exact.get_epsilon(1e-5), rel=1e-3)
  assert honest.lower.epsilon <= honest.claimed_epsilon
  assert honest.lower.epsilon >= 0.6 * honest.claimed_epsilon
  if mechanism == "gaussian":  # one Gaussian release at sigma 1 is exactly 1-GDP
    assert honest.gdp.mu_lower < 1.0 < honest.gdp.mu_upper
  lying = _audit(cfg, lying=True, trials=trials)
  assert lying.claimed_epsilon == honest.claimed_epsilon  # the ledger still says sigma = 1
  assert lying.lower.epsilon > lying.claimed_epsilon


@pytest.mark.parametrize(
  "name, overrides",
  [
    ("poisson q=0.3, ghost", dict(sampling_rate=0.3, clipping_method="ghost")),
    ("charged DP-SAM", dict(dp_sam={"rho": 0.05, "mode": "charged", "active_fraction": 1.0})),
    (
      "LMO, b revealed",
      dict(
        mechanism="lmo",
        l1_clip_norm=1.0,
        lmo={"a1": 0.0, "a3": 0.0, "a4": 1.0, "Ua": 0.5, "Ub": 1.5},
        accountant="pld",
      ),
    ),
  ],
)
def test_every_mechanism_audits_below_its_claim(name, overrides):
  r = _audit(_synthetic(**overrides), trials=50_000)
  assert 0.0 <= r.lower.epsilon <= r.claimed_epsilon, name
  if name == "charged DP-SAM":
    assert r.releases == 2


@pytest.mark.parametrize("sampling", ["els", "uls"])
def test_user_level_audit_is_below_the_user_level_claim(sampling):
  cfg = load_config(os.path.join(CONFIGS, "user_mean.py"))
  cfg.task.num_users = 40
  cfg.steps = 1
  cfg.target_epsilon = None
  cfg.noise_multiplier = 2.0  # with G = 2: a mixture PLD that composes in seconds
  cfg.user_sampling = sampling
  cfg.max_examples_per_user = 2
  cfg.sampling_rate = 0.5
  r = _audit(cfg, trials=50_000)
  assert r.unit == "user" and r.sampling == sampling
  assert 0.0 < r.lower.epsilon <= r.claimed_epsilon


def test_a_non_private_plan_is_refused():
  with pytest.raises(ValueError, match="nothing to audit"):
    _audit(
      _synthetic(private=False, batch_size=10, noise_multiplier=None, sampling_rate=None),
      trials=1000,
    )
