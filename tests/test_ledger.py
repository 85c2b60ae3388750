"""The ledger's epsilon against dp-accounting and the mechanisms' own accountants."""

import dp_accounting
import pytest
from dp_accounting import pld

from dpjax.core.accounting import lmo, user_level
from dpjax.core.accounting.ledger import Ledger, Segment

DELTA = 1e-5


def gaussian(sigma, q, steps, **kw):
  return Segment(mechanism="gaussian", noise_multiplier=sigma, sampling_rate=q, steps=steps, **kw)


def test_segments_compose_like_dp_accounting():
  ledger = Ledger().record(gaussian(1.0, 0.1, 12)).record(gaussian(1.0, 0.1, 8))
  assert len(ledger.segments) == 1 and ledger.steps == 20  # same privacy: extended
  ledger = ledger.record(gaussian(1.6, 0.05, 30, extra_releases=5))
  assert len(ledger.segments) == 2 and ledger.releases == 55
  acc = pld.PLDAccountant(
    dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4
  )
  acc.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 20)
  acc.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.6)), 35)
  assert ledger.epsilon(DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
  back = Ledger.from_json(ledger.to_json())
  assert back == ledger and back.epsilon(DELTA) == ledger.epsilon(DELTA)
  assert Ledger().epsilon(DELTA) == 0.0


def test_els_and_lmo_segments_use_their_accountants():
  els = Segment(
    mechanism="gaussian",
    noise_multiplier=1.0,
    sampling_rate=0.05,
    unit="user",
    sampling="els",
    max_examples_per_user=3,
    steps=10,
  )
  assert Ledger((els,)).epsilon(DELTA) == pytest.approx(
    user_level.els_epsilon(1.0, 0.05, 10, 3, DELTA), rel=1e-9
  )
  p = dict(a1=0.3, a3=0.2, a4=0.5, theta=1.0, k=2.0, lam=1.0, Ua=1.0, Ub=2.0)
  one = Segment(mechanism="lmo", noise_multiplier=0.0, sampling_rate=0.1, steps=6, settings=p)
  assert Ledger((one,)).epsilon(DELTA) == lmo.lmo_epsilon(lmo.LMOParams(**p), 0.1, 6, DELTA)
  # Two LMO segments: composed on one grid, never below either part alone.
  two = Ledger(
    (one, Segment(mechanism="lmo", noise_multiplier=0.0, sampling_rate=0.05, steps=6, settings=p))
  )
  both = two.epsilon(DELTA)
  assert both > Ledger((one,)).epsilon(DELTA)
  assert both <= lmo.lmo_epsilon(lmo.LMOParams(**p), 0.1, 12, DELTA) * (1 + 1e-6)
  # A ledger written before the parameters were named `settings` reads the same.
  old = {k: v for k, v in one.to_json().items() if k != "settings"}
  assert Segment.from_json(dict(old, lmo=p)) == one


def test_bad_segments_are_refused():
  with pytest.raises(ValueError, match="noise_multiplier must be finite and > 0"):
    gaussian(0.0, 0.1, 3)
  with pytest.raises(ValueError, match="sampling_rate must be in"):
    gaussian(1.0, 1.5, 3)
  with pytest.raises(ValueError, match="unknown ledger segment fields"):
    Segment.from_json({**gaussian(1.0, 0.1, 3).to_json(), "sigma": 2})
