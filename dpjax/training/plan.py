"""Making the privacy plan: a validated spec turned, once, into everything privacy-relevant.

`make_plan(spec, task, secret=...)` decides the sampler (Poisson over
examples, ELS or ULS over users), the clipped-gradient function, the noise
mechanism and its multiplier (given, or calibrated to the target epsilon
against what the ledger has already spent), the expected batch size, the
privacy unit and the accountant, and returns the `PrivacyPlan`
(`dpjax.training.privacy_plan`, with the run's `Secret`). The loop consumes
the plan; `dpjax account`, DistilDP's budget and the experiments read
epsilon only through `PrivacyPlan.ledger_at` and `Ledger.epsilon`.

What a segment depends on is defined once, `dpjax.training.spec.privacy_spec`
(the keys marked `privacy`), kept in the segment's `origin`; the resume
check compares segments and nothing else.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Dict, NamedTuple, Optional

from dpjax.core import accounting, mechanisms
from dpjax.core.accounting.calibrate import UnreachableTarget, calibrate_scale
from dpjax.core.accounting.ledger import Ledger, changes
from dpjax.core.clipping import clipped_grad, group_mean
from dpjax.core.matrix_factorization import FITTED, blt_strategy, strategy
from dpjax.core.mechanisms import (
  BLT,
  LMO,
  AdaptiveGaussian,
  BandMF,
  Mechanism,
  gradient_noise_multiplier,
)
from dpjax.core.sampling import (
  CyclicPoissonSampler,
  ELSSampler,
  PoissonSampler,
  ShuffledSampler,
  ULSSampler,
  bound_contributions,
  median_group_size,
)
from dpjax.methods import flatness
from dpjax.methods.lmo_search import lmo_search
from dpjax.training import spec as spec_lib
from dpjax.training.privacy_plan import (
  PRIVATE_EXTRA_ARGS,
  PrivacyPlan,
  Secret,
  guarantee_note,
  segment_stream,
)
from dpjax.training.spec import SpecError

__all__ = [  # the plan's object and its entropy are the privacy_plan module's, named here too
  "PRIVATE_EXTRA_ARGS",
  "BudgetExhausted",
  "PrivacyPlan",
  "ResumeRefused",
  "Secret",
  "batch_size_for",
  "check_sizes",
  "guarantee_note",
  "make_grad_fn",
  "make_plan",
  "segment_stream",
]


# A resume whose calibrated noise exceeds this multiple of the first segment's is warned of.
NOISE_JUMP = 10.0


class ResumeRefused(ValueError):
  """A resume would change what the ledger's last segment released, and was not allowed."""


class BudgetExhausted(ValueError):
  """The target epsilon is already spent, or the remaining steps cannot fit in it."""


class _Units(NamedTuple):
  """How a private plan samples its units: what the ledger records and the sampler."""

  unit: str  # "example" or "user"
  sampling: Optional[str]  # the user-level sampling ("els", "uls"), None for examples
  max_examples_per_user: int  # G (1 for example-level)
  sampler: Any
  q: Optional[float]  # the sampling rate, None without privacy
  expected: float  # expected logical batch, in examples
  num_units: int  # N: units the rate is over


# batch_size=None: the expected batch follows the data, N / AUTO_BATCH_DIVISOR units (at least
# one) capped at AUTO_BATCH_CAP: q = 1/8 up to 8,192 units, the quickstart's rate.
AUTO_BATCH_DIVISOR = 8
AUTO_BATCH_CAP = 1024


