"""How to add an accountant: a new way to compose the releases, used by `dpjax.train`.

docs/howto-accountant.md shows this file as it is, so the page is what this test
runs. Nothing under dpjax/ names the accountant defined here.
"""

import dp_accounting
import pytest
from dp_accounting import pld

import dpjax
from dpjax.core.accounting import accountants, events
from dpjax.tasks import build_task
from dpjax.training.config import CONFIG_DIR, load_config


def coarse_pld(event):
  """dp-accounting's PLD accountant on a grid 10x wider than dpjax's: a looser upper bound."""
  return pld.PLDAccountant(
    dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-3
  )


@pytest.fixture
def registered():
  accountants.register("pld-coarse", coarse_pld)  # estimate=True for a non-bound
  yield "pld-coarse"
  accountants.unregister("pld-coarse")


def small(**overrides):
  cfg = load_config(f"{CONFIG_DIR}/synthetic.py")
  cfg.task.num_train, cfg.task.num_eval = 600, 100
  cfg.steps, cfg.batch_size, cfg.physical_batch_size = 6, 60, 32
  cfg.target_epsilon, cfg.noise_multiplier, cfg.noise_seed = None, 1.0, 7
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def train(cfg):
  return dpjax.train(cfg, build_task(cfg), None, progress=False)


def test_a_registered_accountant_reports_and_calibrates_a_run(registered):
  got = train(small(accountant="pld-coarse")).final_metrics["epsilon"]
  # What that accountant says of 6 Poisson-sampled Gaussian steps, composed by hand (dpjax
  # runs dp-accounting's FFTs on numpy's, which rounds ~1e-12 apart from scipy's).
  want = coarse_pld(None).compose(events.gaussian_step(1.0, 0.1), 6).get_epsilon(1e-5)
  assert got == pytest.approx(want, rel=1e-9)
  assert got >= train(small()).final_metrics["epsilon"]  # coarser: never below the default
  # A target epsilon is met by the noise it calibrates, as this accountant counts it.
  run = train(small(accountant="pld-coarse", target_epsilon=3.0, noise_multiplier=None))
  assert run.final_metrics["epsilon"] <= 3.0
  assert run.privacy["accountant"] == "pld-coarse" and run.privacy["upper_bound"]


def test_an_unregistered_accountant_is_one_line():
  with pytest.raises(ValueError, match=r"accountant must be one of 'pld', .*'nope'"):
    train(small(accountant="nope"))
