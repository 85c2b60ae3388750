"""The privacy plan and ledger in real runs: resumes, the target guard, secret noise.

Every epsilon is checked against dp-accounting's own composition of the
segments that really ran, built here from the sigmas and rates the runs
logged (never through dpjax's accounting code).
"""

import json
import os
import shutil
import warnings

import dp_accounting
import jax
import numpy as np
import pytest
from dp_accounting import pld

from dpjax.tasks import build_task
from dpjax.training.config import CONFIG_DIR, load_config
from dpjax.training.loop import train
from dpjax.training.plan import BudgetExhausted, ResumeRefused

CONFIG = os.path.join(CONFIG_DIR, "synthetic.py")
DELTA = 1e-5


def cfg_of(**overrides):
  cfg = load_config(CONFIG)
  cfg.task.num_train = 600
  cfg.task.num_eval = 100
  cfg.steps = 6
  cfg.batch_size = 60
  cfg.physical_batch_size = 128
  cfg.target_epsilon = None
  cfg.noise_multiplier = 1.0
  cfg.log_every = 3
  cfg.checkpoint_every = 3
  for k, v in overrides.items():
    if k == "num_train":
      cfg.task.num_train = v
    else:
      cfg[k] = v
  return cfg


def reference_epsilon(segments, delta=DELTA):
  """dp-accounting's PLD epsilon of [(sigma, q, releases), ...] composed in order.

  dpjax composes the same PLDs; its FFTs run on numpy's and dp-accounting's on scipy's,
  which round differently (~1e-11 relative): the runs below agree with it to 1e-9.
  """
  acc = pld.PLDAccountant(
    dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4
  )
  for sigma, q, n in segments:
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
  return acc.get_epsilon(delta)


def starts(workdir):
  return [
    json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if '"event": "start"' in l
  ]


def run(cfg, workdir=None, **kw):
  return train(
    cfg, build_task(cfg), None if workdir is None else str(workdir), progress=False, **kw
  )


def test_more_steps_with_a_target_is_refused_then_composed(tmp_path):
  w = tmp_path / "w"
  first = run(cfg_of(steps=6, noise_multiplier=None, target_epsilon=3.0), w)
  s1 = first.noise_multiplier
  longer = cfg_of(steps=12, noise_multiplier=None, target_epsilon=3.0)
  with pytest.raises(ResumeRefused, match=r"steps: 6 -> 12.*allow-privacy-change"):
    run(longer, w)
  res = run(longer, w, allow_privacy_change=True)
  s2 = res.noise_multiplier
  assert s2 > s1
  want = reference_epsilon([(s1, 0.1, 6), (s2, 0.1, 6)])
  eps = res.final_metrics["epsilon"]
  assert eps == pytest.approx(want, rel=1e-9)
  assert eps <= 3.0  # the target covers the whole ledger
  p = json.load(open(w / "privacy.json"))
  assert [(s["noise_multiplier"], s["steps"]) for s in p["ledger"]] == [(s1, 6), (s2, 6)]
  assert p["epsilon"] == eps and p["delta"] == DELTA and p["privacy_unit"] == "example"


def test_changed_sigma_deleted_config_and_copied_checkpoints(tmp_path):
  w = tmp_path / "w"
  run(cfg_of(steps=6), w)
  # A changed sigma: refused even with config.json deleted (the ledger is in the checkpoint).
  os.remove(w / "config.json")
  with pytest.raises(ResumeRefused, match="noise_multiplier: 1 -> 1.5"):
    run(cfg_of(steps=12, noise_multiplier=1.5), w)
  # Checkpoints copied to a new workdir: the ledger comes along.
  copy = tmp_path / "copy"
  os.makedirs(copy)
  shutil.copytree(w / "checkpoints", copy / "checkpoints")
  with pytest.raises(ResumeRefused, match="noise_multiplier"):
    run(cfg_of(steps=12, noise_multiplier=1.5), copy)
  # The same sigma and q with more steps extends the one segment.
  res = run(cfg_of(steps=12), copy)
  assert res.final_metrics["epsilon"] == pytest.approx(
    reference_epsilon([(1.0, 0.1, 12)]), rel=1e-9
  )
  assert len(res.ledger.segments) == 1 and res.ledger.steps == 12
  res = run(cfg_of(steps=18, noise_multiplier=1.5), w, allow_privacy_change=True)
  want = reference_epsilon([(1.0, 0.1, 6), (1.5, 0.1, 12)])
  assert res.final_metrics["epsilon"] == pytest.approx(want, rel=1e-9)


