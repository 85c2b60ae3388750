"""The one-run audit of a whole training run: canaries, their coin flips, `dpjax audit`."""

from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest

from dpjax import cli
from dpjax.auditing import one_run
from dpjax.tasks import build_task
from dpjax.training.config import CONFIG_DIR, load_config

CONFIGS = os.path.join(CONFIG_DIR)


def _synthetic_task(num_users=None):
  cfg = load_config(os.path.join(CONFIGS, "synthetic.py"))
  cfg.task.num_train = 300
  if num_users:
    cfg.task.num_users = num_users
  return build_task(cfg)


def test_classification_canaries_carry_a_wrong_label_and_fair_coins():
  task = _synthetic_task()
  cs = one_run.make_canaries(task, 4000, seed=3)
  assert cs.examples["x"].shape == (4000, task.train["x"].shape[1])
  # Each canary copies a training input: its label is never that input's own.
  own = {tuple(x): y for x, y in zip(task.train["x"].tolist(), task.train["label"].tolist())}
  assert all(own[tuple(x)] != y for x, y in zip(cs.examples["x"].tolist(), cs.examples["label"]))
  assert abs(cs.included.mean() - 0.5) < 0.03
  again = one_run.make_canaries(task, 4000, seed=3)
  assert np.array_equal(again.included, cs.included)  # the audit's seed fixes them


def test_included_canaries_join_the_training_data_as_units_of_their_own():
  task = _synthetic_task(num_users=20)
  cs = one_run.make_canaries(task, 50, seed=0)
  out = one_run.with_canaries(task, cs)
  k = int(cs.included.sum())
  assert len(out.train["x"]) == len(task.train["x"]) + k
  np.testing.assert_array_equal(out.train["label"][-k:], cs.examples["label"][cs.included])
  new_users = out.user_ids[-k:]
  assert len(set(new_users)) == k and not set(new_users) & set(task.user_ids)


def test_language_model_canaries_are_random_token_sequences():
  ids = np.zeros((10, 16), np.int32)
  task = types.SimpleNamespace(
    name="lm",
    train={"input_ids": ids, "attention_mask": np.zeros_like(ids)},
    info={"decoder": types.SimpleNamespace(vocab_size=258)},
  )
  cs = one_run.make_canaries(task, 300, seed=1)
  toks = cs.examples["input_ids"]
  assert toks.shape == (300, 16) and toks.min() >= 0 and toks.max() < 258
  assert len(np.unique(toks)) > 200 and cs.examples["attention_mask"].all()


def test_a_task_without_a_canary_rule_is_refused():
  task = types.SimpleNamespace(name="regression", train={"x": np.zeros((5, 2))}, info=None)
  with pytest.raises(ValueError, match="has no canary rule"):
    one_run.make_canaries(task, 10, seed=0)
  with pytest.raises(ValueError, match="canaries must be an integer >= 2"):
    one_run.make_canaries(task, 1, seed=0)


def test_dpjax_audit_writes_a_bound_below_the_claim(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  sets = ["task.num_train=300", "task.num_eval=100", "steps=10", "log_every=10"]
  sets += ["target_epsilon=None", "noise_multiplier=1.0", "batch_size=50"]
  argv = ["audit", os.path.join(CONFIGS, "synthetic.py"), "--canaries", "100"]
  argv += ["--workdir", workdir, "--no-progress"] + [a for s in sets for a in ("--set", s)]
  # ~50 canaries join 300 examples: the audited run samples at another rate, said and refused
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert (
    len(err) == 1 and "sampling rate 0.1667 -> 0.1" in err[0] and "--accept-other-plan" in err[0]
  )
  assert not os.path.exists(workdir)
  assert cli.main(argv + ["--accept-other-plan"]) == 0
  out = capsys.readouterr().out
  assert "audit:   epsilon >=" in out and "claimed: (" in out
  with open(os.path.join(workdir, "audit.json")) as f:
    rec = json.load(f)
  with open(os.path.join(workdir, "privacy.json")) as f:
    privacy = json.load(f)
  assert rec["claimed"]["epsilon"] == privacy["epsilon"] > 0
  assert rec["canaries"] == 100 and 0 < rec["included"] < 100
  assert 0.0 <= rec["lower_bound"]["epsilon"] <= rec["claimed"]["epsilon"]
  t = rec["tpr_at_fpr"]
  assert t["fpr"] <= t["max_tpr_claimed"] <= 1.0


def test_an_audit_does_not_resume_a_run_trained_without_its_canaries(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  cfg = load_config(os.path.join(CONFIGS, "synthetic.py"))
  with pytest.raises(ValueError, match="holds a run trained without canaries"):
    one_run.audit_run(cfg, _synthetic_task(), str(tmp_path), canaries=10, accept_other_plan=True)
  other = tmp_path / "other"
  other.mkdir()
  (other / one_run.CANARY_FILE).write_text(json.dumps({"canaries": 10, "seed": 1}))
  with pytest.raises(ValueError, match="audits other canaries"):
    one_run.audit_run(
      cfg, _synthetic_task(), str(other), canaries=10, seed=0, accept_other_plan=True
    )


def test_dpjax_audit_refuses_bad_arguments_before_any_compute(capsys):
  assert cli.main(["audit", os.path.join(CONFIGS, "synthetic.py"), "--canaries", "1"]) == 2
  assert "--canaries must be >= 2, got 1" in capsys.readouterr().err
  assert cli.main(["audit", os.path.join(CONFIGS, "synthetic.py"), "--confidence", "1.5"]) == 2
  assert "--confidence must be in (0, 1)" in capsys.readouterr().err
  argv = ["audit", os.path.join(CONFIGS, "synthetic.py"), "--set", "private=False"]
  argv += ["--set", "target_epsilon=None"]
  assert cli.main(argv) == 2
  assert "nothing to audit" in capsys.readouterr().err
