import math
import os

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from scipy import stats

from dpjax.core import accounting


def _dp_accounting_eps(event, delta, kind):
  acc = (
    pld.PLDAccountant(value_discretization_interval=1e-4) if kind == "pld" else rdp.RdpAccountant()
  )
  return acc.compose(event).get_epsilon(delta)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
@pytest.mark.parametrize("sigma,q,steps", [(1.0, 0.01, 500), (0.7, 0.05, 100), (2.0, 1.0, 10)])
def test_epsilon_equals_dp_accounting(kind, sigma, q, steps):
  inner = dp_accounting.GaussianDpEvent(sigma)
  step = inner if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, inner)
  want = _dp_accounting_eps(dp_accounting.SelfComposedDpEvent(step, steps), 1e-5, kind)
  got = accounting.epsilon(accounting.dpsgd_event(sigma, q, steps), 1e-5, accountant=kind)
  assert got == pytest.approx(want, rel=1e-9)


def test_unsampled_gaussian_matches_closed_form():
  """q = 1: T steps of sigma compose to one Gaussian with sigma/sqrt(T) (Balle & Wang 2018)."""
  sigma, steps, eps = 3.0, 4, 1.0
  mu = math.sqrt(steps) / sigma
  exact = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
  got = accounting.delta(accounting.dpsgd_event(sigma, 1.0, steps), eps, accountant="pld")
  assert exact <= got <= exact * 1.01  # pessimistic PLD: an upper bound, and tight


def test_laplace_unsampled_is_one_over_multiplier():
  got = accounting.epsilon(accounting.dpsgd_event(2.0, 1.0, 3, mechanism="laplace"), 1e-9, "pld")
  assert got <= 3 * 0.5 + 1e-3  # basic composition bounds it
  assert got > 0.5


def test_composed_phases_equal_sum_of_parts_in_rdp():
  a = accounting.dpsgd_event(1.0, 0.02, 100)
  b = accounting.dpsgd_event(2.0, 0.02, 300)
  both = accounting.epsilon(accounting.compose([a, b]), 1e-5, "pld")
  want = pld.PLDAccountant(value_discretization_interval=1e-4).compose(a).compose(b)
  assert both == pytest.approx(want.get_epsilon(1e-5), rel=1e-9)


def test_fixed_batch_uses_replace_one_rdp():
  ev = accounting.fixed_batch_event(1.0, dataset_size=1000, batch_size=10, steps=100)
  want = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  assert accounting.epsilon(ev, 1e-5, "rdp") == pytest.approx(
    want.compose(ev).get_epsilon(1e-5), rel=1e-9
  )
  with pytest.raises(ValueError, match="PLD accountant does not support"):
    accounting.epsilon(ev, 1e-5, "pld")


@pytest.mark.parametrize("kind", ["pld", "rdp"])
@pytest.mark.parametrize("target", [1.0, 3.0, pytest.param(8.0, marks=pytest.mark.slow)])
def test_calibrate_noise_round_trips(kind, target):
  q, steps, delta = 0.02, 200, 1e-5
  sigma = accounting.calibrate_noise(target, delta, q, steps, accountant=kind)
  eps = accounting.epsilon(accounting.dpsgd_event(sigma, q, steps), delta, kind)
  assert target * 0.99 <= eps <= target


def test_epsilon_spent_before_first_step_and_without_noise():
  assert accounting.epsilon_spent(1.0, 0.1, 0, 1e-5) == 0.0
  assert accounting.epsilon_spent(0.0, 0.1, 5, 1e-5) == math.inf


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(target_epsilon=0.0), "epsilon must be finite and > 0"),
    (dict(target_epsilon=-2.0), "epsilon must be finite and > 0"),
    (dict(delta=0.0), "delta must be in"),
    (dict(delta=1.0), "delta must be in"),
    (dict(sampling_rate=0.0), "sampling_rate must be in"),
    (dict(sampling_rate=1.5), "sampling_rate must be in"),
    (dict(steps=0), "steps must be an integer >= 1"),
  ],
)
def test_impossible_inputs_raise(kwargs, match):
  args = dict(target_epsilon=1.0, delta=1e-5, sampling_rate=0.01, steps=10)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    accounting.calibrate_noise(**args)


def test_unknown_accountant_and_bad_noise():
  with pytest.raises(ValueError, match="accountant must be one of"):
    accounting.epsilon(accounting.dpsgd_event(1.0, 0.1, 1), 1e-5, "moments")
  with pytest.raises(ValueError, match="noise_multiplier must be finite and > 0"):
    accounting.dpsgd_event(-1.0, 0.1, 1)


def test_step_pld_accountant_equals_dp_accounting_and_reuses_steps():
  """The memoised accountant composes what dp-accounting's PLDAccountant composes."""
  from dp_accounting.pld import pld_privacy_accountant

  from dpjax.core.accounting import step_pld

  parts = [
    dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.1)), 40
    ),
    dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(3.0), 7),
    dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.LaplaceDpEvent(2.0)), 5
    ),
    dp_accounting.LaplaceDpEvent(4.0),
    dp_accounting.NoOpDpEvent(),
  ]
  event = dp_accounting.ComposedDpEvent(parts)
  ref = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
  ref.compose(event)
  acc = step_pld.StepPLDAccountant(1e-4)
  assert acc.supports(event)
  acc.compose(event)
  for d in (1e-6, 1e-3):
    assert acc.get_epsilon(d) == pytest.approx(ref.get_epsilon(d), rel=1e-9)
  assert acc.get_delta(1.0) == pytest.approx(ref.get_delta(1.0), rel=1e-9)
  hits = step_pld._gaussian.cache_info().hits
  again = step_pld.StepPLDAccountant(1e-4)
  again.compose(event)
  assert step_pld._gaussian.cache_info().hits >= hits + 2  # both Gaussian steps reused
  assert again.get_epsilon(1e-6) == acc.get_epsilon(1e-6)
  assert not acc.supports(dp_accounting.RandomizedResponseDpEvent(0.5, 4))
  zero = step_pld.StepPLDAccountant()
  zero.compose(dp_accounting.GaussianDpEvent(0.0))
  assert zero.get_epsilon(1e-5) == math.inf


def _rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
def test_epsilon_at_a_new_step_count_each_log_row_keeps_no_memory():
  # A run logs epsilon at a new count every row; each composition's FFT has its own
  # length. scipy's FFT kept every length's plan: +100 MB over these 20 counts.
  event = lambda n: accounting.dpsgd_event(0.93, 0.0041, n)  # noqa: E731
  accounting.epsilon(event(4000), 1e-5)  # the largest working set, once
  before = _rss_mb()
  for n in range(110, 4110, 200):
    accounting.epsilon(event(n), 1e-5)
  assert _rss_mb() - before < 25