def test_grown_data_changes_q_and_is_refused(tmp_path):
  w = tmp_path / "w"
  run(cfg_of(steps=6), w, stop_at_step=3)
  grown = cfg_of(steps=6, num_train=3000)
  with pytest.raises(ResumeRefused, match=r"different config \(task.num_train: 600 -> 3000\)"):
    run(grown, w)
  # The data grew without a config change (config.json gone): the ledger still sees q.
  os.remove(w / "config.json")
  with pytest.raises(ResumeRefused, match=r"sampling_rate: 0.1 -> 0.02"):
    run(grown, w)
  res = run(grown, w, allow_privacy_change=True)
  want = reference_epsilon([(1.0, 0.1, 3), (1.0, 0.02, 3)])
  assert res.final_metrics["epsilon"] == pytest.approx(want, rel=1e-9)


def test_steps_past_the_checkpoint_are_charged_when_the_plan_changes(tmp_path):
  w = tmp_path / "w"
  run(cfg_of(steps=12, checkpoint_every=6), w, stop_at_step=9)
  # A kill after step 9 whose last checkpoint is step 6: privacy.json says 9 ran.
  shutil.rmtree(w / "checkpoints" / "9")
  assert json.load(open(w / "privacy.json"))["steps"] == 9
  res = run(
    cfg_of(steps=12, checkpoint_every=6, noise_multiplier=2.0), w, allow_privacy_change=True
  )
  want = reference_epsilon([(1.0, 0.1, 9), (2.0, 0.1, 6)])
  assert res.final_metrics["epsilon"] == pytest.approx(want, rel=1e-9)
  assert starts(w)[-1]["resumed_from"] == 6


def test_target_guard(tmp_path):
  from dpjax.training.spec import SpecError

  with pytest.raises(SpecError, match="contradict"):
    run(cfg_of(target_epsilon=3.0, noise_multiplier=0.5))
  w = tmp_path / "w"
  spent = run(cfg_of(steps=6, noise_multiplier=0.6), w).final_metrics["epsilon"]
  assert spent > 3
  with pytest.raises(BudgetExhausted, match=rf"already spent: the ledger holds eps={spent:.4g}"):
    run(cfg_of(steps=12, noise_multiplier=None, target_epsilon=3.0), w, allow_privacy_change=True)
  assert len(os.listdir(w / "checkpoints")) >= 1 and starts(w)[-1]["resumed_from"] == 0


