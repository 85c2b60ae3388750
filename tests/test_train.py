import json
import os

import jax
import numpy as np
import pytest

from dpjax import accounting
from dpjax.config import load_config
from dpjax.tasks import build_task
from dpjax.train import train

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic.py")


def small_config(**overrides):
  cfg = load_config(CONFIG)
  cfg.task.num_train = 600
  cfg.task.num_eval = 200
  cfg.steps = 12
  cfg.batch_size = 60
  cfg.physical_batch_size = 32  # forces multi-batch (accumulated) steps
  cfg.noise_multiplier = 1.0
  cfg.log_every = 3
  cfg.checkpoint_every = 3
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def test_resume_is_bit_identical_and_keeps_budget(tmp_path):
  cfg = small_config()
  task = build_task(cfg)
  full = train(cfg, task, str(tmp_path / "full"), progress=False)
  part = tmp_path / "part"
  first = train(cfg, task, str(part), progress=False, stop_at_step=6)
  assert first.final_metrics["step"] == 6
  resumed = train(cfg, task, str(part), progress=False)
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The resumed run reports the budget of all 12 steps, not 6.
  want = accounting.epsilon(accounting.dpsgd_event(1.0, 60 / 600, 12), 1e-5)
  assert resumed.final_metrics["epsilon"] == pytest.approx(want, rel=1e-9)
  recs = [json.loads(l) for l in open(part / "metrics.jsonl")]
  starts = [r for r in recs if r.get("event") == "start"]
  assert [s["resumed_from"] for s in starts] == [0, 6]
  assert {"config.json", "metrics.jsonl", "curves.png", "checkpoints"} <= set(os.listdir(part))


def test_resuming_under_another_config_is_refused(tmp_path):
  cfg = small_config()
  task = build_task(cfg)
  train(cfg, task, str(tmp_path), progress=False, stop_at_step=3)
  with pytest.raises(ValueError, match=r"different config \(learning_rate: "):
    train(small_config(learning_rate=cfg.learning_rate * 2), task, str(tmp_path), progress=False)
  # Logging cadence may change on resume.
  res = train(small_config(log_every=4), task, str(tmp_path), progress=False)
  assert res.final_metrics["step"] == 12


def test_interrupted_run_differs_without_restore(tmp_path):
  """Control for the test above: noise really depends on the restored key."""
  cfg = small_config()
  task = build_task(cfg)
  a = train(cfg, task, None, progress=False)
  b = train(small_config(seed=1), task, None, progress=False)
  assert not np.array_equal(np.asarray(a.params["head"]["w"]), np.asarray(b.params["head"]["w"]))


def test_private_run_learns_and_reports_epsilon():
  cfg = small_config(steps=40, noise_multiplier=None, target_epsilon=4.0)
  result = train(cfg, build_task(cfg), None, progress=False)
  assert result.final_metrics["test_accuracy"] > 0.6  # 4 classes: chance is 0.25
  assert result.final_metrics["epsilon"] <= 4.0


def test_nonprivate_baseline_runs():
  cfg = small_config(private=False)
  result = train(cfg, build_task(cfg), None, progress=False)
  assert result.final_metrics["epsilon"] == float("inf")
  assert result.final_metrics["test_accuracy"] > 0.6


def test_config_override_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config file not found"):
    load_config(str(tmp_path / "nope.py"))
  with pytest.raises(ValueError, match="unknown config key"):
    load_config(CONFIG, ["no_such_key=1"])
  assert load_config(CONFIG, ["steps=7"]).steps == 7


def test_every_shipped_config_loads():
  import glob
  paths = glob.glob(os.path.join(os.path.dirname(CONFIG), "*.py"))
  assert len(paths) >= 3
  for p in paths:
    cfg = load_config(p)
    assert cfg.steps >= 1 and cfg.task.name


def test_edgeworth_run_reports_pld_epsilon_beside_the_estimate():
  cfg = small_config(steps=6, noise_multiplier=None, target_epsilon=4.0, accountant="edgeworth")
  with pytest.warns(UserWarning, match="estimate"):
    res = train(cfg, build_task(cfg), None, progress=False)
  m = res.final_metrics
  est = m["epsilon_edgeworth_estimate"]
  assert est <= 4.0
  # "epsilon" is the PLD upper bound for the noise the estimate chose.
  with pytest.warns(UserWarning):
    used = accounting.calibrate_noise(4.0, cfg.delta, 60 / 600, 6, accountant="edgeworth")
  want = accounting.epsilon(accounting.dpsgd_event(used, 60 / 600, 6), cfg.delta, "pld")
  assert m["epsilon"] == pytest.approx(want, rel=1e-9)
