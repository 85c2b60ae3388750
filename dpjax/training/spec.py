"""The training spec: every key the loop reads, declared once with its default, type and range.

A config file (`get_config()`) sets some keys; `with_defaults` fills the
rest, so every key is settable with `--set`; `validate` checks each value
and the contradictions between them and returns a frozen copy. Errors are
`SpecError`s of one line: the key, the value given, what is allowed.
`dpjax config` prints the table.

The `task` section is the task builder's (`dpjax.tasks`): its keys are
checked against what the config file declares, not here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import ml_collections

from dpjax.core import mechanisms
from dpjax.core.checks import MAX_RELEASES, MAX_TARGET_EPSILON

ACCOUNTANT_NAMES = ("pld", "rdp", "edgeworth", "edgeworth-bound")


class SpecError(ValueError):
  """A config value that is not allowed (one line: key, value, what is allowed)."""


@dataclasses.dataclass(frozen=True)
class Key:
  name: str
  default: Any
  kind: Tuple[type, ...]  # allowed Python types of a non-None value
  doc: str
  optional: bool = False  # None allowed
  choices: Optional[Any] = None  # a tuple, or a function giving it (registered names)
  check: Optional[Callable[[Any], bool]] = None
  allowed: str = ""  # how to say what `check` allows
  why: str = ""  # one line: why the key does (or does not) change the guarantee
  privacy: bool = False  # changes a release or its accounting (the privacy spec holds it)
  run_control: bool = False  # may change when a run resumes

  def options(self) -> Optional[Tuple]:
    """The allowed values (`choices`, called if it is a function), or None (any of `kind`)."""
    return self.choices() if callable(self.choices) else self.choices


_pos = (lambda v: v > 0 and math.isfinite(v), "finite and > 0")
_nonneg = (lambda v: v >= 0 and math.isfinite(v), "finite and >= 0")
_ge1 = (lambda v: v >= 1, ">= 1")
_unit = (lambda v: 0 < v < 1, "in (0, 1)")
_rate = (lambda v: 1e-12 <= v <= 1, "in [1e-12, 1]")
_norm = (lambda v: 0 < v <= 1e9, "finite, > 0 and <= 1e9 (float32 sums overflow beyond)")
_NUM, _INT, _STR, _DICT = (int, float), (int,), (str,), (dict, ml_collections.ConfigDict)

METRIC_WRITERS = ("jsonl", "tensorboard")


def _writers_ok(value: str) -> bool:
  names = value.split(",")
  if not names or any(n not in METRIC_WRITERS for n in names) or len(set(names)) < len(names):
    return False
  return "tensorboard" not in names or importlib.util.find_spec("tensorboardX") is not None


KEYS: Tuple[Key, ...] = (
  Key(
    "task",
    None,
    _DICT,
    "the task section (see dpjax.tasks)",
    why="the data and model: a resume never changes it; the ledger keeps it as the data's identity",
  ),
  Key(
    "private",
    True,
    (bool,),
    "train with DP-SGD (False: the non-private baseline)",
    why="a private run's ledger never continues without noise: turning it off is refused",
  ),
  Key(
    "privacy_unit",
    "example",
    _STR,
    "what one neighbour adds or removes",
    choices=("example", "user"),
    why="the neighbouring relation the epsilon is stated for",
    privacy=True,
  ),
  Key(
    "user_sampling",
    "uls",
    _STR,
    "user level: sample examples (els) or users (uls)",
    choices=("els", "uls"),
    why="which user-level mechanism runs (ELS or ULS) and its accountant",
    privacy=True,
  ),
  Key(
    "max_examples_per_user",
    "median",
    (int, str),
    "user level: cap G on each user's examples, an integer >= 1 or 'median'",
    check=lambda v: v == "median" if isinstance(v, str) else v >= 1,
    allowed="an integer >= 1 or 'median'",
    why="G bounds a user's contribution: the sensitivity per user",
    privacy=True,
  ),
  Key(
    "users_per_step",
    None,
    _NUM,
    "ULS: expected users per step (sets the user sampling rate)",
    optional=True,
    check=_pos[0],
    allowed=_pos[1],
    why="sets the users' sampling rate q",
    privacy=True,
  ),
  Key(
    "target_epsilon",
    None,
    _NUM,
    "epsilon the noise is calibrated to (whole run)",
    optional=True,
    check=lambda v: 0 < v <= MAX_TARGET_EPSILON,
    allowed=f"in (0, {MAX_TARGET_EPSILON:g}] (calibration beyond it outgrows the accountant's "
    "grid, and no meaningful guarantee remains)",
    why="chooses the noise multiplier (calibrated over the run)",
    privacy=True,
  ),
  Key(
    "noise_multiplier",
    None,
    _NUM,
    "sigma given directly (instead of target_epsilon)",
    optional=True,
    check=_pos[0],
    allowed=_pos[1],
    why="the noise of every release",
    privacy=True,
  ),
  Key(
    "delta",
    1e-5,
    _NUM,
    "delta of every epsilon reported",
    check=_unit[0],
    allowed=_unit[1],
    why="the delta every epsilon is stated at (and calibrated for)",
    privacy=True,
  ),
  Key(
    "accountant",
    "pld",
    _STR,
    "pld | rdp (bounds), edgeworth (an estimate; PLD reported beside it), edgeworth-bound",
    choices=ACCOUNTANT_NAMES,
    why="how the releases are composed and the noise calibrated",
    privacy=True,
  ),
  Key(
    "mechanism",
    "gaussian",
    _STR,
    "gaussian (L2 clipping) | laplace | lmo (L1 clipping) | a registered one "
    "(dpjax.mechanisms.register)",
    choices=mechanisms.names,
    why="the noise distribution and the norm it is calibrated to",
    privacy=True,
  ),
  Key(
    "mf_bands",
    1,
    _INT,
    "BandMF: bands b of the correlated Gaussian noise (1: DP-SGD); b > 1 splits the "
    "examples into b groups sampled in turn (cyclic Poisson, arXiv 2306.08153); with "
    "mf_strategy='blt' the groups alone (a unit's steps are then b apart)",
    check=_ge1[0],
    allowed=_ge1[1],
    why="the correlated noise and the cyclic groups that sample the units",
    privacy=True,
  ),
  Key(
    "mf_strategy",
    "optimal",
    _STR,
    "BandMF strategy: optimal (least mean prefix-sum error over the run) | sqrt (closed "
    "form) | blt (buffered linear Toeplitz noise, mf_buffers buffers, accounted as one "
    "Gaussian mechanism at its min-separation sensitivity: no amplification)",
    choices=("optimal", "sqrt", "blt"),
    why="the correlation of the noise across steps",
    privacy=True,
  ),
  Key(
    "mf_buffers",
    4,
    _INT,
    "BLT: the buffers m of the noise (m x params of memory), with mf_strategy='blt'",
    check=_ge1[0],
    allowed=_ge1[1],
    why="BLT's noise correlation (its sensitivity)",
    privacy=True,
  ),
  Key(
    "l2_clip_norm",
    1.0,
    _NUM,
    "per-unit L2 clip norm (gaussian)",
    check=_norm[0],
    allowed=_norm[1],
    why="the L2 sensitivity the Gaussian noise is scaled to",
    privacy=True,
  ),
  Key(
    "automatic_clipping",
    None,
    _NUM,
    "automatic clipping's stability gamma: each unit's gradient becomes "
    "C g / (||g|| + gamma) instead of clipped (arXiv 2206.07136; None: clip)",
    optional=True,
    check=_pos[0],
    allowed=_pos[1],
    why="each unit's gradient scaling, its sensitivity",
    privacy=True,
  ),
  Key(
    "adaptive_clipping",
    None,
    _DICT,
    "adaptive quantile clipping (arXiv 1905.03871), l2_clip_norm its start: "
    "{'target_quantile': 0.5, 'learning_rate': 0.2, 'count_noise': None (expected batch / 20)}; "
    "the noised count is accounted in the noise multiplier",
    optional=True,
    why="the clip norm's path and the noised count released each step",
    privacy=True,
  ),
  Key(
    "l1_clip_norm",
    None,
    _NUM,
    "per-unit L1 clip norm (laplace, lmo)",
    optional=True,
    check=_norm[0],
    allowed=_norm[1],
    why="the L1 sensitivity the Laplace or LMO noise is scaled to",
    privacy=True,
  ),
  Key(
    "batch_size",
    256,
    _NUM,
    "expected units per step (sampling_rate = batch_size / N)",
    check=lambda v: 1 <= v < math.inf,
    allowed="finite and >= 1 (expected units per step)",
    why="sets the sampling rate q = batch_size / N",
    privacy=True,
  ),
  Key(
    "sampling_rate",
    None,
    _NUM,
    "Poisson rate per unit (instead of batch_size / N)",
    optional=True,
    check=_rate[0],
    allowed=_rate[1],
    why="the Poisson rate of every release",
    privacy=True,
  ),
  Key(
    "physical_batch_size",
    128,
    _INT,
    "rows per compiled batch (accumulated to a step)",
    check=_ge1[0],
    allowed=_ge1[1],
    why="rows per compiled batch: the same logical batch, the same sum",
    run_control=True,
  ),
  Key(
    "microbatch_size",
    None,
    _INT,
    "units per vmap inside a physical batch",
    optional=True,
    check=_ge1[0],
    allowed=_ge1[1],
    why="units per vmap: the same sum",
    run_control=True,
  ),
  Key(
    "clipping_method",
    "vmap",
    _STR,
    "vmap | ghost (the same sums, one backward pass)",
    choices=("vmap", "ghost"),
    why="vmap and ghost give the same clipped sums (same sensitivity)",
  ),
  Key(
    "steps",
    100,
    _INT,
    "training steps of the whole run",
    check=lambda v: 1 <= v <= MAX_RELEASES,
    allowed=f"in [1, {MAX_RELEASES}] (the most releases one ledger composes)",
    why="the run's length; with target_epsilon the noise depends on it (kept as its horizon)",
    run_control=True,
  ),
  Key(
    "optimizer",
    "adam",
    _STR,
    "adam | adamw | adam_bc (DP-AdamBC: the noise variance removed from Adam's 2nd moment) | sgd",
    choices=("adam", "adamw", "adam_bc", "sgd"),
    why="post-processing of the noised sum",
  ),
  Key(
    "learning_rate",
    1e-3,
    _NUM,
    "learning rate",
    check=_pos[0],
    allowed=_pos[1],
    why="post-processing of the noised sum",
  ),
  Key(
    "learning_rates",
    None,
    _DICT,
    "own learning rate per top-level parameter-name prefix, e.g. {'layer_': 1e-3}",
    optional=True,
    why="post-processing of the noised sum",
  ),
  Key(
    "weight_decay",
    0.0,
    _NUM,
    "adamw weight decay",
    check=_nonneg[0],
    allowed=_nonneg[1],
    why="post-processing of the noised sum",
  ),
  Key(
    "warmup_steps",
    0,
    _INT,
    "warm-up then cosine decay (0: constant rate)",
    check=lambda v: v >= 0,
    allowed=">= 0",
    why="post-processing of the noised sum",
  ),
  Key(
    "seed",
    0,
    _INT,
    "initialisation, splits and shuffles (public; never the noise)",
    why="initialisation, splits, shuffles, a user's kept examples: public, never the noise",
  ),
  Key(
    "noise_seed",
    None,
    _INT,
    "fix the noise and sampling randomness (research only: the guarantee then assumes "
    "this seed is secret); None: OS entropy",
    optional=True,
    why="makes a fresh run's secret (never written out); a resume uses the checkpoint's",
    run_control=True,
  ),
  Key(
    "log_every",
    20,
    _INT,
    "steps between metric rows",
    check=_ge1[0],
    allowed=_ge1[1],
    why="when metrics are written, not what is released",
    run_control=True,
  ),
  Key(
    "metric_writers",
    "jsonl",
    _STR,
    "where metric rows go, comma-separated: jsonl (metrics.jsonl, curves.png), tensorboard "
    "(WORKDIR/tensorboard, needs `pip install tensorboardX`)",
    check=lambda v: _writers_ok(v),
    allowed="comma-separated names from jsonl, tensorboard (tensorboard needs tensorboardX)",
    why="where metrics are written",
    run_control=True,
  ),
  Key(
    "checkpoint_every",
    100,
    _INT,
    "steps between checkpoints",
    check=_ge1[0],
    allowed=_ge1[1],
    why="when the state is saved",
    run_control=True,
  ),
  Key(
    "data_devices",
    1,
    _INT,
    "devices on the mesh's data axis",
    check=_ge1[0],
    allowed=_ge1[1],
    why="placement: noise is added once to the global sum",
    run_control=True,
  ),
  Key(
    "model_devices",
    1,
    _INT,
    "devices on the mesh's model axis (FSDP-style)",
    check=_ge1[0],
    allowed=_ge1[1],
    why="placement: noise is added once to the global sum",
    run_control=True,
  ),
  Key(
    "dp_sam",
    None,
    _DICT,
    "DP-Flat's min-max: {'rho': .., 'mode': 'free'|'charged', "
    "'active_fraction': 0.5, 'layerwise': True}",
    optional=True,
    why="the charged mode releases a noised ascent gradient per step; rho shapes each release",
    privacy=True,
  ),
  Key(
    "weight_distillation",
    None,
    _DICT,
    "DP-Flat's weight distillation: {'lam': .., 'reference': 'init' | path}",
    optional=True,
    why="changes the loss whose per-unit gradient is clipped, not the sensitivity",
  ),
  Key(
    "lmo",
    None,
    _DICT,
    "LMO-DP noise parameters (LMOParams fields); None: searched for target_epsilon",
    optional=True,
    why="the LMO noise distribution",
    privacy=True,
  ),
  Key(
    "lmo_grid",
    None,
    _DICT,
    "LMO search grid overrides",
    optional=True,
    why="the LMO search that chooses the noise",
    privacy=True,
  ),
  Key(
    "lmo_objective",
    "abs",
    _STR,
    "LMO search objective",
    choices=("abs", "var"),
    why="the LMO search that chooses the noise",
    privacy=True,
  ),
)
BY_NAME: Dict[str, Key] = {k.name: k for k in KEYS}
RUN_CONTROL = frozenset(k.name for k in KEYS if k.run_control)


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
  if out["weight_distillation"] is not None:
    wd = out["weight_distillation"]
    if set(wd) != {"lam", "reference"}:
      raise SpecError(f"weight_distillation takes lam and reference; got {sorted(wd)}")
    if not (_number(wd["lam"]) and wd["lam"] >= 0):
      raise SpecError(f"weight_distillation.lam must be a finite number >= 0, got {wd['lam']!r}")
    ref = wd["reference"]
    if not (ref == "init" or (isinstance(ref, str) and os.path.isfile(ref))):
      raise SpecError(
        f"weight_distillation.reference must be 'init' or an existing file, got {ref!r}"
      )
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


def privacy_spec(spec) -> Dict[str, Any]:
  """What the guarantee of a private spec depends on: every privacy key, the inapplicable None.

  The one definition of a privacy change: the ledger's segment keeps this
  (`Segment.origin`, with what the plan derives from it: the fitted
  strategy, the calibration's horizon, the data's identity), and a resume
  whose privacy spec differs is refused unless allowed, then appends a
  segment. Keys with `privacy=False` say in `Key.why` why they cannot change
  a release.

  Args:
    spec: a validated spec (`validate`).

  Returns:
    {key: value} over `PRIVACY_KEYS` (plain dicts for dict values).
  """
  out = {}
  for name in PRIVACY_KEYS:
    v = spec[name] if _applies(name, spec) else None
    out[name] = v.to_dict() if hasattr(v, "to_dict") else (dict(v) if isinstance(v, dict) else v)
  return out


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