def test_noise_is_secret_and_streams_are_separate(tmp_path):
  a = run(cfg_of(), tmp_path / "a")
  b = run(cfg_of(), tmp_path / "b")
  # Same config, same seed: same initialisation, different noise.
  assert not np.allclose(np.asarray(a.params["head"]["w"]), np.asarray(b.params["head"]["w"]))
  for d in ("a", "b"):
    text = open(tmp_path / d / "config.json").read() + open(tmp_path / d / "metrics.jsonl").read()
    assert "entropy" not in text
    assert json.load(open(tmp_path / d / "privacy.json"))["noise_seed_secret"] is True
  # Rerunning from a's own config.json does not reproduce its noise.
  cfg = cfg_of()
  cfg.update(json.load(open(tmp_path / "a" / "config.json")))
  c = run(cfg)
  assert not np.allclose(np.asarray(a.params["head"]["w"]), np.asarray(c.params["head"]["w"]))
  # A fixed noise_seed reproduces the run and says the guarantee assumes it is secret.
  d = run(cfg_of(noise_seed=11), tmp_path / "d")
  e = run(cfg_of(noise_seed=11))
  for x, y in zip(jax.tree.leaves(d.params), jax.tree.leaves(e.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  p = json.load(open(tmp_path / "d" / "privacy.json"))
  assert p["noise_seed_secret"] is False and "secret" in p["assumes"]


def test_secret_streams_differ():
  from dpjax.training.plan import Secret

  s = Secret.fresh()
  assert s.secret and Secret.fresh().entropy != s.entropy
  keys = [np.asarray(s.noise_key()), np.asarray(s.ascent_key())]
  assert not np.array_equal(*keys)
  assert Secret.from_json(json.loads(json.dumps(s.to_json()))) == s
  assert s.sampling_seed() != Secret.fresh().sampling_seed()


def test_bandmf_run_is_accounted_as_dpsgd_over_its_rounds(tmp_path):
  # 600 examples in 3 groups, 60 expected per step: rate 0.3 within a group;
  # 6 steps are 2 rounds, each unit in at most 2 of them.
  res = run(cfg_of(mf_bands=3, noise_multiplier=1.0), tmp_path / "w")
  want = reference_epsilon([(1.0, 0.3, 2)])
  assert res.final_metrics["epsilon"] == pytest.approx(want, rel=1e-9)
  record = json.load(open(tmp_path / "w" / "privacy.json"))
  (seg,) = record["ledger"]
  assert (seg["bands"], seg["steps"], seg["sampling_rate"]) == (3, 6, 0.3)
  assert seg["origin"]["mf_strategy"] == "optimal"
  with pytest.raises(ResumeRefused, match="BandMF or BLT run"):
    run(
      cfg_of(mf_bands=2, noise_multiplier=1.0, steps=12), tmp_path / "w", allow_privacy_change=True
    )


def test_bandmf_resume_that_refits_other_bands_is_refused(tmp_path, monkeypatch):
  from dpjax.core import matrix_factorization as mf
  from dpjax.training import plan as plan_lib

  cfg = cfg_of(mf_bands=3, noise_multiplier=1.0)
  run(cfg, tmp_path / "w", stop_at_step=3)
  (seg,) = json.load(open(tmp_path / "w" / "privacy.json"))["ledger"]
  fitted = mf.strategy("optimal", 3, 6)
  np.testing.assert_array_equal(seg["origin"]["mf_coefs"], fitted)  # the bands the noise used
  # A refit that lands elsewhere (another jax, another machine) would mix two strategies.
  moved = fitted + np.array([0.0, 1e-7, -1e-7])
  monkeypatch.setattr(plan_lib, "strategy", lambda name, b, n: moved)
  with pytest.raises(ResumeRefused, match=r"BandMF or BLT run \(mf_coefs: "):
    run(cfg, tmp_path / "w", allow_privacy_change=True)
  monkeypatch.setattr(plan_lib, "strategy", mf.strategy)
  res = run(cfg, tmp_path / "w")  # the same refit continues the segment
  assert res.final_metrics["step"] == 6
  (seg,) = json.load(open(tmp_path / "w" / "privacy.json"))["ledger"]
  assert seg["steps"] == 6


def test_bandmf_target_is_met_and_bad_settings_are_refused():
  res = run(cfg_of(mf_bands=3, noise_multiplier=None, target_epsilon=2.0))
  eps = res.final_metrics["epsilon"]
  assert eps == pytest.approx(2.0, rel=0.02) and eps <= 2.0
  assert eps == pytest.approx(reference_epsilon([(res.noise_multiplier, 0.3, 2)]), rel=1e-6)
  from dpjax.training.spec import SpecError

  with pytest.raises(SpecError, match="mf_bands=3 needs mechanism 'gaussian'"):
    run(cfg_of(mf_bands=3, mechanism="laplace", l1_clip_norm=1.0))
  with pytest.raises(SpecError, match="lower batch_size to at most 200"):
    run(cfg_of(mf_bands=3, batch_size=300))
  with pytest.raises(SpecError, match="adam_bc"):
    run(cfg_of(mf_bands=3, optimizer="adam_bc"))


def _gaussian_epsilon(sigma, delta=DELTA):
  """dp-accounting's PLD epsilon of one Gaussian mechanism (no sampling, no composition)."""
  acc = pld.PLDAccountant(
    dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4
  )
  return acc.compose(dp_accounting.GaussianDpEvent(sigma)).get_epsilon(delta)


def test_blt_run_is_one_gaussian_mechanism_at_its_min_separation_sensitivity(tmp_path):
  from dpjax.core import matrix_factorization as mf
  from dpjax.training.plan import Secret, make_plan
  from dpjax.training.spec import validate
  from tests.test_blt import _brute_force, _dense

  cfg = cfg_of(mf_bands=3, mf_strategy="blt", mf_buffers=2, noise_multiplier=1.0)
  res = run(cfg, tmp_path / "w")
  want = _gaussian_epsilon(1.0)
  assert want <= res.final_metrics["epsilon"] <= want * (1 + 1e-6)
  (seg,) = json.load(open(tmp_path / "w" / "privacy.json"))["ledger"]
  assert (seg["bands"], seg["mf_buffers"], seg["mf_horizon"], seg["steps"]) == (3, 2, 6, 6)
  assert len(seg["origin"]["mf_blt"][0]) == 2  # the fitted decays: a refit is a privacy change
  # The noise is scaled to C x's sensitivity: 6 steps, 3 groups, so 2 participations 3 apart.
  plan = make_plan(validate(cfg), build_task(cfg), secret=Secret.fresh())
  C = _dense(mf.blt_coefficients(*plan.mf_blt, 6), 6)
  assert plan.mf_sensitivity == pytest.approx(_brute_force(C, 3, 2), rel=1e-12)
  assert plan.mf_sensitivity > 1.0  # two participations cost more than one
  with pytest.raises(ResumeRefused, match="BandMF or BLT run"):
    more = cfg_of(mf_bands=3, mf_strategy="blt", mf_buffers=2, noise_multiplier=2.0)
    run(more, tmp_path / "w", allow_privacy_change=True)


def test_blt_target_is_met_and_bad_settings_are_refused():
  from dpjax.training.spec import SpecError

  res = run(cfg_of(mf_strategy="blt", mf_buffers=1, noise_multiplier=None, target_epsilon=2.0))
  eps = res.final_metrics["epsilon"]
  assert eps == pytest.approx(2.0, rel=0.02) and eps <= 2.0
  assert eps == pytest.approx(_gaussian_epsilon(res.noise_multiplier), rel=1e-6)
  with pytest.raises(SpecError, match="mf_strategy='blt' needs mechanism 'gaussian'"):
    run(cfg_of(mf_strategy="blt", mechanism="laplace", l1_clip_norm=1.0))
  with pytest.raises(SpecError, match="mf_strategy='blt' with optimizer 'adam_bc'"):
    run(cfg_of(mf_strategy="blt", optimizer="adam_bc"))


# --- every privacy key: a resume that changes it is refused, or appends a segment with it ---

LMO = dict(a1=0.3, a3=0.2, a4=0.5, theta=1.0, k=2.0, lam=1.0, Ua=1.0, Ub=2.0)
LMO_TARGET = 3.0
ONE_LMO = {"a": [0.1], "theta_k": [[1, 2]], "lam": [1.0], "Ub_Ua": [[2, 1]]}
LMO_SEARCH = dict(  # LMO parameters searched for a target, over a one-candidate grid
  mechanism="lmo",
  l1_clip_norm=1.0,
  noise_multiplier=None,
  target_epsilon=LMO_TARGET,
  lmo_grid=ONE_LMO,
)
USER = dict(privacy_unit="user", users_per_step=10, max_examples_per_user=4)
# key -> (the first run's overrides, the resume's); every key of test_spec.PRIVACY is here.
RESUME_CASES = {
  "privacy_unit": ({}, USER),
  "user_sampling": (USER, dict(USER, user_sampling="els", batch_size=30)),
  "max_examples_per_user": (USER, dict(USER, max_examples_per_user=8)),
  "users_per_step": (USER, dict(USER, users_per_step=20)),
  "target_epsilon": (
    dict(noise_multiplier=None, target_epsilon=3.0),
    dict(noise_multiplier=None, target_epsilon=4.0),
  ),
  "noise_multiplier": ({}, dict(noise_multiplier=1.5)),
  "delta": ({}, dict(delta=1e-6)),
  "accountant": ({}, dict(accountant="rdp")),
  "mechanism": ({}, dict(mechanism="laplace", l1_clip_norm=1.0)),
  "mf_bands": ({}, dict(mf_bands=2)),
  "mf_strategy": (dict(mf_bands=2), dict(mf_bands=2, mf_strategy="sqrt")),
  "mf_buffers": (
    dict(mf_strategy="blt", mf_buffers=1),
    dict(mf_strategy="blt", mf_buffers=2),
  ),
  "l2_clip_norm": ({}, dict(l2_clip_norm=2.0)),
  "automatic_clipping": ({}, dict(automatic_clipping=0.01)),
  "adaptive_clipping": ({}, dict(adaptive_clipping={"target_quantile": 0.7})),
  "l1_clip_norm": (
    dict(mechanism="laplace", l1_clip_norm=1.0),
    dict(mechanism="laplace", l1_clip_norm=2.0),
  ),
  "batch_size": ({}, dict(batch_size=120)),
  "sampling_rate": ({}, dict(sampling_rate=0.2)),
  "dp_sam": ({}, dict(dp_sam={"rho": 0.05})),
  "lmo": (
    dict(mechanism="lmo", l1_clip_norm=1.0, lmo=LMO),
    dict(mechanism="lmo", l1_clip_norm=1.0, lmo=dict(LMO, a1=0.4)),
  ),
  "lmo_grid": (
    LMO_SEARCH,
    dict(LMO_SEARCH, lmo_grid=dict(ONE_LMO, lam=[0.5])),
  ),
  "lmo_objective": (
    LMO_SEARCH,
    dict(LMO_SEARCH, lmo_objective="var"),
  ),
}


def _plan(overrides, prior=None, start=0, allow=False):
  from dpjax.core.accounting.ledger import Ledger
  from dpjax.training import spec as spec_lib
  from dpjax.training.plan import Secret, make_plan

  cfg = cfg_of(**overrides)
  cfg.task.num_users = 40
  spec = spec_lib.validate(spec_lib.with_defaults(cfg))
  return make_plan(
    spec,
    build_task(cfg),
    secret=Secret(12345, True),
    prior=prior or Ledger(),
    start_step=start,
    allow_privacy_change=allow,
  )


def test_the_resume_cases_cover_every_privacy_key():
  from test_spec import PRIVACY

  assert set(RESUME_CASES) == PRIVACY


@pytest.mark.parametrize("key", sorted(RESUME_CASES))
def test_a_resume_that_changes_a_privacy_key_is_refused_or_appends_it(key):
  from dpjax.training.spec import SpecError

  first, then = RESUME_CASES[key]
  a = _plan(first)
  ledger = a.ledger_at(3)
  same = _plan(first, ledger, 3)  # unchanged: continues the segment, on the same streams
  assert len(same.ledger_at(6).segments) == 1 and same.stream == a.stream == 0
  with pytest.raises(ResumeRefused, match=key):
    _plan(then, ledger, 3)
  correlated = {"mf_bands", "mf_strategy", "mf_buffers"}
  if key in correlated:  # one unchanged run is all their bound covers
    with pytest.raises(ResumeRefused, match="BandMF or BLT run"):
      _plan(then, ledger, 3, allow=True)
    return
  if key in ("lmo_grid", "lmo_objective"):  # a search cannot be held to a spent budget
    with pytest.raises(SpecError, match="cannot be searched against a spent budget"):
      _plan(then, ledger, 3, allow=True)
    return
  b = _plan(then, ledger, 3, allow=True)
  segs = b.ledger_at(6).segments
  assert len(segs) == 2 and segs[0] == ledger.segments[0]
  assert segs[1].steps == 3 and segs[1].origin[key] is not None
  assert segs[1].origin[key] != segs[0].origin[key]
  assert b.stream not in (0, a.stream)  # fresh noise and sampling streams
  assert not np.array_equal(
    np.asarray(b.secret.noise_key(b.stream)), np.asarray(a.secret.noise_key(a.stream))
  )


def _head(res):
  return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(res.params)])


