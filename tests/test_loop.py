import json
import os
import re
import time

import jax
import numpy as np
import pytest

from dpjax.core import accounting
from dpjax.tasks import build_task
from dpjax.training import loop as loop_lib
from dpjax.training import tally as tally_lib
from dpjax.training.config import CONFIG_DIR, load_config
from dpjax.training.loop import train

CONFIG = os.path.join(CONFIG_DIR, "synthetic.py")


def small_config(**overrides):
  cfg = load_config(CONFIG)
  cfg.task.num_train = 600
  cfg.task.num_eval = 200
  cfg.steps = 12
  cfg.batch_size = 60
  cfg.physical_batch_size = 32  # forces multi-batch (accumulated) steps
  cfg.target_epsilon = None
  cfg.noise_multiplier = 1.0
  cfg.log_every = 3
  cfg.checkpoint_every = 3
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def test_resume_is_bit_identical_and_keeps_budget(tmp_path):
  cfg = small_config(noise_seed=7)  # the same noise in both runs
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
  assert {"config.json", "metrics.jsonl", "curves.png", "checkpoints", "privacy.json"} <= set(
    os.listdir(part)
  )
  # One row per logged step although steps 3-6 were written by both processes.
  steps = [r["step"] for r in recs if "event" not in r]
  assert steps == sorted(set(steps)) == [3, 6, 9, 12]


def test_resuming_under_another_config_is_refused(tmp_path):
  cfg = small_config()
  task = build_task(cfg)
  train(cfg, task, str(tmp_path), progress=False, stop_at_step=3)
  with pytest.raises(ValueError, match=r"different config \(learning_rate: "):
    train(small_config(learning_rate=cfg.learning_rate * 2), task, str(tmp_path), progress=False)
  # Logging cadence may change on resume.
  res = train(small_config(log_every=4), task, str(tmp_path), progress=False)
  assert res.final_metrics["step"] == 12


@pytest.mark.slow
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
  # 4 classes: chance is 0.25; over 10 noise seeds 0.61-0.70 (200 test rows, +-0.034)
  assert result.final_metrics["test_accuracy"] > 0.5
  assert result.final_metrics["epsilon"] <= 4.0
  # The sigma it reports is the one the accountant charges.
  assert accounting.epsilon_spent(result.noise_multiplier, 60 / 600, 40, 1e-5) == pytest.approx(
    result.final_metrics["epsilon"], rel=1e-9
  )


def test_nonprivate_baseline_runs():
  cfg = small_config(private=False, noise_multiplier=None)
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
  from dpjax.training.config import list_configs

  names = list_configs()
  assert len(names) >= 10
  for p in names:
    cfg = load_config(p)
    if "teacher" in cfg:  # a `dpjax distill` pipeline: its training stage
      assert cfg.total_epsilon > 0 and cfg.student.steps >= 1
      cfg = cfg.teacher
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


def user_config(sampling, **overrides):
  cfg = small_config(
    privacy_unit="user",
    user_sampling=sampling,
    max_examples_per_user=4,
    users_per_step=8,
    physical_batch_size=16,
    batch_size=40,
  )  # ELS: expected examples per step
  cfg.task.num_users = 40
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def test_user_level_runs_report_user_epsilon(tmp_path):
  from dpjax.core.accounting import user_level
  from dpjax.core.sampling import bound_contributions

  for sampling in ("els", "uls"):
    cfg = user_config(sampling, steps=4)
    task = build_task(cfg)
    res = train(cfg, task, str(tmp_path / sampling), progress=False)
    index = bound_contributions(task.user_ids, 4, cfg.seed)
    if sampling == "els":
      q = 40 / len(index.kept_examples())
      want = user_level.els_epsilon(1.0, q, 4, 4, 1e-5)
    else:
      q = 8 / len(index.users)
      want = accounting.epsilon(user_level.uls_event(1.0, q, 4), 1e-5)
    assert res.final_metrics["epsilon"] == pytest.approx(want, rel=1e-9)
    assert res.final_metrics["privacy_unit"] == "user"
    start = json.loads(open(tmp_path / sampling / "metrics.jsonl").readline())
    assert (start["privacy_unit"], start["user_sampling"], start["max_examples_per_user"]) == (
      "user",
      sampling,
      4,
    )
    assert np.isfinite(res.final_metrics["test_accuracy"])
  # The same noise at the same rate costs a user more under ELS with G = 4
  # than one example at example level.
  q_els = 40 / len(bound_contributions(task.user_ids, 4, cfg.seed).kept_examples())
  assert user_level.els_epsilon(1.0, q_els, 4, 4, 1e-5) > accounting.epsilon(
    accounting.dpsgd_event(1.0, q_els, 4), 1e-5
  )


