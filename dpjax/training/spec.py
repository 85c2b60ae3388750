"""The training spec: a config checked against the key table, once, and frozen.

A config file (`get_config()`) sets some keys; `with_defaults` fills the
rest, so every key is settable with `--set`; `validate` checks each value
and the contradictions between them and returns a frozen copy. Errors are
`SpecError`s of one line: the key, the value given, what is allowed.
The table itself is `dpjax.training.keys`; `dpjax config` prints it.

The `task` section is the task builder's (`dpjax.tasks`): its keys are
checked against what the config file declares, not here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Dict, List, Tuple

import ml_collections

from dpjax.core import mechanisms
from dpjax.training.keys import BY_NAME, KEYS, RUN_CONTROL, Key

__all__ = [  # the key table lives in `dpjax.training.keys`; its names are read from here too
  "BY_NAME",
  "KEYS",
  "RUN_CONTROL",
  "Key",
  "PrivacySpec",
  "SpecError",
  "Spec",
  "check_value",
  "describe",
  "is_train_config",
  "privacy_spec",
  "validate",
  "with_defaults",
]


class SpecError(ValueError):
  """A config value that is not allowed (one line: key, value, what is allowed)."""


def is_train_config(cfg) -> bool:
  """Whether `cfg` is a `dpjax train` config (a task, no teacher section).

  Args:
    cfg: a config.

  Returns:
    True for a train config.
  """
  return "task" in cfg and "teacher" not in cfg


class Spec(ml_collections.FrozenConfigDict):
  """A validated spec (what `validate` returns): every key present, checked, frozen.

  `validate` and `with_defaults` return a Spec unchanged, so a run's checks
  (and their warnings) happen once, at the boundary (the CLI or `train`),
  however many layers below receive the spec.
  """


def with_defaults(cfg) -> ml_collections.ConfigDict:
  """`cfg` with every declared key present (its default where the file sets none).

  Args:
    cfg: a config (ConfigDict or dict), or a `Spec` (returned as it is).

  Returns:
    A complete ConfigDict.
  """
  if isinstance(cfg, Spec):
    return cfg
  out = ml_collections.ConfigDict(_plain(cfg), type_safe=False)
  for k in KEYS:
    if k.name not in out:
      out[k.name] = k.default
  return out


def _plain(cfg) -> Dict[str, Any]:
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _type_name(kind: Tuple[type, ...]) -> str:
  names = {
    bool: "a bool",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "a dict",
    ml_collections.ConfigDict: "a dict",
  }
  return " or ".join(dict.fromkeys(names[t] for t in kind))


def check_value(k: Key, v: Any) -> Any:
  """`v` checked against key `k`'s type, choices and range (SpecError, one line).

  Args:
    k: the key.
    v: the value given.

  Returns:
    The value (a ConfigDict as a plain dict).
  """
  if v is None:
    if k.optional:
      return None
    raise SpecError(f"{k.name} must be {_type_name(k.kind)}, got None")
  ok_type = isinstance(v, k.kind) and not (isinstance(v, bool) and bool not in k.kind)
  if not ok_type:
    raise SpecError(
      f"{k.name} must be {_type_name(k.kind)}{' or None' if k.optional else ''}, got {v!r}"
    )
  if isinstance(v, float) and not math.isfinite(v) and k.check is not None:
    raise SpecError(f"{k.name} must be {k.allowed}, got {v!r}")
  choices = k.options()
  if choices is not None and v not in choices:
    raise SpecError(f"{k.name} must be one of {', '.join(map(repr, choices))}, got {v!r}")
  if k.check is not None and not k.check(v):
    raise SpecError(f"{k.name} must be {k.allowed}, got {v!r}")
  if isinstance(v, ml_collections.ConfigDict):
    return v.to_dict()
  return v


def validate(cfg) -> Spec:
  """Checks every key and the contradictions between keys; returns a frozen, complete `Spec`.

  Warns (UserWarning) for privacy keys set under private=False. Checks that
  need the data (delta < 1/N, a sampling rate <= 1) are the plan's
  (`dpjax.training.plan.make_plan`).

  Args:
    cfg: a config (missing keys take their defaults), or a `Spec` (returned
      as it is: checked once).

  Returns:
    The Spec (raises SpecError, one line, on a bad value).
  """
  if isinstance(cfg, Spec):  # validated already
    return cfg
  return _check(cfg)


def _check(cfg) -> Spec:
  """`validate`'s checks, run once per config."""
  raw = _plain(cfg)
  unknown = sorted(set(raw) - set(BY_NAME))
  if "weight_distillation" in unknown:  # the key's earlier name
    raise SpecError("weight_distillation is now weight_anchor (the same term); rename the key")
  if unknown:
    raise SpecError(f"unknown config key {unknown[0]!r}; known keys: see `dpjax config`")
  if raw.get("task") is None:
    raise SpecError("the config has no task section (task.name = one of dpjax.tasks.TASKS)")
  out = {}
  for k in KEYS:
    out[k.name] = check_value(k, raw.get(k.name, k.default))
  kind = mechanisms.get(out["mechanism"])
  if out["private"]:
    if out["target_epsilon"] is not None and out["noise_multiplier"] is not None:
      raise SpecError(
        f"target_epsilon={out['target_epsilon']} and noise_multiplier="
        f"{out['noise_multiplier']} contradict each other: set one of them to None"
      )
    if kind.scaled and out["target_epsilon"] is None and out["noise_multiplier"] is None:
      raise SpecError("private=True needs target_epsilon or noise_multiplier (both are None)")
    own = kind.config_keys[0] if kind.config_keys else None
    if not kind.scaled and out["target_epsilon"] is None and (own is None or out[own] is None):
      raise SpecError(
        f"mechanism={kind.name!r} needs {own or 'its settings'} (its parameters) or "
        "target_epsilon (to search them)"
      )
    if kind.norm == "l1" and out["l1_clip_norm"] is None:
      raise SpecError(
        f"mechanism={out['mechanism']!r} needs l1_clip_norm (its noise is "
        "calibrated to the L1 sensitivity; L2 clipping does not bound it)"
      )
    if out["mf_bands"] > 1 or out["mf_strategy"] == "blt":
      _check_bandmf(out)
    if out["adaptive_clipping"] is not None:
      _check_adaptive(out)
    if (
      out["privacy_unit"] == "user"
      and out["user_sampling"] == "uls"
      and out["users_per_step"] is None
      and out["sampling_rate"] is None
    ):
      raise SpecError("user_sampling='uls' needs users_per_step or sampling_rate")
  else:
    if out["privacy_unit"] != "example":
      raise SpecError("privacy_unit='user' needs private=True")
    set_here = [  # batch_size sets a non-private run's batch too
      k.name
      for k in KEYS
      if k.privacy
      and k.name != "batch_size"
      and k.name in raw
      and raw[k.name] is not None
      and raw[k.name] != k.default
    ]
    if set_here:
      warnings.warn(
        f"private=False ignores {', '.join(set_here)} (the run is not private and "
        "reports no epsilon)",
        UserWarning,
        stacklevel=3,
      )
  if out["dp_sam"] is not None:
    out["dp_sam"] = _check_dp_sam(out["dp_sam"], out["private"])
  if out["weight_anchor"] is not None:
    wd = out["weight_anchor"]
    if set(wd) != {"lam", "reference"}:
      raise SpecError(f"weight_anchor takes lam and reference; got {sorted(wd)}")
    if not (_number(wd["lam"]) and wd["lam"] >= 0):
      raise SpecError(f"weight_anchor.lam must be a finite number >= 0, got {wd['lam']!r}")
    ref = wd["reference"]
    if not (ref == "init" or (isinstance(ref, str) and os.path.isfile(ref))):
      raise SpecError(f"weight_anchor.reference must be 'init' or an existing file, got {ref!r}")
  if out["learning_rates"] is not None:
    for prefix, rate in out["learning_rates"].items():
      if not (isinstance(prefix, str) and prefix and _number(rate) and rate > 0):
        raise SpecError(
          "learning_rates maps non-empty parameter-name prefixes to finite rates > 0, got "
          f"{prefix!r}: {rate!r}"
        )
  if out["lmo_grid"] is not None:
    unknown = sorted(set(out["lmo_grid"]) - set(LMO_GRID_KEYS))
    if unknown:
      raise SpecError(f"lmo_grid takes {', '.join(LMO_GRID_KEYS)}; got unknown {unknown[0]!r}")
  return Spec(out)


