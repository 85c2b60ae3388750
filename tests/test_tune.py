"""`dpjax tune`: the best of K ~ TNB runs, the selection bound its epsilon, its record private."""

import json
import os
import stat

import dp_accounting
import pytest

from dpjax import cli
from dpjax.core.accounting import selection
from dpjax.models.model_card import model_card
from dpjax.pipelines import tune as tune_lib
from dpjax.training import loop
from dpjax.training.spec import SpecError

SETS = ["steps=4", "log_every=4", "checkpoint_every=4", "task.num_eval=200"]
GRID = ["learning_rate=1e-3,3e-2"]


def _fixed_draws(k, order):
  return lambda eta, gamma, n: (k, list(order))


def _mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
  """A finished tuning of 2 runs on the synthetic task (draws fixed: K = 2, candidates 1, 0)."""
  workdir = str(tmp_path_factory.mktemp("tuning") / "tune")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(tune_lib, "_draws", _fixed_draws(2, [1, 0]))
    rec = tune_lib.tune(
      "configs/synthetic.py", GRID, (1.0, 0.5), workdir, sets=SETS, progress=False
    )
  return workdir, rec


def test_the_tuning_meets_its_target_and_selects_the_best_run(tuned):
  workdir, rec = tuned
  assert [r["candidate"] for r in rec["runs"]] == [["learning_rate=3e-2"], ["learning_rate=1e-3"]]
  scores = [r["score"] for r in rec["runs"]]
  assert rec["selected"] == scores.index(max(scores))
  # The tuning's epsilon, recomputed from the event built here with dp-accounting's own
  # types: one run is 4 Poisson-sampled Gaussian steps at the recorded sigma and q.
  q, sigma = rec["sampling_rate"], rec["sigma"]
  assert q == pytest.approx(200 / 4000)
  one = dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 4
  )
  assert rec["epsilon"] == pytest.approx(selection.selection_epsilon(one, 1e-5, 1.0, 0.5))
  # Calibrated for the tuning: the target is met by the whole, within the calibration's 0.5 %,
  # and a single run alone (its own PLD epsilon) is well below it.
  assert 3.0 * 0.99 <= rec["epsilon"] <= 3.0
  pld = dp_accounting.pld.PLDAccountant().compose(one).get_epsilon(1e-5)
  assert all(r["epsilon"] == pytest.approx(pld, rel=1e-3) for r in rec["runs"])
  assert pld < 0.8 * rec["epsilon"]
  # Owner-only: the record (K, every run and score) and each run's mark.
  assert _mode(workdir) == 0o700 and _mode(os.path.join(workdir, "tuning.json")) == 0o600
  for i, r in enumerate(rec["runs"]):
    mark = json.load(open(os.path.join(r["dir"], "tuning.json")))
    assert mark["selected"] is (i == rec["selected"])
    assert _mode(os.path.join(r["dir"], "tuning.json")) == 0o600


@pytest.mark.parametrize(
  "grid,sets,msg",
  [
    (["batch_size=100,200"], SETS, "--grid batch_size: it changes sigma, q or the steps"),
    (["steps=4,8"], SETS, "--grid steps: it changes sigma, q or the steps"),
    (["learning_rate"], SETS, "--grid must be KEY=V1,V2,..."),
    (GRID, SETS + ["mechanism='laplace'", "l1_clip_norm=1.0"], "covers Gaussian DP-SGD"),
    (GRID, SETS + ["private=False"], "not private"),
    (GRID, SETS + ["learning_rate=-1"], "learning_rate"),
  ],
)
def test_bad_tuning_inputs_exit_2_with_one_line_and_no_files(tmp_path, capsys, grid, sets, msg):
  workdir = tmp_path / "tune"
  argv = ["tune", "configs/synthetic.py", "--workdir", str(workdir), "--no-progress"]
  argv += [a for g in grid for a in ("--grid", g)] + [a for s in sets for a in ("--set", s)]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert msg in err and len(err.splitlines()) == 1
  assert not workdir.exists()


def test_only_the_selected_run_is_released_with_the_tunings_epsilon(tuned):
  workdir, rec = tuned
  runs = [r["dir"] for r in rec["runs"]]
  privacy = json.load(open(os.path.join(runs[rec["selected"]], "privacy.json")))
  out = tune_lib.tuned_privacy(runs[rec["selected"]], privacy)
  assert out["epsilon"] == rec["epsilon"] > privacy["epsilon"]
  assert out["tuning"]["eta"] == 1.0 and out["ledger"] == privacy["ledger"]
  card = model_card(out, base="tiny", how="every weight", run_dir=runs[rec["selected"]])
  assert f"**({rec['epsilon']:.4g}, 1e-05)-differential privacy" in card
  assert "TNB(eta=1, gamma=0.5)" in card
  other = next(d for i, d in enumerate(runs) if i != rec["selected"])
  with pytest.raises(ValueError, match="selected another run"):
    tune_lib.tuned_privacy(other, privacy)
  mark = os.path.join(other, "tuning.json")
  json.dump({"selected": None, "tuning": workdir}, open(mark, "w"))
  with pytest.raises(ValueError, match="has not selected its run yet"):
    tune_lib.tuned_privacy(other, privacy)


@pytest.mark.slow
def test_a_rerun_resumes_without_redrawing_or_rerunning(tuned, monkeypatch):
  workdir, rec = tuned
  path = os.path.join(workdir, "tuning.json")
  calls = []
  real = loop.train

  def counted(*a, **k):
    calls.append(a[2])
    return real(*a, **k)

  monkeypatch.setattr(loop, "train", counted)
  monkeypatch.setattr(tune_lib, "_draws", lambda *a: pytest.fail("K was drawn again"))
  again = tune_lib.tune("configs/synthetic.py", GRID, (1.0, 0.5), workdir, sets=SETS)
  # (Last in this module: it reruns one of the shared tuning's runs.)
  assert calls == [] and again["epsilon"] == rec["epsilon"] and again["k"] == 2
  # Interrupted after the first run: the rerun runs the second, and only it.
  cut = json.load(open(path))
  cut["runs"] = cut["runs"][:1]
  with open(path, "w") as f:
    json.dump(cut, f)
  again = tune_lib.tune("configs/synthetic.py", GRID, (1.0, 0.5), workdir, sets=SETS)
  assert [os.path.basename(c) for c in calls] == ["run-2"]
  assert len(again["runs"]) == 2
  # Another tuning's arguments on this directory: refused, nothing run.
  with pytest.raises(SpecError, match="another tuning's"):
    tune_lib.tune("configs/synthetic.py", GRID, (1.0, 0.2), workdir, sets=SETS)