@pytest.mark.slow
def test_user_level_calibration_meets_target():
  cfg = user_config(
    "els", noise_multiplier=None, target_epsilon=4.0, steps=3, max_examples_per_user=2
  )
  res = train(cfg, build_task(cfg), None, progress=False)
  assert 4.0 * 0.99 <= res.final_metrics["epsilon"] <= 4.0


def test_uls_on_eight_devices_equals_one():
  if jax.device_count() < 8:
    pytest.skip("needs 8 virtual devices (set in conftest)")
  cfg = user_config("uls", steps=3, noise_seed=1)
  task = build_task(cfg)
  one = train(cfg, task, None, progress=False)
  eight = train(
    user_config("uls", steps=3, data_devices=8, noise_seed=1), task, None, progress=False
  )
  fsdp = train(
    user_config(
      "uls", steps=3, data_devices=4, model_devices=2, clipping_method="ghost", noise_seed=1
    ),
    task,
    None,
    progress=False,
  )
  for a, b, c in zip(
    jax.tree.leaves(one.params), jax.tree.leaves(eight.params), jax.tree.leaves(fsdp.params)
  ):
    assert len(b.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)
  assert any("model" in str(x.sharding.spec) for x in jax.tree.leaves(fsdp.params))
  other = train(user_config("uls", steps=3, seed=1), task, None, progress=False)
  assert not np.allclose(np.asarray(one.params["head"]["w"]), np.asarray(other.params["head"]["w"]))


