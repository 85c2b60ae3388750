"""The key table: every key a train config may set, with its default, type, range and why.

One `Key` per key (`KEYS`, by name in `BY_NAME`): its type, its allowed values
(`choices`, or `check` with the words `allowed`), whether it changes a release
or its accounting (`privacy`: the privacy spec holds it) and one line saying why
it does or does not. `dpjax.training.spec` checks configs against it;
`dpjax config` prints it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any, Callable, Dict, Optional, Tuple

import ml_collections

from dpjax.core import mechanisms
from dpjax.core.accounting import accountants
from dpjax.core.checks import MAX_RELEASES, MAX_TARGET_EPSILON


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

# Metric writers and the optional module each needs (None: none).
METRIC_WRITERS = {"jsonl": None, "tensorboard": "tensorboardX", "wandb": "wandb"}


def _writers_ok(value: str) -> bool:
  names = value.split(",")
  if not names or any(n not in METRIC_WRITERS for n in names) or len(set(names)) < len(names):
    return False
  needs = [METRIC_WRITERS[n] for n in names if METRIC_WRITERS[n]]
  return all(importlib.util.find_spec(m) is not None for m in needs)


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
    "pld | rdp (bounds), edgeworth (an estimate; PLD reported beside it), edgeworth-bound | "
    "a registered one (dpjax.core.accounting.accountants.register)",
    choices=accountants.names,
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
    "expected units per step (sampling_rate = batch_size / N); None: follows the data, "
    "N / 8 capped at 1024",
    optional=True,
    check=lambda v: 1 <= v < math.inf,
    allowed="finite and >= 1 (expected units per step), or None (N / 8, at most 1024)",
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
    "(WORKDIR/tensorboard, needs `pip install tensorboardX`), wandb (Weights & Biases, needs "
    "`pip install 'dpjax[wandb]'`; WANDB_MODE=offline keeps it under WORKDIR/wandb)",
    check=lambda v: _writers_ok(v),
    allowed="comma-separated names from jsonl, tensorboard, wandb (tensorboard needs "
    "tensorboardX, wandb needs wandb)",
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
    "weight_anchor",
    None,
    _DICT,
    "lam * ||theta - reference|| added to each example's loss (DP-Flat's weight knowledge "
    "distillation): {'lam': .., 'reference': 'init' | path}",
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
