"""The mechanism protocol and its registry: one object per kind of noise.

A `Mechanism` says everything a run needs of one kind of noise, in one place:
how it privatises a clipped sum (`transform`), what one release is to an
accountant (`step_event`, and `user_step_event` for user-level ELS), the
per-coordinate variance it adds (`noise_variance`, for DP-AdamBC), which
norm its sensitivity is measured in (`norm`), which accountants cover it,
one line for the run's header (`describe`) and what the ledger stores of it
(`to_json` / `from_json`). The plan holds one such object; the ledger's
segments hold its JSON and rebuild it by name through the registry.

A new mechanism is a subclass registered under a new name:

    @dataclasses.dataclass(frozen=True)
    class Doubled(Mechanism):
      name = "doubled"
      noise_multiplier: float

      def transform(self, key, sensitivity):
        return gaussian(2 * self.noise_multiplier, sensitivity, key)

      def step_event(self, sampling_rate):
        return events.gaussian_step(2 * self.noise_multiplier, sampling_rate)

      def noise_variance(self, sensitivity):
        return (2 * self.noise_multiplier * sensitivity) ** 2

    register(Doubled)

after which `mechanism="doubled"` trains, calibrates (its scale is
`noise_multiplier`, found by the same search as the Gaussian's), resumes and
is accounted like a built-in one (docs: "How to add a mechanism").

Formal guarantees:
  A registered mechanism's releases are `(epsilon, delta)`-DP as the ledger
  reports exactly when `transform(key, sensitivity)`, applied once per step
  to a sum of sensitivity `sensitivity` (in `norm`) under add/remove of one
  unit, is the release `step_event(1.0)` describes, Poisson-sampled at the
  plan's rate; that is the subclass's obligation, argued in its docstring.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Dict, Optional, Tuple

import dp_accounting
import jax
import optax


class Mechanism(abc.ABC):
  """One kind of noise on the clipped sum: its transform, its event, its record.

  Class attributes (what a subclass sets):
    name: the registered name (the config's `mechanism`, the ledger's).
    norm: "l2" or "l1": the clip norm its sensitivity is measured in.
    accountants: the accountants that cover its releases (None: every one
      whose `supports` takes its event, built-in or registered).
    scaled: it is a one-parameter family in `noise_multiplier`, which a
      config gives or a target epsilon calibrates (`with_noise_multiplier`);
      False for a mechanism whose parameters are its `settings`.
    config_keys: the config keys only this mechanism reads (LMO's `lmo`,
      `lmo_grid`, `lmo_objective`); the first holds its `settings`.

  Instance attribute: `noise_multiplier`, the scale in units of the
  sensitivity (a dataclass field of a `scaled` mechanism; 0.0 for others).
  """

  name: ClassVar[str] = ""
  norm: ClassVar[str] = "l2"
  accountants: ClassVar[Optional[Tuple[str, ...]]] = None
  scaled: ClassVar[bool] = True
  config_keys: ClassVar[Tuple[str, ...]] = ()

  @classmethod
  def with_noise_multiplier(cls, noise_multiplier: float) -> Mechanism:
    """The family member at `noise_multiplier` (what calibration searches over).

    Args:
      noise_multiplier: the scale in units of the sensitivity.

    Returns:
      The mechanism.
    """
    if not cls.scaled:
      raise ValueError(f"mechanism {cls.name!r} has no noise multiplier: give its settings")
    return cls(noise_multiplier=float(noise_multiplier))  # a dataclass with that field

  @classmethod
  def from_settings(cls, settings: Dict[str, Any]) -> Mechanism:
    """The mechanism its own parameters describe (a mechanism that is not `scaled`).

    Args:
      settings: the dict of `settings()`.

    Returns:
      The mechanism.
    """
    raise ValueError(f"mechanism {cls.name!r} takes no settings, got {settings!r}")

  def settings(self) -> Optional[Dict[str, float]]:
    """Its parameters besides `noise_multiplier`, as JSON (None: none)."""
    return None

  @abc.abstractmethod
  def transform(self, key: jax.Array, sensitivity: float) -> optax.GradientTransformation:
    """The privatiser: an optax transform adding this noise to the clipped sum once per update.

    Args:
      key: the noise key (raw uint32[2] or a typed key), split every update.
      sensitivity: the sum's sensitivity in `norm` under add/remove of one unit.

    Returns:
      The transform. Its state is a NamedTuple with a `key` field (as
      `draws.noise_transform`'s `NoiseState`): a checkpoint carries the key,
      and a resume on a new ledger segment replaces it with that segment's
      (`PrivacyPlan.rekey`), so no released draw is drawn again.
    """

  @abc.abstractmethod
  def step_event(self, sampling_rate: float) -> dp_accounting.DpEvent:
    """One release at Poisson rate `sampling_rate` (add/remove of one unit).

    Args:
      sampling_rate: the Poisson rate of a unit.

    Returns:
      The DpEvent (e.g. `PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`).
    """

  def user_step_event(
    self, sampling_rate: float, max_examples_per_user: int
  ) -> dp_accounting.DpEvent:
    """One release under user-level ELS (examples sampled, a user's G of them bounded).

    Args:
      sampling_rate: the per-example Poisson rate.
      max_examples_per_user: G.

    Returns:
      The DpEvent (the Gaussian's: `user_level.els_step`).
    """
    raise ValueError(f"mechanism {self.name!r} has no user-level ELS accountant")

  @abc.abstractmethod
  def noise_variance(self, sensitivity: float) -> float:
    """The variance the noise adds to each coordinate of the sum (DP-AdamBC subtracts it).

    Args:
      sensitivity: the sum's sensitivity, as `transform` takes it.

    Returns:
      The variance.
    """

  def describe(self) -> str:
    """One line for the run's header: e.g. "gaussian sigma 1.08"."""
    return f"{self.name} sigma {self.noise_multiplier:.4g}"

  def to_json(self) -> Dict[str, Any]:
    """{"name", "noise_multiplier", "settings"}: what the ledger keeps (inverse: `from_json`)."""
    return {
      "name": self.name,
      "noise_multiplier": float(self.noise_multiplier),
      "settings": self.settings(),
    }

  @classmethod
  def check_accountant(cls, unit: str, sampling: Optional[str], accountant: str) -> None:
    """Raises ValueError (one line) unless `accountant` covers this noise for that unit.

    Args:
      unit: "example" or "user".
      sampling: None (examples), "els" or "uls" (users).
      accountant: the accountant's name.
    """
    if (
      unit == "user"
      and sampling == "els"
      and (cls.user_step_event is Mechanism.user_step_event or accountant != "pld")
    ):
      raise ValueError(
        "the user-level ELS accountant covers Gaussian noise with accountant='pld', "
        f"got mechanism={cls.name!r}, accountant={accountant!r}"
      )
    if cls.accountants is not None and accountant not in cls.accountants:
      raise ValueError(
        f"mechanism {cls.name!r} is accounted by {', '.join(cls.accountants)}; "
        f"got accountant={accountant!r}"
      )


_REGISTRY: Dict[str, type] = {}


def register(cls: type) -> type:
  """Adds a `Mechanism` subclass under its `name` (usable as a class decorator).

  Args:
    cls: the subclass; its `name` must be new (or its own: registering twice is
      harmless).

  Returns:
    `cls`.
  """
  if not (isinstance(cls, type) and issubclass(cls, Mechanism)):
    raise TypeError(f"register takes a Mechanism subclass, got {cls!r}")
  if not cls.name or not cls.name.replace("_", "").replace("-", "").isalnum():
    raise ValueError(f"a mechanism needs a name of letters, digits, '_' or '-', got {cls.name!r}")
  if cls.norm not in ("l1", "l2"):
    raise ValueError(f"{cls.__name__}.norm must be 'l1' or 'l2', got {cls.norm!r}")
  if cls.scaled:  # calibration and the ledger make it from its noise multiplier alone
    try:
      probe = cls.with_noise_multiplier(1.0)
    except TypeError as e:  # an abstract method left, or no noise_multiplier field
      raise ValueError(
        f"{cls.__name__} cannot be made from a noise multiplier alone ({e}); a scaled "
        "mechanism is a dataclass with a noise_multiplier field (or sets scaled = False "
        "and gives from_settings)"
      ) from None
    if getattr(probe, "noise_multiplier", None) != 1.0:
      raise ValueError(f"{cls.__name__}.with_noise_multiplier(1.0) has another noise_multiplier")
  old = _REGISTRY.get(cls.name)
  if old is not None and old is not cls:
    raise ValueError(f"mechanism name {cls.name!r} is taken by {old.__module__}.{old.__name__}")
  _REGISTRY[cls.name] = cls
  return cls


def unregister(name: str) -> None:
  """Removes a registered mechanism (a test's own, after it).

  Args:
    name: its name.
  """
  _REGISTRY.pop(name, None)


def names() -> Tuple[str, ...]:
  """The registered mechanisms' names, in registration order."""
  return tuple(_REGISTRY)


def get(name: str) -> type:
  """The mechanism class registered as `name` (ValueError naming the registered ones).

  Args:
    name: a registered name.

  Returns:
    The class.
  """
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(
      f"mechanism must be one of {', '.join(map(repr, _REGISTRY))}, got {name!r}"
    ) from None


def from_json(d: Dict[str, Any]) -> Mechanism:
  """The mechanism `Mechanism.to_json` wrote (its class found by name).

  Args:
    d: {"name", "noise_multiplier", "settings"}.

  Returns:
    The mechanism.
  """
  cls = get(d["name"])
  if d.get("settings") is not None:
    return cls.from_settings(dict(d["settings"]))
  return cls.with_noise_multiplier(d["noise_multiplier"])