@pytest.mark.parametrize(
  "key, values, sigmas",
  [
    ("noise_multiplier", (1.0, 2.0, 3.0), (1.0, 2.0, 3.0)),
    ("l2_clip_norm", (10, 20, 30), (1, 1, 1)),
  ],
)
def test_replays_past_the_checkpoint_draw_fresh_noise_and_all_three_are_charged(
  tmp_path, key, values, sigmas
):
  # Step 4 released (privacy.json at 4) and the newest checkpoint lost: each resume from the
  # step-3 checkpoint replays step 4 under a new plan. With the noise reused, the second
  # difference of the three step-4 updates would cancel the noise (sigma or C linear in z).
  w = tmp_path / "w"
  base = dict(steps=4, checkpoint_every=3, log_every=1, optimizer="sgd", learning_rate=0.5)
  ends = []
  for i, v in enumerate(values):
    res = run(cfg_of(**base, **{key: v}), w, allow_privacy_change=i > 0)
    assert starts(w)[-1]["resumed_from"] == (0 if i == 0 else 3)
    ends.append(_head(res))
    shutil.rmtree(w / "checkpoints" / "4")
  d1, d2, d3 = ends
  second, spread = np.linalg.norm(d1 - 2 * d2 + d3), np.linalg.norm(d3 - d1)
  assert second > 0.3 * spread > 0, (second, spread)
  p = json.load(open(w / "privacy.json"))
  assert [(s["steps"], s["origin"][key]) for s in p["ledger"]] == [(4, values[0])] + [
    (1, v) for v in values[1:]
  ]
  want = reference_epsilon([(sigmas[0], 0.1, 4), (sigmas[1], 0.1, 1), (sigmas[2], 0.1, 1)])
  assert p["epsilon"] == pytest.approx(want, rel=1e-9)