PRIVACY_KEYS: Tuple[str, ...] = tuple(k.name for k in KEYS if k.privacy)


def _applies(name: str, spec) -> bool:
  """Whether privacy key `name` shapes the releases of `spec` (a value that does not is None)."""
  kind = mechanisms.get(spec["mechanism"])
  own = kind.config_keys  # its settings, then what searches them (read without settings)
  if any(name in mechanisms.get(m).config_keys for m in mechanisms.names()):
    return name in own and (name == own[0] or spec[own[0]] is None)
  user, l1 = spec["privacy_unit"] == "user", kind.norm == "l1"
  blt = spec["mf_strategy"] == "blt"
  return {
    "user_sampling": user,
    "max_examples_per_user": user,
    "users_per_step": user and spec["user_sampling"] == "uls" and spec["sampling_rate"] is None,
    "batch_size": spec["sampling_rate"] is None and not (user and spec["user_sampling"] == "uls"),
    "l2_clip_norm": not l1,
    "l1_clip_norm": l1,
    "mf_strategy": spec["mf_bands"] > 1 or blt,
    "mf_buffers": blt,
  }.get(name, True)


class _PrivacyFields:
  """`PrivacySpec`'s methods (its fields come from the key table)."""

  def to_dict(self) -> Dict[str, Any]:
    """{key: value} over the privacy keys, as `Segment.origin` records them."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# What the guarantee of a private spec depends on, one frozen value: a keyword-only field per
# key marked `privacy` in the key table (`dpjax.training.keys`), the inapplicable None.
PrivacySpec = dataclasses.make_dataclass(
  "PrivacySpec",
  [(name, Any) for name in PRIVACY_KEYS],
  bases=(_PrivacyFields,),
  frozen=True,
  kw_only=True,
)
PrivacySpec.__module__ = __name__
PrivacySpec.__doc__ = (
  "What the guarantee of a private spec depends on: every privacy key (a frozen, "
  "keyword-only field each, from the key table), the inapplicable None. Made by "
  "`privacy_spec`."
)


def privacy_spec(spec) -> PrivacySpec:
  """What the guarantee of a private spec depends on: every privacy key, the inapplicable None.

  The one definition of a privacy change: the ledger's segment keeps it
  (`Segment.origin`: `PrivacySpec.to_dict()`, with what the plan derives
  from it: the fitted strategy, the calibration's horizon, the data's
  identity), and a resume whose privacy spec differs is refused unless
  allowed, then appends a segment. Keys with `privacy=False` say in
  `Key.why` why they cannot change a release.

  Args:
    spec: a validated spec (`validate`).

  Returns:
    The frozen PrivacySpec (plain dicts for dict values).
  """
  out = {}
  for name in PRIVACY_KEYS:
    v = spec[name] if _applies(name, spec) else None
    out[name] = v.to_dict() if hasattr(v, "to_dict") else (dict(v) if isinstance(v, dict) else v)
  return PrivacySpec(**out)


def _check_bandmf(out: Dict[str, Any]) -> None:
  b = out["mf_bands"]
  what = "mf_strategy='blt'" if out["mf_strategy"] == "blt" else f"mf_bands={b}"
  if out["mechanism"] != "gaussian":
    raise SpecError(f"{what} needs mechanism 'gaussian', got {out['mechanism']!r}")
  if out["privacy_unit"] != "example":
    raise SpecError(f"{what} needs privacy_unit 'example', got {out['privacy_unit']!r}")
  if out["optimizer"] == "adam_bc":
    raise SpecError(
      f"{what} with optimizer 'adam_bc': the correlated noise's variance changes from "
      "step to step; use adam, adamw or sgd"
    )
  if b > out["steps"]:
    raise SpecError(f"mf_bands={b} exceeds steps={out['steps']}: use at most one band per step")
  if out["mf_strategy"] == "blt" and out["mf_buffers"] > out["steps"]:
    raise SpecError(
      f"mf_buffers={out['mf_buffers']} exceeds steps={out['steps']}: BLT keeps m buffers of "
      "the parameters' size, more than one per step buys nothing"
    )
  if out["dp_sam"] and out["dp_sam"].get("mode", "free") == "charged":
    raise SpecError(f"{what} cannot charge DP-SAM ascent releases (dp_sam.mode='charged')")


LMO_GRID_KEYS = ("a", "theta_k", "lam", "Ub_Ua")  # dpjax.methods.lmo_search.PAPER_GRID's
ADAPTIVE_DEFAULTS = {"target_quantile": 0.5, "learning_rate": 0.2, "count_noise": None}


def _check_adaptive(out: Dict[str, Any]) -> None:
  a = out["adaptive_clipping"]
  unknown = sorted(set(a) - set(ADAPTIVE_DEFAULTS))
  if unknown:
    raise SpecError(
      f"adaptive_clipping takes {', '.join(ADAPTIVE_DEFAULTS)}; got unknown {unknown[0]!r}"
    )
  a = out["adaptive_clipping"] = dict(ADAPTIVE_DEFAULTS, **a)
  gamma, eta, sb = a["target_quantile"], a["learning_rate"], a["count_noise"]
  if not (isinstance(gamma, (int, float)) and 0 < gamma < 1):
    raise SpecError(f"adaptive_clipping.target_quantile must be in (0, 1), got {gamma!r}")
  if not (isinstance(eta, (int, float)) and eta > 0 and math.isfinite(eta)):
    raise SpecError(f"adaptive_clipping.learning_rate must be finite and > 0, got {eta!r}")
  if sb is not None and not (isinstance(sb, (int, float)) and sb > 0 and math.isfinite(sb)):
    raise SpecError(f"adaptive_clipping.count_noise must be finite and > 0 or None, got {sb!r}")
  for bad, why in (
    (out["mechanism"] != "gaussian", f"needs mechanism 'gaussian', got {out['mechanism']!r}"),
    (
      out["automatic_clipping"] is not None,
      f"and automatic_clipping={out['automatic_clipping']!r}: automatic clipping has no "
      "clip norm to adapt; set one of them to None",
    ),
    (
      out["mf_bands"] > 1 or out["mf_strategy"] == "blt",
      f"is not analysed with correlated noise (mf_bands={out['mf_bands']}, "
      f"mf_strategy={out['mf_strategy']!r})",
    ),
  ):
    if bad:
      raise SpecError(f"adaptive_clipping {why}")
  if out["dp_sam"] and out["dp_sam"].get("mode", "free") == "charged":
    raise SpecError(
      "adaptive_clipping cannot charge DP-SAM ascent releases (dp_sam.mode='charged')"
    )


def _number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# dp_sam's keys besides rho, with the defaults a run uses (filled by `validate`: read
# nowhere else).
DP_SAM_DEFAULTS = {"mode": "free", "active_fraction": 0.5, "layerwise": True}


def _check_dp_sam(spec: Dict[str, Any], private: bool) -> Dict[str, Any]:
  """dp_sam checked, with every key present (`DP_SAM_DEFAULTS` where the config sets none)."""
  unknown = set(spec) - {"rho", *DP_SAM_DEFAULTS}
  if unknown or "rho" not in spec:
    raise SpecError(f"dp_sam takes rho, {', '.join(DP_SAM_DEFAULTS)}; got {sorted(spec)}")
  spec = {**DP_SAM_DEFAULTS, **spec}
  if not (_number(spec["rho"]) and spec["rho"] >= 0):
    raise SpecError(f"dp_sam.rho must be a finite number >= 0, got {spec['rho']!r}")
  if not isinstance(spec["layerwise"], bool):
    raise SpecError(f"dp_sam.layerwise must be True or False, got {spec['layerwise']!r}")
  frac = spec["active_fraction"]
  if not (_number(frac) and 0 <= frac <= 1):
    raise SpecError(f"dp_sam.active_fraction must be in [0, 1], got {frac!r}")
  if spec["mode"] not in ("free", "charged"):
    raise SpecError(f"dp_sam.mode must be one of 'free', 'charged', got {spec['mode']!r}")
  if spec["mode"] == "charged" and not private:
    raise SpecError("dp_sam mode='charged' privatises an ascent gradient: needs private=True")
  return spec


def describe(cfg=None) -> List[str]:
  """One line per key: name, default (and the config's value where it differs), what it does.

  Args:
    cfg: a config to compare with the defaults, or None.

  Returns:
    The lines.
  """
  raw = _plain(cfg) if cfg is not None else {}
  lines = []
  for k in KEYS:
    if k.name == "task":
      continue
    line = f"{k.name:22s} default {k.default!r}"
    if k.name in raw and raw[k.name] != k.default:
      line += f" (this config: {raw[k.name]!r})"
    lines.append(f"{line}  -- {k.doc}")
  return lines