def test_ghost_clipping_method_trains_like_vmap():
  cfg = small_config(steps=3, noise_seed=3)
  task = build_task(cfg)
  vmap = train(cfg, task, None, progress=False)
  ghost = train(
    small_config(steps=3, clipping_method="ghost", noise_seed=3), task, None, progress=False
  )
  for a, b in zip(jax.tree.leaves(vmap.params), jax.tree.leaves(ghost.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="method must be"):
    train(small_config(steps=1, clipping_method="fast"), task, None, progress=False)


def test_user_level_bad_configs_are_clear_errors():
  cfg = user_config("els", accountant="rdp")
  with pytest.raises(
    ValueError, match="ELS accountant covers Gaussian noise with accountant='pld'"
  ):
    train(cfg, build_task(cfg), None, progress=False)
  cfg = user_config("both")
  with pytest.raises(ValueError, match="user_sampling must be one of 'els', 'uls', got 'both'"):
    train(cfg, build_task(cfg), None, progress=False)
  cfg = small_config(privacy_unit="user", user_sampling="uls", users_per_step=8)
  with pytest.raises(ValueError, match="needs a task with user_ids"):
    train(cfg, build_task(cfg), None, progress=False)
  cfg = user_config("uls", max_examples_per_user=0)
  with pytest.raises(ValueError, match="max_examples_per_user must be"):
    train(cfg, build_task(cfg), None, progress=False)


def test_lmo_is_one_config_change(tmp_path):
  from dpjax.core.accounting import lmo as L

  params = dict(a1=0.3, a3=0.2, a4=0.5, theta=1.0, k=2.0, lam=1.0, Ua=1.0, Ub=2.0)
  cfg = small_config(mechanism="lmo", lmo=params, l1_clip_norm=1.0, steps=6)
  res = train(cfg, build_task(cfg), str(tmp_path), progress=False)
  want = L.lmo_epsilon(L.LMOParams(**params), 60 / 600, 6, 1e-5)
  assert res.final_metrics["epsilon"] == pytest.approx(want, rel=1e-12)
  start = json.loads(open(tmp_path / "metrics.jsonl").readline())
  assert start["mechanism"] == {"name": "lmo", "noise_multiplier": 0.0, "settings": params}
  # L1 noise needs L1 clipping: refused without it, for Laplace as for LMO.
  for mech in ("lmo", "laplace"):
    cfg = small_config(mechanism=mech, lmo=params)
    with pytest.raises(ValueError, match="needs l1_clip_norm"):
      train(cfg, build_task(cfg), None, progress=False)


def test_dp_sam_in_training_charges_only_charged_mode(tmp_path):
  base = train(small_config(noise_seed=5), build_task(small_config()), None, progress=False)
  # rho = 0: the same run (to float rounding of another compiled graph; bit-exact
  # equality of the transform itself is tested in test_flatness).
  cfg = small_config(dp_sam=dict(rho=0.0), noise_seed=5)
  zero = train(cfg, build_task(cfg), None, progress=False)
  for a, b in zip(jax.tree.leaves(base.params), jax.tree.leaves(zero.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
  want = lambda steps: accounting.epsilon_spent(1.0, 60 / 600, steps, 1e-5, "pld", "gaussian")
  # Free mode: post-processing of released gradients, one release per step.
  cfg = small_config(dp_sam=dict(rho=0.05, mode="free"))
  free = train(cfg, build_task(cfg), None, progress=False)
  assert free.final_metrics["epsilon"] == pytest.approx(want(12), rel=1e-9)
  assert not np.allclose(
    np.asarray(jax.tree.leaves(free.params)[0]), np.asarray(jax.tree.leaves(base.params)[0])
  )
  # Charged mode: one more release in each of the first half (6) of the steps.
  cfg = small_config(dp_sam=dict(rho=0.05, mode="charged", active_fraction=0.5))
  charged = train(cfg, build_task(cfg), str(tmp_path), progress=False)
  assert charged.final_metrics["epsilon"] == pytest.approx(want(18), rel=1e-9)
  start = json.loads(open(tmp_path / "metrics.jsonl").readline())
  assert start["dp_sam"] == {"rho": 0.05, "mode": "charged", "active_steps": 6}
  assert start["releases"] == 18
  # A target epsilon is met with the extra releases counted.
  cfg = small_config(
    noise_multiplier=None, target_epsilon=2.0, dp_sam=dict(rho=0.05, mode="charged")
  )
  res = train(cfg, build_task(cfg), None, progress=False)
  assert 1.9 < res.final_metrics["epsilon"] <= 2.0
  for bad, msg in (
    (dict(rho=0.1, mode="raw"), "mode must be"),
    (dict(rho=0.1, active_fraction=2.0), "active_fraction"),
    (dict(mode="free"), "takes rho"),
  ):
    cfg = small_config(dp_sam=bad)
    with pytest.raises(ValueError, match=msg):
      train(cfg, build_task(cfg), None, progress=False)


def test_weight_anchor_config_adds_the_term_to_each_example(tmp_path):
  from dpjax.methods import flatness

  task = build_task(small_config())
  ref = jax.tree.map(lambda p: p + 1.0, task.params)
  path = str(tmp_path / "ref.npz")
  flatness.save_reference(ref, path)
  back = flatness.load_reference(path, task.params)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  from dpjax.training.task import with_weight_anchor

  cfg = small_config(weight_anchor=dict(lam=0.5, reference=path))
  wd = with_weight_anchor(cfg, task)
  ex = jax.tree.map(lambda x: x[0], task.train)
  gap = float(
    np.sqrt(
      sum(
        np.sum((np.asarray(a) - np.asarray(b)) ** 2)
        for a, b in zip(jax.tree.leaves(task.params), jax.tree.leaves(ref))
      )
    )
  )
  got = float(wd.loss_fn(task.params, ex, task.frozen)[0])
  assert got == pytest.approx(
    float(task.loss_fn(task.params, ex, task.frozen)[0]) + 0.5 * gap, rel=1e-5
  )
  res = train(cfg, task, None, progress=False)  # runs end to end, same accounting
  assert res.final_metrics["epsilon"] == pytest.approx(
    accounting.epsilon_spent(1.0, 60 / 600, 12, 1e-5), rel=1e-9
  )
  with pytest.raises(ValueError, match="does not match"):
    flatness.load_reference(path, {"other": task.params})
  with pytest.raises(FileNotFoundError):
    with_weight_anchor(
      small_config(weight_anchor=dict(lam=0.1, reference=str(tmp_path / "none.npz"))), task
    )


def test_learning_rates_per_parameter_group():
  import jax.numpy as jnp

  from dpjax.training.loop import make_optimizer

  params = {
    "layer_4": {"w": jnp.zeros(3)},
    "layer_45": {"w": jnp.zeros(2)},
    "classifier": {"w": jnp.zeros(2)},
  }
  grads = jax.tree.map(jnp.ones_like, params)
  tx = make_optimizer("adam", 0.01, learning_rates={"layer_": 1e-3, "layer_45": 1e-4})
  upd, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step moves every coordinate by (almost exactly) its learning rate
  np.testing.assert_allclose(upd["classifier"]["w"], -0.01, rtol=1e-5)
  np.testing.assert_allclose(upd["layer_4"]["w"], -1e-3, rtol=1e-5)
  np.testing.assert_allclose(upd["layer_45"]["w"], -1e-4, rtol=1e-5)  # longest prefix wins
  # a prefix named like an internal group label does not capture the other parameters
  tx = make_optimizer("adam", 0.01, learning_rates={"default": 1e-3})
  upd, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(upd["classifier"]["w"], -0.01, rtol=1e-5)
  with pytest.raises(ValueError, match="positive"):
    make_optimizer("adam", 0.01, learning_rates={"layer_": 0.0})


def test_bad_data_is_refused_before_any_file(tmp_path):
  from dpjax.training.spec import SpecError

  cfg = small_config(steps=2)
  task = build_task(cfg)
  x = task.train["x"].copy()
  x[17, 3] = np.nan
  with pytest.raises(SpecError, match=r"train row 17, 'x' holds nan"):
    train(cfg, task._replace(train=dict(task.train, x=x)), str(tmp_path / "a"), progress=False)
  labels = task.train["label"].copy()
  labels[5] = 7
  with pytest.raises(SpecError, match=r"train row 5 has label 7, outside \[0, 3\] \(4 classes\)"):
    train(
      cfg, task._replace(train=dict(task.train, label=labels)), str(tmp_path / "b"), progress=False
    )
  labels[5] = -1
  with pytest.raises(SpecError, match=r"label -1"):
    train(cfg, task._replace(train=dict(task.train, label=labels)), None, progress=False)
  empty = {k: v[:0] for k, v in task.splits["dev"].items()}
  with pytest.raises(SpecError, match="the dev split is empty"):
    train(cfg, task._replace(splits=dict(task.splits, dev=empty)), None, progress=False)
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_dropped_units_are_counted_warned_and_all_dropped_stops(tmp_path):
  import jax.numpy as jnp

  cfg = small_config(steps=3, log_every=1)
  task = build_task(cfg)

  def some_nan(params, ex, frozen):  # NaN for examples whose first feature is negative
    loss, m = task.loss_fn(params, ex, frozen)
    return loss + 0.0 * jnp.sqrt(ex["x"][0]), m

  with pytest.warns(UserWarning, match="had a non-finite loss or gradient and were dropped"):
    train(cfg, task._replace(loss_fn=some_nan), str(tmp_path / "w"), progress=False)
  rows = [json.loads(l) for l in open(tmp_path / "w" / "metrics.jsonl") if '"event"' not in l]
  neg = int(np.sum(task.train["x"][:, 0] < 0))
  assert all(r["dropped_units"] > 0 for r in rows) and neg > 0
  assert all(np.isfinite(r["train_loss"]) for r in rows)

  def all_nan(params, ex, frozen):
    loss, m = task.loss_fn(params, ex, frozen)
    return loss * jnp.nan, m

  from dpjax.training.tally import NonFiniteData

  with pytest.raises(NonFiniteData, match="every one of the .* sampled units"):
    train(cfg, task._replace(loss_fn=all_nan), None, progress=False)


def test_a_second_process_on_the_workdir_is_refused(tmp_path):
  import subprocess
  import sys

  from dpjax.training.rundir import RunLocked

  cfg = small_config(steps=2)
  task = build_task(cfg)
  w = tmp_path / "w"
  os.makedirs(w)
  hold = (
    "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
    "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); "
    "print('held', flush=True); time.sleep(60)"
  )
  holder = subprocess.Popen(
    [sys.executable, "-c", hold, str(w / ".lock")], stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLocked, match=f"in use by process {holder.pid}"):
      train(cfg, task, str(w), progress=False)
    assert sorted(os.listdir(w)) == [".lock"]  # nothing else written
  finally:
    holder.kill()
    holder.wait()
  # The holder is gone, so is its lock (whatever the file says): the run takes it and removes it.
  train(cfg, task, str(w), progress=False)
  assert not (w / ".lock").exists()
  # A lock file naming a live process that holds no lock (a PID reused after a reboot) is free.
  w2 = tmp_path / "w2"
  os.makedirs(w2)
  (w2 / ".lock").write_text(str(os.getppid()))
  train(cfg, task, str(w2), progress=False)
  # A directory where the lock file goes: one line, nothing written.
  w3 = tmp_path / "w3"
  os.makedirs(w3 / ".lock")
  with pytest.raises(RunLocked, match=r"\.lock is a directory, not a lock file"):
    train(cfg, task, str(w3), progress=False)
  assert os.listdir(w3) == [".lock"]


def test_the_lock_is_taken_before_the_workdir_is_read(tmp_path, monkeypatch):
  import threading

  from dpjax.training.rundir import RunLocked

  # B starts on a workdir that does not exist yet and prepares slowly; A, started meanwhile
  # on the same workdir, is refused (it can never finish there and have B overwrite it).
  w = tmp_path / "w"
  slow, release = threading.Event(), threading.Event()
  real = loop_lib.prepare

  def slow_prepare(*a, **k):
    slow.set()
    release.wait(60)
    return real(*a, **k)

  monkeypatch.setattr(loop_lib, "prepare", slow_prepare)
  b_cfg = small_config(steps=6, noise_multiplier=2.0)
  out = {}
  b = threading.Thread(
    target=lambda: out.setdefault("b", train(b_cfg, build_task(b_cfg), str(w), progress=False))
  )
  b.start()
  assert slow.wait(60)
  a_cfg = small_config(steps=3)
  with pytest.raises(RunLocked, match="in use by process"):
    train(a_cfg, build_task(a_cfg), str(w), progress=False)
  release.set()
  b.join()
  monkeypatch.setattr(loop_lib, "prepare", real)
  p = json.load(open(w / "privacy.json"))
  assert p["steps"] == 6 and p["ledger"][0]["noise_multiplier"] == 2.0
  # The other order: a finished run's directory is read under the lock; another config there
  # is refused as any resume would be, and its ledger stays.
  from dpjax.training.plan import ResumeRefused

  with pytest.raises(ResumeRefused, match="different config"):
    train(a_cfg, build_task(a_cfg), str(w), progress=False)
  assert json.load(open(w / "privacy.json")) == p


def test_a_ledger_without_its_checkpoints_is_never_restarted(tmp_path):
  import shutil

  from dpjax.training.plan import ResumeRefused

  cfg = small_config(steps=3)
  w = tmp_path / "w"
  train(cfg, build_task(cfg), str(w), progress=False)
  before = open(w / "privacy.json").read()
  shutil.rmtree(w / "checkpoints")
  more = small_config(steps=6)
  with pytest.raises(ResumeRefused, match="holds no checkpoint, but its privacy.json records 3"):
    train(more, build_task(more), str(w), progress=False)
  assert open(w / "privacy.json").read() == before
  assert not (w / "checkpoints").exists()


def test_a_changed_plan_without_privacy_json_is_refused(tmp_path):
  from dpjax.training.plan import ResumeRefused

  w = tmp_path / "w"
  cfg = small_config(steps=6)
  train(cfg, build_task(cfg), str(w), progress=False, stop_at_step=4)  # checkpoint 3, ran 4
  changed = small_config(steps=6, noise_multiplier=2.0)
  os.rename(w / "privacy.json", tmp_path / "kept.json")
  with pytest.raises(ResumeRefused, match="privacy.json is missing: the steps released past"):
    train(changed, build_task(changed), str(w), progress=False, allow_privacy_change=True)
  (w / "privacy.json").write_text("{not json")
  with pytest.raises(ResumeRefused, match=r"privacy.json is unreadable \(JSONDecodeError"):
    train(changed, build_task(changed), str(w), progress=False, allow_privacy_change=True)
  # The unchanged plan resumes (its replays draw the same noise), and rewrites the record.
  res = train(cfg, build_task(cfg), str(w), progress=False)
  assert res.privacy["steps"] == 6 and json.load(open(w / "privacy.json"))["steps"] == 6


def test_no_file_of_a_run_is_readable_by_others_and_the_noise_seed_is_never_written(tmp_path):
  import stat

  old = os.umask(0o022)
  try:
    cfg = small_config(steps=3, noise_seed=987654321)
    w = tmp_path / "runs" / "w"
    train(cfg, build_task(cfg), str(w), progress=False)
  finally:
    os.umask(old)
  assert os.umask(old) == old  # the run restored the umask
  found = []
  for root, dirs, files in os.walk(w):
    for name in dirs + files:
      mode = stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)
      found.append(name)
      assert not mode & 0o077, (os.path.join(root, name), oct(mode))
  assert "metadata" in found and "config.json" in found  # the secret's file was checked
  assert not stat.S_IMODE(os.stat(w).st_mode) & 0o077
  for name in ("config.json", "metrics.jsonl", "privacy.json"):
    text = open(w / name).read()
    assert "987654321" not in text and 'noise_seed"' not in text, name


def test_nonprivate_metrics_are_strict_json(tmp_path):
  cfg = small_config(private=False, noise_multiplier=None, steps=3)
  train(cfg, build_task(cfg), str(tmp_path), progress=False)

  def no_constants(name):
    raise AssertionError(f"non-JSON constant {name}")

  rows = [json.loads(l, parse_constant=no_constants) for l in open(tmp_path / "metrics.jsonl")]
  final = [r for r in rows if r.get("event") == "final"][0]
  assert final["epsilon"] is None and final["epsilon_nonfinite"] == "inf"
  p = json.loads(open(tmp_path / "privacy.json").read(), parse_constant=no_constants)
  assert p["private"] is False and p["ledger"] == []


class _NoReadsBetweenLogs:
  """Fails any device-to-host read from a log row (or the start) until the next log step's reads.

  Two detectors: the transfer guard (enforced on accelerators; on the CPU a
  device buffer is host memory and the guard sees nothing), and a counter on
  `ArrayImpl._value`, the path of every host read of a multi-device array
  (np.asarray, item, float) and of float / int / bool / format of any array.
  The runs below use a mesh, so every read is seen on the CPU too. A log
  step's reads start with its dropped-unit check, which lifts the guard.
  """

  def __init__(self, log_every, end, monkeypatch):
    import jax._src.array as array_impl  # the one host-read path of jax.Array

    self.end, self.steps, self.guarded, self.reads = end, [], False, []
    value = array_impl.ArrayImpl._value

    def read(arr):
      if self.guarded:
        self.reads.append(arr.shape)
        raise RuntimeError(f"device-to-host read of a {arr.shape} array between log steps")
      return value.fget(arr)

    monkeypatch.setattr(array_impl.ArrayImpl, "_value", property(read))
    check = tally_lib.check_dropped  # the log step's first read: its dropped-unit counts

    def checked(unchecked, done):
      assert done % log_every == 0 or done == end, f"device reads after step {done}"
      self._guard(False)
      return check(unchecked, done)

    monkeypatch.setattr(tally_lib, "check_dropped", checked)

  def _guard(self, on):
    self.guarded = on
    jax.config.update("jax_transfer_guard_device_to_host", "disallow" if on else "allow")

  def on_start(self, header):
    self._guard(True)  # the first step runs guarded too

  def on_step(self, step, state):
    self.steps.append(step)

  def on_log(self, step, rec, state):
    self._guard(step != self.end)  # after the last step: the loop is over

  def on_end(self, final, state):
    self._guard(False)


@pytest.mark.parametrize(
  "overrides",
  [
    {"data_devices": 8},
    {"data_devices": 2, "adaptive_clipping": {"target_quantile": 0.5}},
    {"data_devices": 4, "model_devices": 2, "clipping_method": "ghost"},
  ],
  ids=["dp_sgd", "adaptive", "fsdp_ghost"],
)
def test_no_device_reads_inside_the_step_loop_except_at_log_steps(overrides, monkeypatch):
  if jax.device_count() < 8:
    pytest.skip("needs 8 virtual devices (set in conftest)")
  cfg = small_config(steps=7, log_every=3, **overrides)
  task = build_task(cfg)
  guard = _NoReadsBetweenLogs(3, 7, monkeypatch)
  try:
    result = train(cfg, task, None, progress=False, callbacks=[guard])
  finally:
    guard._guard(False)
  assert guard.steps == list(range(1, 8)) and not guard.reads
  assert np.isfinite(result.final_metrics["epsilon"]) and result.final_metrics["step"] == 7

  class ReadsEachStep(_NoReadsBetweenLogs):
    def on_step(self, step, state):
      super().on_step(step, state)
      np.asarray(state.params["head"]["b"])  # a read between log steps

  # Control: the same guard catches a read made between log steps.
  control = ReadsEachStep(3, 7, monkeypatch)
  try:
    with pytest.raises(RuntimeError, match="read of a .* array between log steps"):
      train(cfg, task, None, progress=False, callbacks=[control])
  finally:
    control._guard(False)
  assert control.reads == [(4,)]


def test_the_step_donates_its_state_and_leaves_the_task_alone():
  cfg = small_config(steps=3)
  task = build_task(cfg)
  before = jax.tree.map(np.asarray, task.params)
  kept = []

  class Keep:
    def on_start(self, header):
      pass

    def on_step(self, step, state):
      kept.append(state)

    def on_log(self, step, rec, state):
      pass

    def on_end(self, final, state):
      pass

  train(cfg, task, None, progress=False, callbacks=[Keep()])
  # Every state but the last was given to the next step (its buffers reused)...
  assert all(leaf.is_deleted() for s in kept[:-1] for leaf in jax.tree.leaves(s.params))
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(kept[-1].params))
  # ... while the task's own parameters are untouched and still readable.
  for a, b in zip(jax.tree.leaves(task.params), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_a_mesh_the_devices_or_batch_cannot_fill_is_one_line_before_any_file(tmp_path):
  from dpjax.training.spec import SpecError

  n = jax.device_count()
  for overrides, match in (
    ({"data_devices": n + 1}, f"data_devices={n + 1} x model_devices=1 but only {n} devices"),
    ({"data_devices": 3}, "physical_batch_size=32 is not divisible by the 3 devices"),
  ):
    if overrides["data_devices"] == 3 and n < 3:
      continue
    cfg = small_config(**overrides)
    with pytest.raises(SpecError, match=match) as e:
      train(cfg, build_task(cfg), str(tmp_path / "w"), progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "w").exists()


def test_two_holders_of_one_lock_never_coexist(tmp_path):
  import threading

  from dpjax.training.rundir import RunLock, RunLocked

  held, errors = [], []

  def take(i):
    lock = RunLock(str(tmp_path))
    try:
      lock.acquire()
    except RunLocked:
      errors.append(i)
      return
    held.append(i)

  # Many takers at once over a stale file (no live holder): exactly one wins.
  (tmp_path / ".lock").write_text("999999999 gone-host")
  threads = [threading.Thread(target=take, args=(i,)) for i in range(16)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(held) == 1 and len(errors) == 15
  a, b = RunLock(str(tmp_path / "x")), RunLock(str(tmp_path / "x"))
  os.makedirs(tmp_path / "x")
  a.acquire()
  with pytest.raises(RunLocked, match=f"in use by process {os.getpid()} on ") as e:
    b.acquire()
  # the holder's start time (this process's, before the lock was taken), and how to
  # remove a lock that is really stale
  started = re.search(r"\(started (\S+)\)", str(e.value)).group(1)
  assert started <= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
  assert f"remove {tmp_path / 'x' / '.lock'})" in str(e.value)
  a.release()
  b.acquire()  # released: free again, and the file is b's now
  assert (tmp_path / "x" / ".lock").read_text().split()[0] == str(os.getpid())
  b.release()
  assert not (tmp_path / "x" / ".lock").exists()


def test_the_loop_keeps_nothing_per_step():
  # Python objects allocated over a run that logs rarely and never checkpoints,
  # traced from step 100: what a step leaves behind grows with the steps. jax's
  # own caches fill up early (~90 kB by step 700, ~20 kB more by 1,300); the
  # dropped-unit counts, kept as one array per step until the next read, grew
  # by ~880 kB from step 700 to 1,300.
  import tracemalloc

  cfg = small_config(steps=1400, batch_size=16, physical_batch_size=16, log_every=1400)
  traced = {}

  class Traced(loop_lib.Callback):
    def on_step(self, step, state):
      if step == 100:
        tracemalloc.start()
      elif step in (700, 1300):
        traced[step] = tracemalloc.get_traced_memory()[0]
      if step == 1300:
        tracemalloc.stop()

  train(cfg, build_task(cfg), None, progress=False, callbacks=[Traced()])
  assert traced[1300] - traced[700] < 60_000, traced
