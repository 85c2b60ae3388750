"""Argument checks of the private core, written once.

Every public entry point that takes a privacy parameter checks it here, at the
boundary and before any compute, and fails with one line naming the argument,
the value given and what is allowed. The config spec (`dpjax.training.spec`)
and the CLI call the same functions, so a value is refused with the same words
wherever it enters.

Example:
  >>> check_delta(1e-5)
  >>> check_delta(2.0)
  Traceback (most recent call last):
  ...
  ValueError: delta must be in (0, 1), got 2.0
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax

UNITS = ("example", "user")
USER_SAMPLING = ("els", "uls")


def check_positive(value: float, name: str, *, allow_zero: bool = False) -> None:
  """Raises ValueError unless `value` is finite and > 0 (>= 0 with `allow_zero`).

  Args:
    value: the number checked.
    name: the argument's name, used in the message.
    allow_zero: also accept 0.
  """
  ok = value >= 0 if allow_zero else value > 0
  if not (ok and math.isfinite(value)):
    raise ValueError(f"{name} must be finite and {'>=' if allow_zero else '>'} 0, got {value}")


# What the accountants are held to (`dpjax.core.accounting.accountants.check_accountable`):
# beyond these a PLD's grid outgrows memory, and no meaningful guarantee is left.
MAX_RELEASES = 10**7  # releases composed in one ledger
MAX_TARGET_EPSILON = 1000.0  # a target the noise is calibrated to
MAX_EPSILON = 5000.0  # the RDP bound of a planned ledger
MAX_RELEASE_SCALE = 10.0  # sensitivity / noise std of one release (Gaussian), 1 / Laplace scale


def check_target_epsilon(target_epsilon: float, name: str = "target_epsilon") -> None:
  """Raises ValueError unless 0 < target_epsilon <= `MAX_TARGET_EPSILON`.

  Args:
    target_epsilon: the epsilon a noise is calibrated to.
    name: the argument's name, used in the message.
  """
  if not (math.isfinite(target_epsilon) and 0 < target_epsilon <= MAX_TARGET_EPSILON):
    raise ValueError(
      f"{name} must be in (0, {MAX_TARGET_EPSILON:g}], got {target_epsilon}: calibration "
      f"composes the whole run on a grid that grows with epsilon, and beyond "
      f"{MAX_TARGET_EPSILON:g} no meaningful guarantee remains"
    )


def check_delta(delta: float) -> None:
  """Raises ValueError unless 0 < delta < 1.

  Args:
    delta: the delta of an (epsilon, delta) guarantee.
  """
  if not (0.0 < delta < 1.0):
    raise ValueError(f"delta must be in (0, 1), got {delta}")


def check_epsilon(epsilon: float, *, allow_zero: bool = False) -> None:
  """Raises ValueError unless epsilon is finite and > 0 (>= 0 with `allow_zero`).

  Args:
    epsilon: the epsilon of an (epsilon, delta) guarantee, or a target epsilon.
    allow_zero: also accept 0.
  """
  check_positive(epsilon, "epsilon", allow_zero=allow_zero)


def check_sampling_rate(q: float) -> None:
  """Raises ValueError unless 0 < q <= 1.

  Args:
    q: the probability that a unit is in a step's batch.
  """
  if not (0.0 < q <= 1.0):
    raise ValueError(f"sampling_rate must be in (0, 1], got {q}")


def check_steps(steps: int, *, minimum: int = 1, name: str = "steps") -> None:
  """Raises ValueError unless `steps` is an integer >= `minimum`.

  Args:
    steps: a count (of steps, releases, ...).
    minimum: the smallest count allowed.
    name: the argument's name, used in the message.
  """
  if int(steps) != steps or steps < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {steps}")


def check_noise_multiplier(sigma: float) -> None:
  """Raises ValueError unless sigma is finite and > 0.

  Args:
    sigma: the noise standard deviation divided by the L2 sensitivity.
  """
  check_positive(sigma, "noise_multiplier")


def check_clip_norms(clip: Any, name: str) -> None:
  """Raises ValueError unless every leaf of the clip-norm pytree is finite and > 0.

  Args:
    clip: a float, or a pytree of floats (one clip norm per parameter group).
    name: the argument's name, used in the message.
  """
  for c in jax.tree.leaves(clip):
    c = float(c)
    if not (c > 0 and math.isfinite(c)):
      raise ValueError(f"{name} must be finite and > 0 (every leaf), got {c}")


def check_max_examples_per_user(max_examples_per_user: int) -> None:
  """Raises ValueError unless the per-user cap (G in the papers) is an integer >= 1.

  Args:
    max_examples_per_user: the most examples one user may contribute.
  """
  g = max_examples_per_user
  if int(g) != g or g < 1:
    raise ValueError(f"max examples per user G must be an integer >= 1, got {g}")


def check_unit(unit: str, sampling: Optional[str], max_examples_per_user: int) -> None:
  """Validates a privacy unit and, for users, how batches sample them.

  Args:
    unit: "example" or "user".
    sampling: for users, "els" (examples sampled after capping each user) or
      "uls" (users sampled); for examples, None or "poisson".
    max_examples_per_user: the cap G on a user's examples (users only).
  """
  if unit not in UNITS:
    raise ValueError(f"privacy unit must be one of {UNITS}, got {unit!r}")
  if unit == "user":
    if sampling not in USER_SAMPLING:
      raise ValueError(
        f"user-level DP needs sampling in {USER_SAMPLING} "
        f"(example- or user-level sampling), got {sampling!r}"
      )
    check_max_examples_per_user(max_examples_per_user)
  elif sampling not in (None, "poisson"):
    raise ValueError(
      f"example-level DP samples examples (Poisson); sampling={sampling!r} "
      "applies to privacy_unit='user'"
    )
