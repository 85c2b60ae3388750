"""`dpjax plan`: operating points whose sigmas are dp-accounting's own calibration.

Every sigma the planner prints is checked against an independent calibration:
dp-accounting's `calibrate_dp_mechanism` with its PLD accountant on the
Poisson-subsampled Gaussian composed T times, built here from dp-accounting's
own event classes (not dpjax's). The ranking key (TAN) is recomputed by hand.
"""

import json
import math

import dp_accounting
import pytest

from dpjax import cli
from dpjax.pipelines import planner

N = 8441  # the RT training split of the utility study


def _reference_sigma(eps, delta, q, steps):
  def event(sigma):
    step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    return dp_accounting.SelfComposedDpEvent(step, steps)

  return dp_accounting.calibrate_dp_mechanism(
    lambda: dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3),
    event,
    eps,
    delta,
    bracket_interval=dp_accounting.LowerEndpointAndGuess(0.05, 1.0),
    tol=1e-4,
  )


def _reference_epsilon(sigma, delta, q, steps):
  acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
  step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
  return acc.compose(step, steps).get_epsilon(delta)


def test_planned_sigmas_equal_dp_accountings_calibration():
  points = planner.plan_points(3.0, 1e-5, N, budget=40 * 256, batches=[256, 1024])
  assert {(p.batch, p.steps) for p in points} == {(256, 40)}  # 1024: 10 < 40 steps
  for p in points:
    ref = _reference_sigma(3.0, 1e-5, p.batch / N, p.steps)
    assert p.noise_multiplier == pytest.approx(ref, rel=0.01), (p, ref)
    # certified: dp-accounting's epsilon at the planned sigma meets the target
    assert _reference_epsilon(p.noise_multiplier, 1e-5, p.batch / N, p.steps) <= 3.0 * 1.001
    assert p.epsilon <= 3.0 and p.sampling_rate == p.batch / N
    assert p.tan == pytest.approx(p.noise_multiplier / (p.sampling_rate * math.sqrt(p.steps)))
    assert p.noise_batch_ratio == pytest.approx(p.noise_multiplier / p.batch)
    assert p.epochs == pytest.approx(p.steps * p.batch / N)
  assert [p.tan for p in points] == sorted(p.tan for p in points)  # smaller TAN first


def test_each_calibration_is_announced_before_it_runs():
  seen = []
  planner.plan_points(
    3.0, 1e-5, N, budget=2560, batches=[32, 64], progress=lambda *a: seen.append(a)
  )
  assert seen == [(1, 2, 32), (2, 2, 64)]


