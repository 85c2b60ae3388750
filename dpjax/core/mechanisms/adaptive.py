"""Adaptive clipping's noise: the Gaussian sum and the noised quantile count, one release.

`quantile_clipped_gaussian` noises the clipped sum and the count of unclipped
units together and moves the clip norm toward a target quantile (arXiv
1905.03871); `gradient_noise_multiplier` splits the accounted sigma between
the two.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpjax.core.checks import check_positive
from dpjax.core.mechanisms.draws import iid, standard_normal
from dpjax.core.mechanisms.gaussian_noise import Gaussian


def effective_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float) -> float:
  """The noise multiplier of the joint release of a clipped sum and a quantile count.

  Args:
    noise_multiplier: sigma_g, the gradient noise in units of the clip norm.
    count_noise_multiplier: sigma_b, the std of the noise on the count
      sum_i (1[||g_i|| <= C] - 1/2), whose sensitivity is 1/2.

  Returns:
    (sigma_g^-2 + (2 sigma_b)^-2)^(-1/2): one Gaussian mechanism of this
    multiplier releases both (arXiv 1905.03871, Theorem 1).
  """
  check_positive(noise_multiplier, "noise_multiplier")
  check_positive(count_noise_multiplier, "count_noise_multiplier")
  return (noise_multiplier**-2 + (2.0 * count_noise_multiplier) ** -2) ** -0.5


def gradient_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float) -> float:
  """sigma_g such that the joint release with the count has multiplier `noise_multiplier`.

  Args:
    noise_multiplier: sigma, the accounted (effective) noise multiplier.
    count_noise_multiplier: sigma_b, the count's noise std (> sigma / 2).

  Returns:
    (sigma^-2 - (2 sigma_b)^-2)^(-1/2), the inverse of `effective_noise_multiplier`.
  """
  check_positive(noise_multiplier, "noise_multiplier")
  check_positive(count_noise_multiplier, "count_noise_multiplier")
  rest = noise_multiplier**-2 - (2.0 * count_noise_multiplier) ** -2
  if rest <= 0:
    raise ValueError(
      f"count_noise_multiplier={count_noise_multiplier:g} must exceed noise_multiplier / 2 = "
      f"{noise_multiplier / 2:g}: the count alone would spend the whole budget"
    )
  return rest**-0.5


class QuantileClipState(NamedTuple):
  """State of `quantile_clipped_gaussian`: the key, the step count and this step's clip norm."""

  key: jax.Array
  count: jax.Array  # int32 scalar
  clip_norm: jax.Array  # f32 scalar: the bound the next clipped sum must use


