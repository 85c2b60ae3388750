"""The privacy ledger: what a run actually released, and the epsilon it composes to.

A run is a sequence of segments; within one segment every release is the
same mechanism with the same noise multiplier, sampling rate and privacy
unit. A resume that keeps all of them extends the last segment; one that
changes any of them (explicitly allowed) appends a new one. The epsilon a
run reports is always `Ledger.epsilon`: the composition of every segment's
`DpEvent` by one accountant, never a recomputation from the current config.

Formal guarantees:
  If each segment's releases are what its `event()` describes (add/remove of
  one unit; Poisson sampling with independent draws per release; noise keys
  never reused and secret), the whole run is `(Ledger.epsilon(delta), delta)`-DP
  for that unit, with the PLD or RDP accountant an upper bound.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Dict, Optional, Sequence, Tuple

import dp_accounting

from dpjax.core import checks
from dpjax.core.accounting import accountants
from dpjax.core.accounting import events as ev
from dpjax.core.mechanisms import base as mechanisms


@dataclasses.dataclass(frozen=True, kw_only=True)
class Segment:
  """Releases of one mechanism at one noise multiplier and one sampling rate.

  Attributes:
    mechanism: a registered mechanism's name (`dpjax.core.mechanisms`:
      "gaussian", "laplace", "lmo" or one a user registered); `noise`
      rebuilds it from this, `noise_multiplier` and `settings`.
    noise_multiplier: sigma (Gaussian), the Laplace scale / L1 sensitivity;
      0 for a mechanism whose noise is its `settings` (LMO).
    sampling_rate: Poisson rate per unit (per example for ELS).
    unit: "example" or "user".
    sampling: None (examples), "els" or "uls" (users).
    max_examples_per_user: the cap G on a user's examples (1 for examples).
    steps: training steps in the segment.
    extra_releases: privatised gradients beyond one per step (charged DP-SAM's
      ascent gradients: same mechanism, own Poisson draw and noise).
    accountant: the accountant the run was planned with.
    settings: the mechanism's parameters besides its noise multiplier
      (`Mechanism.settings()`: LMO-DP's `LMOParams.as_dict()`), or None.
    num_units: units the sampler drew from (informational).
    origin: the privacy spec the segment ran under
      (`dpjax.training.spec.privacy_spec`: every key that changes a release
      or its accounting, e.g. the clip norm, the target epsilon and the
      run's length it was calibrated over, the data's identity): a resume
      continues this segment only when it is unchanged.
    bands: b of BandMF's correlated noise (1: independent noise, DP-SGD);
      with b > 1 the steps compose as ceil(steps / b) DP-SGD steps
      (`events.bandmf_event`), which needs cyclic Poisson sampling over b
      groups, Gaussian noise, example-level units and no extra releases.
    mf_buffers: m of BLT noise (0: none). With m > 0 the whole segment is one
      Gaussian mechanism (`events.blt_event`): its noise was scaled to C x's
      sensitivity over `mf_horizon` steps, b = `bands` apart (min separation),
      so it covers at most `mf_horizon` steps; same restrictions as BandMF.
    mf_horizon: the steps the BLT noise was scaled for.
  """

  mechanism: str
  noise_multiplier: float
  sampling_rate: float
  unit: str = "example"
  sampling: Optional[str] = None
  max_examples_per_user: int = 1
  steps: int
  extra_releases: int = 0
  accountant: str = "pld"
  settings: Optional[Dict[str, float]] = None
  num_units: Optional[int] = None
  origin: Optional[Dict[str, Any]] = None
  bands: int = 1
  mf_buffers: int = 0
  mf_horizon: Optional[int] = None

  @property
  def correlated(self) -> bool:
    """Noise correlated across steps (BandMF or BLT): one unchanged run, nothing composed."""
    return self.bands > 1 or self.mf_buffers > 0

  @property
  def noise(self) -> mechanisms.Mechanism:
    """The segment's mechanism object (found by name in the registry)."""
    return mechanisms.from_json(
      {"name": self.mechanism, "noise_multiplier": self.noise_multiplier, "settings": self.settings}
    )

  def __post_init__(self):
    noise = self.noise  # an unknown name or bad parameters: ValueError
    checks.check_unit(self.unit, self.sampling, self.max_examples_per_user)
    type(noise).check_accountant(self.unit, self.sampling, self.accountant)
    checks.check_sampling_rate(self.sampling_rate)
    checks.check_steps(self.steps, minimum=0, name="segment steps")
    checks.check_steps(self.extra_releases, minimum=0, name="extra_releases")
    checks.check_steps(self.bands, name="bands")
    checks.check_steps(self.mf_buffers, minimum=0, name="mf_buffers")
    if self.correlated and (
      self.mechanism != "gaussian" or self.unit != "example" or self.extra_releases
    ):
      what = (
        f"mf_buffers={self.mf_buffers} (BLT)" if self.mf_buffers else f"bands={self.bands} (BandMF)"
      )
      raise ValueError(
        f"{what} needs mechanism 'gaussian', unit 'example' and no extra "
        f"releases, got {self.mechanism!r}, {self.unit!r}, {self.extra_releases}"
      )
    if self.mf_buffers and (self.mf_horizon is None or self.steps > self.mf_horizon):
      raise ValueError(
        f"a BLT segment of {self.steps} steps exceeds the mf_horizon={self.mf_horizon} its "
        "noise was scaled for"
      )

  @property
  def releases(self) -> int:
    return int(self.steps) + int(self.extra_releases)

  def privacy_key(self) -> Tuple:
    """The canonical privacy fields (all but the counts): two segments with equal keys are one."""
    return tuple(canonical(getattr(self, f)) for f in PRIVACY_FIELDS)

  def differs_from(self, other: Segment) -> Dict[str, Tuple[Any, Any]]:
    """The privacy fields that differ: name -> (self's value, other's value).

    Args:
      other: the segment compared with.

    Returns:
      {field: (self's value, other's value)} for each privacy field that differs.
    """
    mine, theirs = ({f: getattr(s, f) for f in PRIVACY_FIELDS} for s in (self, other))
    return changes(mine, theirs)

  def step_event(self) -> dp_accounting.DpEvent:
    """One release of this segment (its mechanism's event at its sampling rate)."""
    if self.unit == "user" and self.sampling == "els":
      return self.noise.user_step_event(self.sampling_rate, self.max_examples_per_user)
    return self.noise.step_event(self.sampling_rate)

  def event(self) -> dp_accounting.DpEvent:
    """All the segment's releases (descent steps and charged ascent steps alike)."""
    if self.releases == 0:
      return dp_accounting.NoOpDpEvent()
    if self.mf_buffers:
      return ev.blt_event(self.noise_multiplier)
    if self.bands > 1:
      return ev.bandmf_event(self.noise_multiplier, self.sampling_rate, self.steps, self.bands)
    return dp_accounting.SelfComposedDpEvent(self.step_event(), self.releases)

  def with_steps(self, steps: int, extra_releases: int) -> Segment:
    """This segment with its step and extra-release counts replaced.

    Args:
      steps: the new step count.
      extra_releases: the new count of releases beyond one per step.

    Returns:
      A new Segment (segments are immutable).
    """
    return dataclasses.replace(self, steps=int(steps), extra_releases=int(extra_releases))

  def to_json(self) -> Dict[str, Any]:
    """The segment as a JSON-ready dict (inverse of `from_json`)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: Dict[str, Any]) -> Segment:
    """The segment written by `to_json` (older files with `G` or `lmo` fields load too).

    Args:
      d: the dict read from privacy.json or a checkpoint.

    Returns:
      The Segment.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    old_names = {"G": "max_examples_per_user", "lmo": "settings"}  # earlier checkpoints' names
    d = {old_names.get(k, k): v for k, v in d.items()}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(f"unknown ledger segment fields {sorted(unknown)}")
    return cls(**d)


def changes(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
  """{key: (old value, new value)} for every key whose `canonical` values differ.

  Args:
    old: the values before (a missing key counts as None).
    new: the values after.

  Returns:
    The differing keys, in sorted order.
  """
  return {
    k: (old.get(k), new.get(k))
    for k in sorted(set(old) | set(new))
    if canonical(old.get(k)) != canonical(new.get(k))
  }


def canonical(v):
  """A comparable form of a segment field: numbers as floats, dicts as sorted tuples.

  Args:
    v: a field value (number, string, dict, list, None).

  Returns:
    A hashable value equal for equal settings (3 and 3.0 alike).
  """
  if isinstance(v, bool) or v is None or isinstance(v, str):
    return v
  if isinstance(v, (int, float)):
    return float(v)
  if isinstance(v, dict):
    return tuple(sorted((k, canonical(x)) for k, x in v.items()))
  if isinstance(v, (list, tuple)):
    return tuple(canonical(x) for x in v)
  return v


@dataclasses.dataclass(frozen=True)
class Ledger:
  """The segments that ran, in order."""

  segments: Tuple[Segment, ...] = ()

  @property
  def steps(self) -> int:
    return sum(s.steps for s in self.segments)

  @property
  def releases(self) -> int:
    return sum(s.releases for s in self.segments)

  def event(self) -> dp_accounting.DpEvent:
    """The DpEvent of everything recorded (NoOp before the first release)."""
    events = [s.event() for s in self.segments if s.releases]
    if not events:
      return dp_accounting.NoOpDpEvent()
    return events[0] if len(events) == 1 else ev.compose(events)

  def record(self, segment: Segment) -> Ledger:
    """Extends the last segment when `segment` has the same privacy fields, else appends.

    Args:
      segment: the releases to add.

    Returns:
      A new Ledger (ledgers are immutable).
    """
    if self.segments and self.segments[-1].privacy_key() == segment.privacy_key():
      last = self.segments[-1]
      merged = last.with_steps(
        last.steps + segment.steps, last.extra_releases + segment.extra_releases
      )
      return Ledger(self.segments[:-1] + (merged,))
    if self.segments and (self.segments[-1].correlated or segment.correlated):
      raise ValueError(
        "a BandMF or BLT segment cannot share a ledger with another segment: its noise "
        "is correlated across steps and its bound covers one unchanged run"
      )
    return Ledger(self.segments + (segment,))

  def epsilon(
    self, delta: float, accountant: Optional[str] = None, *, coarse: bool = False
  ) -> float:
    """Epsilon of everything released, by `accountant` (default: the segments' own).

    0.0 before the first release. An estimating accountant ("edgeworth")
    returns its estimate; `bound_accountant` names the one to report.

    Args:
      delta: the delta of the guarantee.
      accountant: an accountant's name; None uses the segments' own.
      coarse: the looser, cheaper PLD bound calibration brackets with
        (`accountants.composed`); never the reported one.

    Returns:
      The epsilon (memoised on the ledger's JSON).
    """
    if not self.releases:
      return 0.0
    if accountant is None:
      names = {s.accountant for s in self.segments}
      if len(names) != 1:
        raise ValueError(
          f"segments were planned with different accountants {sorted(names)}; "
          "name the accountant to compose them with"
        )
      accountant = names.pop()
    return _epsilon(self.dumps(), float(delta), accountant, bool(coarse))

  def to_json(self) -> list:
    """The segments as JSON-ready dicts (inverse of `from_json`)."""
    return [s.to_json() for s in self.segments]

  @classmethod
  def from_json(cls, rows: Sequence[Dict[str, Any]]) -> Ledger:
    """The ledger written by `to_json`.

    Args:
      rows: one dict per segment.

    Returns:
      The Ledger.
    """
    return cls(tuple(Segment.from_json(dict(r)) for r in rows))

  def dumps(self) -> str:
    """The ledger as canonical JSON (sorted keys): its identity for caching and resume checks."""
    return json.dumps(self.to_json(), sort_keys=True)


# What must stay equal for a resume to extend a segment: every field but the counts. The spec
# side of it is `origin` (`dpjax.training.spec.privacy_spec`), the one definition of a change.
PRIVACY_FIELDS = tuple(
  f.name for f in dataclasses.fields(Segment) if f.name not in ("steps", "extra_releases")
)


@functools.lru_cache(maxsize=512)
def _epsilon(ledger_json: str, delta: float, accountant: str, coarse: bool) -> float:
  # Memoised: a run asks for the same ledger's epsilon at every log row, and a
  # mixture (ELS) or LMO PLD is costly to build.
  event = Ledger.from_json(json.loads(ledger_json)).event()
  return accountants.epsilon(event, delta, accountant, coarse=coarse)