def test_the_default_grid_keeps_min_steps_and_a_criterion_reranks():
  assert planner.batch_grid(N, 2560, 40) == [16, 24, 32, 48, 64]
  assert planner.batch_grid(100, 10**6, 40) == [16, 24, 32, 48, 64, 96]  # never above N
  points = planner.plan_points(3.0, 1e-5, N, budget=2560)
  assert sorted(p.batch for p in points) == [16, 24, 32, 48, 64]
  assert all(p.steps == 2560 // p.batch >= 40 for p in points)
  # A criterion replaces TAN as the key: here, more steps first.
  by_steps = planner.plan_points(3.0, 1e-5, N, budget=2560, criterion=lambda p: -p.steps)
  assert [p.batch for p in by_steps] == [16, 24, 32, 48, 64]


def test_dpjax_plan_prints_a_certified_table(capsys):
  argv = ["plan", "--target-epsilon", "3", "--units", str(N), "--budget", "2560"]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out.splitlines()
  assert "certified by the pld accountant" in out[0] and "under 40 steps left out" in out[0]
  rows = [line.split() for line in out[2:]]
  assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5]
  assert all(float(r[-1]) <= 3.0 for r in rows)  # epsilon column
  assert cli.main(argv + ["--json", "--top", "2"]) == 0
  points = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert len(points) == 2 and points[0]["tan"] <= points[1]["tan"]
  # One fixed point, certified: the study's 40 x 256, the point checked against dp-accounting.
  fixed = ["plan", "--target-epsilon", "3", "--units", str(N), "--steps", "40", "--batch", "256"]
  assert cli.main(fixed + ["--json"]) == 0
  (p,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  (q,) = planner.plan_points(3.0, 1e-5, N, budget=40 * 256, batches=[256])
  assert (p["batch"], p["steps"], p["noise_multiplier"]) == (256, 40, q.noise_multiplier)


@pytest.mark.parametrize(
  "extra,msg",
  [
    (["--budget", "100"], "allows no batch >= 16 (each <= N = 8441) for 40 steps"),
    (["--budget", "0"], "the budget must be >= 1"),
    (["--budget", "10240", "--steps", "40", "--batch", "256"], "not both"),
    (["--steps", "40"], "give a budget of gradient evaluations, or steps and batch"),
    (["--steps", "40", "--batch", "9000"], "1 <= batch <= 8441 units"),
    (["--budget", "10240", "--accountant", "edgeworth"], "estimates epsilon"),
    (["--budget", "10240", "--accountant", "pdl"], "accountant must be one of"),
    (["--budget", "10240", "--delta", "2"], "delta"),
    (["--budget", "10240", "--tuning", "1"], "--tuning must be ETA,GAMMA"),
    (["--budget", "10240", "--min-steps", "0"], "--top and --min-steps must be >= 1"),
    (["--budget", "10240", "--batches", "64,x"], "--batches must be integers >= 1"),
    (["--budget", "10240", "--batches", "4096"], "allows none of the batches [4096]"),
    (["--budget", "10240", "--tuning=-2,0.1"], "eta must be a number > -1"),
  ],
)
def test_what_cannot_be_planned_is_one_line(extra, msg, capsys):
  argv = ["plan", "--target-epsilon", "3", "--units", str(N), *extra]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and msg in err[0], err


def test_a_tuned_plan_covers_the_best_of_k_runs():
  """With --tuning the epsilon is the selection's (test_selection checks that bound)."""
  from dpjax.core.accounting import events, selection

  (p,) = planner.plan_points(3.0, 1e-5, N, budget=10240, batches=[256], tuning=(1.0, 0.1))
  (one,) = planner.plan_points(3.0, 1e-5, N, budget=10240, batches=[256])
  assert p.expected_runs == pytest.approx(10.0) and one.expected_runs == 1.0
  assert p.noise_multiplier > one.noise_multiplier  # ten expected runs cost noise

  def tuned(sigma):
    return selection.selection_epsilon(events.dpsgd_event(sigma, 256 / N, 40), 1e-5, 1.0, 0.1)

  assert tuned(p.noise_multiplier) == pytest.approx(p.epsilon)
  assert 3.0 * 0.99 <= p.epsilon <= 3.0
  assert tuned(0.98 * p.noise_multiplier) > 3.0  # calibrated: a little less noise fails
  with pytest.raises(ValueError, match="gamma must be in"):
    planner.plan_points(3.0, 1e-5, N, budget=10240, tuning=(1.0, 0.0))


def test_a_fitted_model_ranks_the_points_and_flags_those_outside_its_grid(tmp_path, capsys):
  # loss = -log T: more steps predicted better; the grid covers T in [40, 60] only
  model = {
    "family": "toy",
    "target": "dev_loss",
    "coef": [0.0, 0.0, -1.0, 0.0, 0.0],
    "ratio_range": [1e-6, 1.0],
    "steps_range": [40, 60],
    "loo_rmse": 0.01,
    "constant_rmse": 0.02,
    "source": "a test",
    "learning_rate": "Adam 0.02",
  }
  path = tmp_path / "toy.json"
  path.write_text(json.dumps(model))
  argv = ["plan", "--target-epsilon", "3", "--units", str(N), "--budget", "2560"]
  assert cli.main(argv + ["--model", str(path)]) == 0
  out = capsys.readouterr().out.splitlines()
  assert "fitted toy model's predicted dev_loss" in out[0]
  assert out[-1].startswith("learning rate: Adam 0.02, the rate the model's grid ran at")
  rows = [line.split() for line in out[2:-1]]
  # inside the grid (T = 2560 / B in [40, 60]: B = 48 and 64) first, each part by -log T
  assert [int(r[1]) for r in rows] == [48, 64, 16, 24, 32]
  assert [r[-1] == "*" for r in rows] == [False, False, True, True, True]
  for r in rows:
    steps = int(r[2])
    predicted = float(r[9])
    assert predicted == pytest.approx(-math.log(steps), abs=1e-4)  # features @ coef by hand
  assert cli.main(argv + ["--model", str(tmp_path / "none.json")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "none.json': no such file" in err[0]
  (tmp_path / "bad.json").write_text(json.dumps({"family": "toy"}))
  assert cli.main(argv + ["--model", str(tmp_path / "bad.json")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "is not a utility model's JSON" in err[0]
