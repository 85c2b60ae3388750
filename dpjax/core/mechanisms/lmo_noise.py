"""LMO-DP noise (arXiv 2405.18776): Laplace with a random inverse scale. `LMO` is its object."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from dpjax.core.accounting.lmo import LMODpEvent, LMOParams, noise_magnitude
from dpjax.core.checks import check_positive
from dpjax.core.mechanisms.base import Mechanism, register
from dpjax.core.mechanisms.draws import noise_transform, standard_laplace


def lmo(
  params,
  key: jax.Array,
  *,
  l1_sensitivity: Optional[float] = None,
  l2_sensitivity: Optional[float] = None,
  dimension: Optional[int] = None,
  per_coordinate: bool = False,
) -> optax.GradientTransformation:
  """LMO-DP noise (arXiv 2405.18776): Laplace(0, Delta / b) with a random inverse scale b.

  Each update draws b ~ `params` (`dpjax.core.accounting.lmo.LMOParams`: a1 Gamma +
  a3 Exp + a4 Uniform) once and adds i.i.d. Laplace(0, Delta / b) to every
  coordinate of the clipped sum; with `per_coordinate`, every coordinate
  draws its own b.

  Args:
    params: an `LMOParams`.
    key: the PRNG key, split on every update as in `gaussian`.
    l1_sensitivity: the L1 sensitivity Delta of the sum (clip with
      `clipped_grad(..., l1_clip_norm=...)`).
    l2_sensitivity: alternatively the L2 sensitivity C of the sum; the L1
      sensitivity is then sqrt(dimension) * C, which is what is used
      (`dimension` required).
    dimension: number of coordinates noised (with `l2_clip_norm`).
    per_coordinate: one b per coordinate instead of one per step.

  Returns:
    An optax transform whose `update(sum, state)` returns (sum + noise, state).

  Formal guarantees:
    With one b per step and L1 sensitivity Delta, a step is accounted by
    `dpjax.core.accounting.lmo.lmo_epsilon` (b revealed, see its module
    docstring: an upper bound). `per_coordinate=True` has NO accountant in
    dpjax: d coordinates with their own b do not reduce to the 1-D mixture,
    so training refuses it; it exists for noise-shape ablations only.
  """
  if not isinstance(params, LMOParams):
    raise TypeError(f"params must be an LMOParams, got {type(params).__name__}")
  if (l1_sensitivity is None) == (l2_sensitivity is None):
    raise ValueError("give exactly one of l1_sensitivity, l2_sensitivity")
  if l1_sensitivity is not None:
    check_positive(l1_sensitivity, "l1_sensitivity")
    delta = float(l1_sensitivity)
  else:
    check_positive(l2_sensitivity, "l2_sensitivity")
    if dimension is None or int(dimension) != dimension or dimension < 1:
      raise ValueError(
        f"l2_sensitivity needs the number of noised coordinates, dimension >= 1, got {dimension!r}"
      )
    delta = math.sqrt(dimension) * float(l2_sensitivity)

  def sample_b(k, shape):
    kg, ke, ku = jax.random.split(k, 3)
    b = jnp.zeros(shape, jnp.float32)
    if params.a1 > 0:
      b = b + params.a1 * params.theta * jax.random.gamma(kg, params.k, shape, jnp.float32)
    if params.a3 > 0:
      b = b + params.a3 / params.lam * jax.random.exponential(ke, shape, jnp.float32)
    if params.a4 > 0:
      b = b + params.a4 * jax.random.uniform(ku, shape, jnp.float32, params.Ua, params.Ub)
    return b

  def draw(step_key, leaves):
    kb, kn = jax.random.split(step_key)
    keys = jax.random.split(kn, len(leaves))
    b_step = sample_b(kb, ())
    out = []
    for i, (leaf, k) in enumerate(zip(leaves, keys)):
      kl, kbl = jax.random.split(k)
      b = sample_b(jax.random.fold_in(kbl, i), leaf.shape) if per_coordinate else b_step
      out.append(standard_laplace(kl, leaf.shape) * (delta / b))
    return out

  return noise_transform(draw, key)


@register
@dataclasses.dataclass(frozen=True)
class LMO(Mechanism):
  """LMO-DP: Laplace(0, Delta / b) with b ~ `lmo` drawn once per step; L1 sensitivity Delta.

  Its parameters are `LMOParams` (given as the config's `lmo`, or searched
  for a target epsilon by `dpjax.methods.lmo_search`), not a noise multiplier.

  Formal guarantees:
    One update is `LMODpEvent(lmo, q)` at Poisson rate q, accounted by its own
    PLD (`dpjax.core.accounting.lmo`; b revealed: an upper bound). Users
    sampled as units (ULS) are units like examples; ELS has no LMO accountant.
  """

  name: ClassVar[str] = "lmo"
  norm: ClassVar[str] = "l1"
  accountants: ClassVar[Tuple[str, ...]] = ("pld",)
  scaled: ClassVar[bool] = False
  config_keys: ClassVar[Tuple[str, ...]] = ("lmo", "lmo_grid", "lmo_objective")
  lmo: LMOParams

  @property
  def noise_multiplier(self) -> float:
    return 0.0  # its noise is `lmo`

  @classmethod
  def from_settings(cls, settings):
    try:
      return cls(LMOParams(**dict(settings)))
    except TypeError as e:
      raise ValueError(
        f"lmo takes LMOParams fields (a1, a3, a4, theta, k, lam, Ua, Ub): {e}"
      ) from None

  def settings(self):
    return self.lmo.as_dict()

  def transform(self, key, sensitivity):
    return lmo(self.lmo, key, l1_sensitivity=sensitivity)

  def step_event(self, sampling_rate):
    return LMODpEvent(self.lmo, sampling_rate)

  def noise_variance(self, sensitivity):
    return float(noise_magnitude(self.lmo, sensitivity, "var"))

  def describe(self):
    return "lmo"

  @classmethod
  def check_accountant(cls, unit, sampling, accountant):
    if sampling == "els":
      raise ValueError(
        "LMO noise has no ELS user-level accountant; use user_sampling='uls' or "
        "privacy_unit='example'"
      )
    if accountant != "pld":
      raise ValueError(
        f"LMO noise is accounted by its own PLD; set accountant='pld', got {accountant!r}"
      )