def test_only_released_values_reach_the_transforms_after_the_noise():
  import jax.numpy as jnp
  import optax

  from dpjax.core.mechanisms import QuantileClipState, find_state

  seen = []

  def update(updates, state, params=None, **extra):
    seen.append(sorted(extra))
    return updates, state

  recorder = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  plan = _plan(dict(adaptive_clipping={}))
  tx = plan.transform(recorder)
  params = build_task(cfg_of()).params
  grads = jax.tree.map(jnp.zeros_like, params)
  clip = []
  for count in (-30.0, 30.0):  # the count moves the clip norm: the noise transform reads it
    _, state = tx.update(
      grads, tx.init(params), params, quantile_count=jnp.float32(count), noise_variance=0.1
    )
    clip.append(float(find_state(state, QuantileClipState).clip_norm))
  assert clip[0] > clip[1]  # fewer units under C: C grows
  assert seen == [["noise_variance"]] * 2  # the private count never gets past the noise


@pytest.mark.parametrize("first, then", [("gaussian", "lmo"), ("lmo", "gaussian")])
def test_a_resume_between_lmo_and_another_mechanism_is_refused_as_a_privacy_change(first, then):
  over = {"gaussian": {}, "lmo": dict(mechanism="lmo", l1_clip_norm=1.0, lmo=LMO)}
  ledger = _plan(over[first]).ledger_at(3)
  with pytest.raises(ResumeRefused, match=f"mechanism: '{first}' -> '{then}'"):
    _plan(over[then], ledger, 3)
  segs = _plan(over[then], ledger, 3, allow=True).ledger_at(6).segments
  assert [s.mechanism for s in segs] == [first, then]


def test_a_nearly_spent_target_warns_that_the_noise_it_calibrates_cannot_learn(tmp_path):
  w = tmp_path / "w"
  run(cfg_of(steps=6), w, stop_at_step=3)
  spent = json.load(open(w / "privacy.json"))["epsilon"]
  nearly = cfg_of(steps=6, noise_multiplier=None, target_epsilon=spent * 1.0001)
  with pytest.warns(UserWarning, match=r"over 10x the first segment's 1: the 3 steps left will"):
    run(nearly, w, allow_privacy_change=True)
  last = json.load(open(w / "privacy.json"))["ledger"][-1]
  assert last["noise_multiplier"] > 10.0  # what the warning said, as the ledger records it
  w2 = tmp_path / "w2"  # a target with room left: no warning
  run(cfg_of(steps=6), w2, stop_at_step=3)
  roomy = cfg_of(steps=6, noise_multiplier=None, target_epsilon=spent * 2)
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message=".*will hardly learn.*")
    run(roomy, w2, allow_privacy_change=True)