def quantile_clipped_gaussian(
  noise_multiplier: float,
  count_noise_multiplier: float,
  key: jax.Array,
  *,
  initial_clip_norm: float,
  target_quantile: float,
  learning_rate: float,
  expected_batch_size: float,
) -> optax.GradientTransformationExtraArgs:
  """Gaussian noise with an adaptive clip norm at a target quantile of the gradient norms.

  Adaptive clipping of Andrew et al. (arXiv 1905.03871). The state holds the
  clip norm C the incoming sum was clipped to (read it with
  `find_state(opt_state, QuantileClipState).clip_norm` and pass it as
  `grad_fn(..., clip_norm=C)`). `update(sum, state, quantile_count=b)` with
  b = sum over the batch's units of (1[||g_i|| <= C] - 1/2) (`num_unclipped
  - num_units / 2` of `ClippedGradAux`) adds N(0, (sigma_g C)^2) to the sum
  and N(0, sigma_b^2) to b, and moves C geometrically towards the target:
  C <- C exp(-eta (b~ / B + 1/2 - target_quantile)).

  Example:
    >>> tx = quantile_clipped_gaussian(1.0, 10.0, jax.random.key(0), initial_clip_norm=1.0,
    ...   target_quantile=0.5, learning_rate=0.2, expected_batch_size=64)
    >>> state = tx.init(jnp.zeros(3))
    >>> noisy, state = tx.update(jnp.zeros(3), state, quantile_count=32.0)  # all 64 unclipped
    >>> round(float(state.clip_norm), 2) < 1.0
    True

  Args:
    noise_multiplier: sigma_g, the gradient noise in units of the clip norm
      (`gradient_noise_multiplier` of the accounted sigma).
    count_noise_multiplier: sigma_b, the count noise's std.
    key: the PRNG key, split on every update; the count has its own key.
    initial_clip_norm: C_0 > 0.
    target_quantile: gamma in (0, 1), the fraction of units left unclipped.
    learning_rate: eta > 0 of the geometric update.
    expected_batch_size: B, the public expected units per step.

  Returns:
    An optax transform with extra argument `quantile_count`.

  Formal guarantees:
    Per step, (sum + noise, b + noise) is one Gaussian mechanism of
    multiplier `effective_noise_multiplier(sigma_g, sigma_b)` under
    add/remove of one unit: its clipped gradient moves the sum by <= C and
    its indicator moves b by 1/2. The clip norm is a function of earlier
    releases only (post-processing). Account each step as
    `PoissonSampledDpEvent(q, GaussianDpEvent(effective multiplier))`.
  """
  check_positive(noise_multiplier, "noise_multiplier", allow_zero=True)
  check_positive(count_noise_multiplier, "count_noise_multiplier")
  check_positive(initial_clip_norm, "initial_clip_norm")
  check_positive(learning_rate, "learning_rate")
  check_positive(expected_batch_size, "expected_batch_size")
  if not 0.0 < target_quantile < 1.0:
    raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile}")
  draw = iid(standard_normal, float(noise_multiplier))

  def init_fn(params):
    del params
    c = jnp.asarray(initial_clip_norm, jnp.float32)
    return QuantileClipState(jnp.asarray(key), jnp.zeros([], jnp.int32), c)

  def update_fn(updates, state, params=None, *, quantile_count=None, **extra_args):
    del params, extra_args
    if quantile_count is None:
      raise ValueError("quantile_clipped_gaussian.update needs quantile_count=")
    next_key, grad_key, count_key = jax.random.split(state.key, 3)
    c = state.clip_norm
    leaves, treedef = jax.tree.flatten(updates)
    noised = [
      (leaf.astype(jnp.float32) + c * z).astype(leaf.dtype)
      for leaf, z in zip(leaves, draw(grad_key, leaves))
    ]
    b = jnp.asarray(quantile_count, jnp.float32)
    b = b + count_noise_multiplier * standard_normal(count_key, ())
    unclipped = b / expected_batch_size + 0.5
    c_next = c * jnp.exp(-learning_rate * (unclipped - target_quantile))
    state = QuantileClipState(next_key, state.count + 1, c_next)
    return jax.tree.unflatten(treedef, noised), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class AdaptiveGaussian(Gaussian):
  """The Gaussian with an adaptive clip norm: the sum and the quantile count, one release.

  Recorded in the ledger as the Gaussian at the accounted sigma
  (`effective_noise_multiplier` of the two parts); the sum gets
  `gradient_noise_multiplier` of it. `noise_variance` takes this step's clip
  norm C_t as the sensitivity.

  Attributes:
    count_noise: the count's noise multiplier.
    target_quantile: the quantile of unit norms the clip norm moves to.
    learning_rate: the geometric step of the clip norm.
    expected_batch_size: B, what the noised count is divided by.
  """

  count_noise: float = 1.0
  target_quantile: float = 0.5
  learning_rate: float = 0.2
  expected_batch_size: float = 1.0

  @property
  def gradient_noise_multiplier(self) -> float:
    """sigma on the gradient sum: the accounted sigma, less what the count takes."""
    return gradient_noise_multiplier(self.noise_multiplier, self.count_noise)

  def transform(self, key, sensitivity):  # sensitivity: the initial clip norm
    return quantile_clipped_gaussian(
      self.gradient_noise_multiplier,
      self.count_noise,
      key,
      initial_clip_norm=sensitivity,
      target_quantile=self.target_quantile,
      learning_rate=self.learning_rate,
      expected_batch_size=self.expected_batch_size,
    )

  def noise_variance(self, sensitivity):  # sensitivity: this step's clip norm (on device)
    return (self.gradient_noise_multiplier * sensitivity) ** 2
