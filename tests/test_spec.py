"""The spec's key table: every key classified once, with the reason it does or does not change
the guarantee; the privacy spec holds exactly the privacy keys."""

import pytest

from dpjax.training import spec as spec_lib

# Written out here, not read from the table: marking a new key (or unmarking one) must be a
# decision this test sees, and each privacy key below has a resume case in test_plan.py.
PRIVACY = {
  "privacy_unit",
  "user_sampling",
  "max_examples_per_user",
  "users_per_step",
  "target_epsilon",
  "noise_multiplier",
  "delta",
  "accountant",
  "mechanism",
  "mf_bands",
  "mf_strategy",
  "mf_buffers",
  "l2_clip_norm",
  "automatic_clipping",
  "adaptive_clipping",
  "l1_clip_norm",
  "batch_size",
  "sampling_rate",
  "dp_sam",
  "lmo",
  "lmo_grid",
  "lmo_objective",
}
NOT_PRIVACY = {
  "task",
  "private",
  "physical_batch_size",
  "microbatch_size",
  "clipping_method",
  "steps",
  "optimizer",
  "learning_rate",
  "learning_rates",
  "weight_decay",
  "warmup_steps",
  "seed",
  "noise_seed",
  "log_every",
  "metric_writers",
  "checkpoint_every",
  "data_devices",
  "model_devices",
  "weight_anchor",
}


def test_every_key_is_classified_with_a_reason():
  names = [k.name for k in spec_lib.KEYS]
  assert len(names) == len(set(names))
  assert set(names) == PRIVACY | NOT_PRIVACY, "a new key: classify it here and in the table"
  assert not PRIVACY & NOT_PRIVACY
  for k in spec_lib.KEYS:
    assert k.privacy == (k.name in PRIVACY), k.name
    assert len(k.why.split()) >= 3 and "\n" not in k.why, f"{k.name}: say why in one line"
    assert not (k.privacy and k.run_control), f"{k.name}: a privacy key is not run control"
  assert set(spec_lib.PRIVACY_KEYS) == PRIVACY


@pytest.mark.parametrize(
  "overrides, none",
  [
    ({}, {"l1_clip_norm", "user_sampling", "users_per_step", "lmo", "mf_strategy"}),
    (dict(mechanism="laplace", l1_clip_norm=2.0), {"l2_clip_norm"}),
    (dict(sampling_rate=0.1), {"batch_size"}),
  ],
)
def test_the_privacy_spec_holds_every_privacy_key_and_nones_what_does_not_apply(overrides, none):
  cfg = dict(task={"name": "synthetic"}, noise_multiplier=1.0, **overrides)
  ps = spec_lib.privacy_spec(spec_lib.validate(spec_lib.with_defaults(cfg))).to_dict()
  assert set(ps) == PRIVACY
  for name in none:
    assert ps[name] is None, name
  for name, v in overrides.items():
    assert ps[name] == v


def test_the_privacy_spec_is_one_frozen_keyword_only_value():
  import dataclasses

  cfg = {"task": {"name": "synthetic"}, "noise_multiplier": 1.0}
  ps = spec_lib.privacy_spec(spec_lib.validate(spec_lib.with_defaults(cfg)))
  assert isinstance(ps, spec_lib.PrivacySpec)
  assert [f.name for f in dataclasses.fields(ps)] == list(spec_lib.PRIVACY_KEYS)
  with pytest.raises(dataclasses.FrozenInstanceError):
    ps.noise_multiplier = 2.0
  with pytest.raises(TypeError):  # keyword-only: no field taken by its position
    spec_lib.PrivacySpec(*ps.to_dict().values())
  same = spec_lib.privacy_spec(spec_lib.validate(spec_lib.with_defaults(cfg)))
  other = spec_lib.validate(spec_lib.with_defaults(dict(cfg, noise_multiplier=2.0)))
  assert ps == same and ps != spec_lib.privacy_spec(other)


def test_a_cli_run_checks_its_config_once(tmp_path, monkeypatch, capsys):
  # The CLI validates before building the task; train, prepare and the plan receive
  # the Spec and do not check it again (a warning would otherwise repeat).
  from dpjax import cli
  from dpjax.training import spec as spec_lib

  calls = []
  check = spec_lib._check

  def counted(cfg):
    calls.append(1)
    return check(cfg)

  monkeypatch.setattr(spec_lib, "_check", counted)
  argv = ["train", "synthetic", "--workdir", str(tmp_path / "w"), "--no-progress"]
  assert cli.main(argv + ["--set", "steps=2", "--set", "log_every=1"]) == 0
  assert len(calls) == 1
  spec = spec_lib.validate(
    spec_lib.with_defaults({"task": {"name": "synthetic"}, "private": False})
  )
  assert isinstance(spec, spec_lib.Spec) and spec_lib.validate(spec) is spec
  assert spec_lib.with_defaults(spec) is spec


def test_dp_sam_defaults_are_filled_once_by_validate():
  from dpjax.training import spec as spec_lib

  cfg = {"task": {"name": "synthetic"}, "noise_multiplier": 1.0, "dp_sam": {"rho": 0.1}}
  spec = spec_lib.validate(spec_lib.with_defaults(cfg))
  defaults = {"mode": "free", "active_fraction": 0.5, "layerwise": True}
  assert dict(spec.dp_sam) == {"rho": 0.1, **defaults} and spec_lib.DP_SAM_DEFAULTS == defaults
  bad = dict(cfg, dp_sam={"rho": 0.1, "active_fraction": True})
  with pytest.raises(spec_lib.SpecError, match="dp_sam.active_fraction must be in"):
    spec_lib.validate(spec_lib.with_defaults(bad))


def test_the_anchor_keys_earlier_name_says_its_new_one():
  cfg = {"task": {"name": "synthetic"}, "noise_multiplier": 1.0}
  old = dict(cfg, weight_distillation={"lam": 0.1, "reference": "init"})
  with pytest.raises(spec_lib.SpecError, match="weight_distillation is now weight_anchor"):
    spec_lib.validate(old)
  new = spec_lib.validate(dict(cfg, weight_anchor={"lam": 0.1, "reference": "init"}))
  assert dict(new.weight_anchor) == {"lam": 0.1, "reference": "init"}
