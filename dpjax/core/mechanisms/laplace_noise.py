"""Laplace noise: the L1 analogue of the Gaussian mechanism. `Laplace` is its mechanism object."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import optax

from dpjax.core.accounting import events
from dpjax.core.checks import check_noise_multiplier, check_positive
from dpjax.core.mechanisms.base import Mechanism, register
from dpjax.core.mechanisms.draws import iid, noise_transform, standard_laplace


def laplace(
  noise_multiplier: float, l1_sensitivity: float, key: jax.Array
) -> optax.GradientTransformation:
  """Adds i.i.d. Laplace(0, noise_multiplier * l1_sensitivity) to every coordinate.

  Args:
    noise_multiplier: the Laplace scale in units of the L1 sensitivity
      (`LaplaceDpEvent.noise_multiplier`); one unsampled step is
      (1 / noise_multiplier)-DP. Zero disables noise.
    l1_sensitivity: the L1 sensitivity of the incoming sum, i.e.
      `grad_fn.sensitivity()` of `clipped_grad(..., l1_clip_norm=...)`.
    key: the PRNG key, split on every update as in `gaussian`.

  Returns:
    An optax transform whose `update(sum, state)` returns (sum + noise, state).

  Formal guarantees:
    If the incoming sum has L1 sensitivity `l1_sensitivity` under add/remove of
    one unit, one update is `dp_accounting.LaplaceDpEvent(noise_multiplier)`.
    Note that L2 clipping does not bound L1 sensitivity (it only gives
    sqrt(d) * C), so pair this with L1 clipping.
  """
  check_positive(noise_multiplier, "noise_multiplier", allow_zero=True)
  check_positive(l1_sensitivity, "l1_sensitivity")
  scale = float(noise_multiplier) * float(l1_sensitivity)
  return noise_transform(iid(standard_laplace, scale), key)


@register
@dataclasses.dataclass(frozen=True)
class Laplace(Mechanism):
  """The Laplace mechanism: i.i.d. Laplace(0, sigma Delta) on a sum of L1 sensitivity Delta.

  Formal guarantees:
    One update is `LaplaceDpEvent(sigma)` (one unsampled step is
    (1 / sigma)-DP), Poisson-sampled at the plan's rate.
  """

  name: ClassVar[str] = "laplace"
  norm: ClassVar[str] = "l1"
  noise_multiplier: float

  def __post_init__(self):
    check_noise_multiplier(self.noise_multiplier)

  def transform(self, key, sensitivity):
    return laplace(self.noise_multiplier, sensitivity, key)

  def step_event(self, sampling_rate):
    return events.laplace_step(self.noise_multiplier, sampling_rate)

  def noise_variance(self, sensitivity):
    return float(2.0 * (self.noise_multiplier * sensitivity) ** 2)