def batch_size_for(spec, num_units: int) -> float:
  """The expected batch of `spec` over `num_units` units: `batch_size`, or the data's share.

  Args:
    spec: a validated spec.
    num_units: N, the units the sampling rate is over.

  Returns:
    `spec.batch_size`, or for None min(AUTO_BATCH_CAP, max(1, N // AUTO_BATCH_DIVISOR)).
  """
  if spec.batch_size is not None:
    return spec.batch_size
  return float(min(AUTO_BATCH_CAP, max(1, num_units // AUTO_BATCH_DIVISOR)))


def check_sizes(spec, num_examples: int) -> None:
  """The plan's checks that need only the number of training examples, for a task builder to
  run as soon as its data is read (before computing anything from it).

  Example-level runs only (a user-level plan needs the users: its checks are the plan's).

  Args:
    spec: a validated spec.
    num_examples: N, the training examples.

  Raises:
    SpecError: a batch, a physical batch or a sampling rate the data cannot hold.
  """
  with warnings.catch_warnings():  # the plan warns once, later
    warnings.simplefilter("ignore")
    _unit_sampler(spec, None, 0, n=num_examples)


def _unit_sampler(spec, task, seed: int, *, n: Optional[int] = None) -> Optional[_Units]:
  """The units of `spec` on `task` (or on `n` examples) and their sampler, drawing from `seed`
  (None without a task for user-level units: they need the task's users)."""
  n = len(next(iter(task.train.values()))) if n is None else n
  if not spec.private:
    batch = int(batch_size_for(spec, n))
    if batch > n:
      raise SpecError(f"batch_size={batch} exceeds the {n} training examples")
    sampler = ShuffledSampler(n, batch, spec.seed)
    return _Units(spec.privacy_unit, None, 1, sampler, None, float(batch), n)
  if spec.physical_batch_size > n:  # rows no step can fill, allocated on every device
    raise SpecError(
      f"physical_batch_size={spec.physical_batch_size} exceeds the {n} training examples: "
      f"use at most {n} (a step never samples more)"
    )
  sampling = spec.user_sampling if spec.privacy_unit == "user" else None
  if task is None and sampling is not None:  # `check_sizes`: users are the plan's to check
    return None
  return SAMPLINGS[sampling](spec, task, seed, n)


def _examples(spec, task, seed: int, n: int) -> _Units:
  """Example-level: Poisson sampling, cyclic over b groups for BandMF/BLT."""
  bands = spec.mf_bands
  if bands > n:
    raise SpecError(f"mf_bands={bands} exceeds the {n} training examples (one group each)")
  # With b groups sampled in turn, q is the rate within a group: batch_size b / N.
  batch = batch_size_for(spec, n // bands)
  q = spec.sampling_rate or batch * bands / n
  if bands > 1 and not spec.sampling_rate and q > 1:
    raise SpecError(
      f"batch_size={batch:g} with mf_bands={bands} over {n} examples samples each "
      f"group of ~{n // bands} at rate {q:.4g} > 1: lower batch_size to at most {n // bands}"
    )
  _check_q(q, spec, n, "examples")
  if bands > 1:
    sampler = CyclicPoissonSampler(n, q, spec.physical_batch_size, seed, bands)
  else:
    sampler = PoissonSampler(n, q, spec.physical_batch_size, seed)
  return _Units("example", None, 1, sampler, q, sampler.expected_batch_size, n)


def _users(spec, task, n: int):
  """(G, the user index) of a user-level spec: each user capped to G examples."""
  if task.user_ids is None:
    raise SpecError(f"privacy_unit='user' needs a task with user_ids; task {task.name!r} has none")
  if len(task.user_ids) != n:
    raise SpecError(f"task.user_ids has {len(task.user_ids)} entries for {n} examples")
  G = spec.max_examples_per_user
  G = median_group_size(task.user_ids) if G == "median" else int(G)
  return G, bound_contributions(task.user_ids, G, spec.seed)


def _els(spec, task, seed: int, n: int) -> _Units:
  """Example-level sampling of the capped examples (ELS): a user's examples each drawn."""
  G, index = _users(spec, task, n)
  kept = len(index.kept_examples())
  q = spec.sampling_rate or batch_size_for(spec, kept) / kept
  _check_q(q, spec, kept, "kept examples")
  sampler = ELSSampler(index, q, spec.physical_batch_size, seed)
  return _Units("user", spec.user_sampling, G, sampler, q, sampler.expected_batch_size, kept)


def _uls(spec, task, seed: int, n: int) -> _Units:
  """User-level sampling (ULS): whole users drawn, their examples averaged into one unit."""
  G, index = _users(spec, task, n)
  units = len(index.users)
  q = spec.sampling_rate or spec.users_per_step / units
  _check_q(q, spec, units, "users")
  sampler = ULSSampler(index, q, spec.physical_batch_size, seed)
  return _Units("user", spec.user_sampling, G, sampler, q, sampler.expected_batch_size, units)


# The user-level sampling (None: example-level) -> the units it samples and how.
SAMPLINGS: Dict[Optional[str], Callable[..., _Units]] = {None: _examples, "els": _els, "uls": _uls}


def _check_q(q: float, spec, n: int, what: str) -> None:
  if not 0 < q <= 1:
    key = (
      "sampling_rate"
      if spec.sampling_rate
      else ("users_per_step" if what == "users" else "batch_size")
    )
    raise SpecError(
      f"sampling rate {q:.4g} from {key} with {n} {what} must be in (0, 1]: lower {key}"
    )
  if spec.delta >= 1.0 / n:
    warnings.warn(
      f"delta={spec.delta:g} >= 1/N = {1.0 / n:.3g} ({n} {what}): a mechanism that "
      "publishes one random unit in the clear meets that delta",
      UserWarning,
      stacklevel=3,
    )


def _sam(spec) -> Optional[flatness.DPSAM]:
  s = spec.dp_sam
  if not s:
    return None
  return flatness.dp_sam(  # every key present: `spec.DP_SAM_DEFAULTS` filled by validate
    s["rho"],
    mode=s["mode"],
    layerwise=s["layerwise"],
    active_steps=int(round(s["active_fraction"] * spec.steps)),
  )


def make_grad_fn(spec, loss_fn, per_user: bool):
  """The clipped-gradient function a private plan of `spec` uses, on `loss_fn`.

  Args:
    spec: a validated spec (clip norm, mechanism, clipping method, microbatch).
    loss_fn: a per-example `(params, example, frozen) -> (loss, metrics)`.
    per_user: whether a unit is a user's group of examples, averaged into
      one unit before clipping (user-level sampling; `PrivacyPlan.per_user`).

  Returns:
    The `clipped_grad` function (L1 clipping for a mechanism of `norm` "l1").
  """
  unit_loss = group_mean(loss_fn, has_aux=True) if per_user else loss_fn
  clip = (
    {"l1_clip_norm": spec.l1_clip_norm}
    if mechanisms.get(spec.mechanism).norm == "l1"
    else {"l2_clip_norm": spec.l2_clip_norm}
  )
  return clipped_grad(
    unit_loss,
    has_aux=True,
    microbatch_size=spec.microbatch_size,
    method=spec.clipping_method,
    automatic=spec.automatic_clipping,
    **clip,
  )


def _correlation(spec) -> Dict[str, Any]:
  """The plan's correlated-noise fields: bands b, BandMF's coefficients, BLT's buffers and
  parameters (b = 1 and none of them: independent noise)."""
  if not spec.private:
    return dict(bands=1, mf_coefs=None, mf_buffers=0, mf_blt=None)
  if spec.mf_strategy == "blt":
    blt = blt_strategy(
      spec.mf_buffers, spec.steps, spec.mf_bands, -(-int(spec.steps) // spec.mf_bands)
    )
    return dict(
      bands=int(spec.mf_bands),
      mf_coefs=None,
      mf_buffers=int(spec.mf_buffers),
      mf_blt=tuple(tuple(v.tolist()) for v in blt),
    )
  coefs = None
  if spec.mf_bands > 1:
    coefs = tuple(strategy(spec.mf_strategy, spec.mf_bands, spec.steps).tolist())
  return dict(bands=int(spec.mf_bands), mf_coefs=coefs, mf_buffers=0, mf_blt=None)


def _adaptive(spec, expected_batch_size: float) -> Optional[Dict[str, Any]]:
  """The adaptive clipping settings with the count noise resolved (B / 20 by default)."""
  if not spec.private or spec.adaptive_clipping is None:
    return None
  a = dict(spec.adaptive_clipping)
  if a["count_noise"] is None:  # the suggestion of arXiv 1905.03871
    a["count_noise"] = expected_batch_size / 20.0
  return a


def _candidate(plan_args: Dict[str, Any], mechanism: Optional[Mechanism]) -> PrivacyPlan:
  return PrivacyPlan(mechanism=mechanism, **plan_args)


def make_plan(
  spec,
  task,
  *,
  secret: Secret,
  prior: Ledger = Ledger(),
  start_step: int = 0,
  allow_privacy_change: bool = False,
  extra_event=None,
) -> PrivacyPlan:
  """The plan of `spec` on `task`, resuming at `start_step` after `prior` was released.

  Args:
    spec: a validated spec (`dpjax.training.spec.validate`).
    task: the `dpjax.training.task.Task`.
    secret: the run's noise and sampling entropy.
    prior: the ledger of what ran before (empty for a fresh run).
    start_step: the step the state resumes from.
    allow_privacy_change: let this plan's mechanism, sigma, q or unit differ
      from the last segment of `prior` (a new segment is appended; a target
      epsilon then calibrates the noise of the remaining steps against what
      `prior` already spent).
    extra_event: another release composed into the target (e.g. DistilDP's
      label histogram): the noise is calibrated so that it and the run meet
      `target_epsilon` together.

  Raises:
    SpecError: values that cannot work with this task's data.
    ResumeRefused: a resume would change the privacy of the ledger's last
      segment and `allow_privacy_change` is False.
    BudgetExhausted: `target_epsilon` is already spent, or the remaining steps
      cannot fit in it.

  Returns:
    The PrivacyPlan (noise calibrated when the spec sets a target epsilon).
  """
  if start_step > spec.steps:
    raise ResumeRefused(
      f"the checkpoint is at step {start_step}, past steps={spec.steps}: raise "
      "steps or use a new workdir"
    )
  seed = secret.sampling_seed()
  units = _unit_sampler(spec, task, seed)
  sam = _sam(spec)
  grad_fn = make_grad_fn(spec, task.loss_fn, units.sampler.per_user) if spec.private else None
  args = dict(
    private=bool(spec.private),
    sampling_rate=units.q,
    unit=units.unit,
    sampling=units.sampling,
    max_examples_per_user=units.max_examples_per_user,
    expected_batch_size=units.expected,
    accountant=spec.accountant,
    delta=spec.delta if spec.private else None,
    steps=int(spec.steps),
    start_step=int(start_step),
    num_units=units.num_units,
    sampler=units.sampler,
    grad_fn=grad_fn,
    sam=sam,
    secret=secret,
    prior=prior,
    **_correlation(spec),
    adaptive=_adaptive(spec, units.expected),
  )
  if not spec.private:
    if prior.segments:
      raise ResumeRefused(
        f"resuming at step {start_step} with private=False would continue a private run "
        f"without noise ({prior.steps} private steps in its ledger): use a new workdir"
      )
    return _candidate(args, None)
  try:
    mechanisms.get(spec.mechanism).check_accountant(units.unit, units.sampling, spec.accountant)
  except ValueError as e:
    raise SpecError(str(e)) from None

  args["origin"] = _origin(spec, args, extra_event)
  if not prior.segments:
    return _with_stream(_plan_noise(spec, args, prior, start_step, extra_event), spec, task)
  last = prior.segments[-1]
  # The plan continuing the last segment's noise: any field that differs is a privacy change.
  kind = mechanisms.get(spec.mechanism)
  if kind.scaled and last.mechanism == kind.name:  # this plan's noise at the last sigma
    same_noise = _candidate(args, _noise_family(kind, args)(last.noise_multiplier))
  else:
    same_noise = _candidate(args, last.noise)
  try:
    changed = last.differs_from(same_noise.segment(same_noise.steps))
    changed.pop("origin", None)  # said key by key below
  except ValueError:  # the last noise does not fit this plan: the origin says what changed
    changed = {}
  changed.update(changes(last.origin or {}, args["origin"]))
  if not changed:  # the same noise, chosen the same way: continue the last segment
    return _with_stream(same_noise, spec, task)
  said = ", ".join(f"{k}: {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in changed.items())
  if last.correlated or args["bands"] > 1 or args["mf_buffers"]:
    raise ResumeRefused(
      f"resuming at step {start_step} would change the privacy of a BandMF or BLT run ({said}): "
      "its noise is correlated across steps and its bound covers one unchanged run; use a new "
      "workdir"
    )
  if not allow_privacy_change:
    raise ResumeRefused(
      f"resuming at step {start_step} would change the privacy of what already ran ({said}); "
      "rerun with --allow-privacy-change (dpjax.train(..., allow_privacy_change=True)) to "
      "append a new ledger segment, or use a new workdir"
    )
  return _with_stream(_plan_noise(spec, args, prior, start_step, extra_event), spec, task)


def _with_stream(plan: PrivacyPlan, spec, task) -> PrivacyPlan:
  """`plan` drawing from its segment's stream: the sampler reseeded for it (`segment_stream`)."""
  if not plan.private:
    return plan
  seg = plan.segment(plan.steps)
  earlier = plan.prior.segments
  if earlier and earlier[-1].privacy_key() == seg.privacy_key():
    earlier = earlier[:-1]  # the plan continues the last segment
  stream = segment_stream(earlier, seg)
  if stream == plan.stream:
    return plan
  sampler = _unit_sampler(spec, task, plan.secret.sampling_seed(stream)).sampler
  return dataclasses.replace(plan, stream=stream, sampler=sampler)


def _origin(spec, args: Dict[str, Any], extra_event) -> Dict[str, Any]:
  """The segment's origin: the privacy spec and what the plan derives from it.

  `spec_lib.privacy_spec` (every privacy key) plus the fitted correlated-noise
  strategy, the horizon a calibrated noise was fitted over and what it was
  composed with, and the data's identity (the task section).
  """
  out = spec_lib.privacy_spec(spec).to_dict()
  out["task"] = spec.task.to_dict()
  if args["mf_blt"] is not None:  # a resume that refits the strategy changes the noise
    out["mf_blt"] = [list(v) for v in args["mf_blt"]]
  elif args["mf_coefs"] is not None and spec.mf_strategy in FITTED:
    out["mf_coefs"] = list(args["mf_coefs"])
  if args["bands"] > 1 or args["mf_buffers"]:
    out["mf_horizon"] = int(spec.steps) if spec.mf_strategy in FITTED else None
  if spec.noise_multiplier is None:  # calibrated: over the run's length, with what it composes
    out["steps"] = int(spec.steps)
    out["composed_with"] = repr(extra_event) if extra_event is not None else None
  return out


def _fmt(v) -> str:
  return f"{v:.4g}" if isinstance(v, float) else repr(v)


def _noise_family(kind, args: Dict[str, Any]) -> Callable[[float], Mechanism]:
  """sigma -> this plan's noise at sigma: the mechanism's, or the Gaussian's correlated
  (BLT, BandMF) or adaptive variant the plan's arguments call for."""
  if args["mf_buffers"]:
    return lambda s: BLT(s, blt=args["mf_blt"], steps=args["steps"], bands=args["bands"])
  if args["bands"] > 1:
    return lambda s: BandMF(s, coefs=args["mf_coefs"], steps=args["steps"])
  a = args["adaptive"]
  if a is not None:
    return lambda s: AdaptiveGaussian(
      s,
      count_noise=a["count_noise"],
      target_quantile=a["target_quantile"],
      learning_rate=a["learning_rate"],
      expected_batch_size=args["expected_batch_size"],
    )
  return kind.with_noise_multiplier


def _search_lmo(spec, args) -> Mechanism:
  """LMO-DP's parameters searched for the target epsilon (`dpjax.methods.lmo_search`)."""
  releases = _candidate(args, None).ascent_releases(0, spec.steps) + spec.steps
  found = lmo_search(
    spec.target_epsilon,
    spec.delta,
    args["sampling_rate"],
    releases,
    grid=dict(spec.lmo_grid) if spec.lmo_grid else None,
    objective=spec.lmo_objective,
    progress=True,
  )
  return LMO(found["params"])


# Mechanisms without a noise multiplier (not `Mechanism.scaled`) whose parameters a target
# epsilon searches: name -> search(spec, plan arguments) -> the mechanism.
SEARCHES = {"lmo": _search_lmo}


def _searched(kind, spec, args, prior: Ledger) -> Mechanism:
  key = kind.config_keys[0] if kind.config_keys else "its settings"
  if kind.name not in SEARCHES:
    raise SpecError(f"mechanism {kind.name!r} has no noise multiplier to calibrate: give {key}")
  if prior.segments:
    raise SpecError(
      f"{kind.name} parameters cannot be searched against a spent budget on resume; give "
      f"{key} explicitly"
    )
  return SEARCHES[kind.name](spec, args)


def _plan_noise(spec, args, prior: Ledger, start_step: int, extra_event) -> PrivacyPlan:
  """The plan with its noise: given, searched (LMO) or calibrated against `prior`."""
  args = dict(args, prior=prior, start_step=start_step)
  bound = accounting.bound_accountant(spec.accountant)
  target = spec.target_epsilon

  def total(plan: PrivacyPlan, accountant: str, coarse: bool = False) -> float:
    ledger = plan.ledger_at(plan.steps)
    if extra_event is None:
      return ledger.epsilon(spec.delta, accountant, coarse=coarse)
    return accounting.epsilon(
      accounting.compose([ledger.event(), extra_event]), spec.delta, accountant, coarse=coarse
    )

  if prior.segments and target is not None:
    spent = prior.epsilon(spec.delta, bound)
    if spent >= target:
      raise BudgetExhausted(
        f"target_epsilon={target:g} is already spent: the ledger holds "
        f"eps={spent:.4g} ({bound}) after {prior.steps} steps; remaining 0"
      )
  kind = mechanisms.get(spec.mechanism)
  family = _noise_family(kind, args)
  settings = spec[kind.config_keys[0]] if kind.config_keys else None
  if settings is not None:  # the mechanism's own parameters, given
    try:
      plan = _candidate(args, kind.from_settings(settings))
    except ValueError as e:
      raise SpecError(str(e)) from None
  elif not kind.scaled:  # no noise multiplier to calibrate: its parameters are searched
    plan = _candidate(args, _searched(kind, spec, args, prior))
  elif spec.noise_multiplier is not None:
    plan = _candidate(args, family(spec.noise_multiplier))
  else:
    if spec.accountant in accounting.ESTIMATES:
      warnings.warn(
        f"accountant={spec.accountant!r} gives an estimate, not an upper bound: the "
        f"noise it calibrates may give epsilon > {target}. The PLD epsilon of the "
        "noise used is reported as the guarantee.",
        UserWarning,
        stacklevel=3,
      )
    try:
      coarse = None
      if spec.accountant == "pld":  # bracket on the coarse PLD, certify on the reported one
        coarse = lambda s: total(_candidate(args, family(s)), spec.accountant, coarse=True)
      sigma = calibrate_scale(
        lambda s: total(_candidate(args, family(s)), spec.accountant),
        target,
        coarse=coarse,
      )
    except UnreachableTarget:
      if prior.segments:
        spent = prior.epsilon(spec.delta, bound)
        raise BudgetExhausted(
          f"target_epsilon={target:g}: {spent:.4g} spent after {prior.steps} steps, "
          f"{target - spent:.4g} remaining cannot cover the {spec.steps - start_step} steps "
          "left at any noise_multiplier <= 1e5: lower steps or raise target_epsilon"
        ) from None
      raise SpecError(
        f"target_epsilon={target:g} is unreachable with noise_multiplier <= 1e5 "
        f"(delta={spec.delta:g}, q={args['sampling_rate']:.4g}, "
        f"steps={spec.steps})"
      ) from None
    plan = _candidate(args, family(sigma))
    first = prior.segments[0].noise_multiplier if prior.segments else None
    if first and sigma > NOISE_JUMP * first:  # what is left of the budget buys little
      warnings.warn(
        f"the remaining target_epsilon={target:g} (after {prior.steps} steps) calibrates "
        f"noise_multiplier {sigma:.4g}, over {NOISE_JUMP:g}x the first segment's {first:.4g}: "
        f"the {spec.steps - start_step} steps left will hardly learn; raise target_epsilon "
        "or lower steps",
        UserWarning,
        stacklevel=3,
      )
  if target is not None and spec.accountant not in accounting.ESTIMATES:
    got = total(plan, bound)
    if got > target * (1 + 1e-9):
      raise BudgetExhausted(f"the run would spend eps={got:.4g} > target_epsilon={target:g}")
  if plan.adaptive is not None:
    try:
      gradient_noise_multiplier(plan.noise_multiplier, plan.adaptive["count_noise"])
    except ValueError as e:
      raise SpecError(f"adaptive_clipping.count_noise: {e}") from None
  return plan
