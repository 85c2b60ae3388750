"""Gaussian noise: DP-SGD's (arXiv 1607.00133), and correlated across steps (BandMF, BLT).

`gaussian` adds i.i.d. N(0, (sigma C)^2) to the clipped sum; `banded_gaussian`
correlates it across steps through a b-banded strategy (BandMF, arXiv
2306.08153), `blt_gaussian` through a buffered linear Toeplitz one (arXiv
2408.08868). `Gaussian` is the mechanism object the plan and the ledger use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax.core.accounting import events
from dpjax.core.accounting.user_level import els_step
from dpjax.core.checks import check_noise_multiplier, check_positive
from dpjax.core.matrix_factorization import (
  blt_coefficients,
  check_blt,
  check_coefficients,
  inverse_coefficients,
  toeplitz_sensitivity,
)
from dpjax.core.mechanisms.base import Mechanism, register
from dpjax.core.mechanisms.draws import iid, noise_transform, standard_normal

PyTree = Any


def gaussian(
  noise_multiplier: float, l2_sensitivity: float, key: jax.Array
) -> optax.GradientTransformation:
  """Adds N(0, (noise_multiplier * l2_sensitivity)^2 I) to the clipped sum.

  Example:
    >>> tx = gaussian(noise_multiplier=1.0, l2_sensitivity=1.0, key=jax.random.key(0))
    >>> state = tx.init(None)
    >>> noisy, state = tx.update(jnp.zeros(3), state)

  Args:
    noise_multiplier: sigma, the noise std in units of the sensitivity. Zero
      disables noise (a non-private run; the accountant then reports inf).
    l2_sensitivity: the L2 sensitivity of the incoming sum under add/remove,
      i.e. `grad_fn.sensitivity()` (= the clip norm for flat clipping).
    key: the PRNG key. It lives in the transform's state and is split on every
      update, so checkpointing the optimizer state checkpoints the noise
      stream, and no key is used twice.

  Returns:
    An optax transform whose `update(sum, state)` returns (sum + noise, state).

  Formal guarantees:
    If the incoming sum has L2 sensitivity `l2_sensitivity` under add/remove of
    one unit, one update is the Gaussian mechanism with noise multiplier
    `noise_multiplier` (`dp_accounting.GaussianDpEvent(noise_multiplier)`);
    with Poisson sampling at rate q, a step is
    `PoissonSampledDpEvent(q, GaussianDpEvent(noise_multiplier))`.
  """
  check_positive(noise_multiplier, "noise_multiplier", allow_zero=True)
  check_positive(l2_sensitivity, "l2_sensitivity")
  std = float(noise_multiplier) * float(l2_sensitivity)
  return noise_transform(iid(standard_normal, std), key)


def _correlated_noise(draw, key, rows: int, step, state_type) -> optax.GradientTransformation:
  """The noise transform of a correlated strategy: iid draws z_t through `step` per leaf.

  Args:
    draw: `iid(...)`: the key and the leaves -> one z per leaf, as `gaussian` draws.
    key: the PRNG key, split on every update.
    rows: the memory's leading size per leaf (float32, zeros at init).
    step: (z, memory) -> (w_t, next memory) for one leaf.
    state_type: the state's NamedTuple of (key, count, memory).

  Returns:
    An optax transform whose `update(sum, state)` returns (sum + w_t, state).
  """

  def init_fn(params):
    memory = jax.tree.map(lambda p: jnp.zeros((rows,) + jnp.shape(p), jnp.float32), params)
    return state_type(jnp.asarray(key), jnp.zeros([], jnp.int32), memory)

  def update_fn(updates, state, params=None):
    del params
    next_key, step_key = jax.random.split(state.key)
    leaves, treedef = jax.tree.flatten(updates)
    past = treedef.flatten_up_to(state[2])
    out, memory = [], []
    for leaf, z, m in zip(leaves, draw(step_key, leaves), past):
      w, m = step(z, m)
      out.append((leaf.astype(jnp.float32) + w).astype(leaf.dtype))
      memory.append(m)
    return jax.tree.unflatten(treedef, out), state_type(
      next_key, state.count + 1, jax.tree.unflatten(treedef, memory)
    )

  return optax.GradientTransformation(init_fn, update_fn)


class BandedNoiseState(NamedTuple):
  """State of `banded_gaussian`: the key, the step count and the last b - 1 noise vectors."""

  key: jax.Array
  count: jax.Array  # int32 scalar
  history: PyTree  # per leaf [b - 1, *leaf.shape] float32, newest first


def banded_gaussian(
  noise_multiplier: float, l2_sensitivity: float, key: jax.Array, coefs
) -> optax.GradientTransformation:
  """Correlated Gaussian noise of a b-banded Toeplitz matrix factorisation (BandMF).

  Step t adds w_t with sum_j c_j w_{t-j} = z_t, z_t ~ N(0, (sigma C)^2 I)
  drawn exactly as `gaussian` draws its noise (same key, same z), i.e. the
  noise is C^-1 z (`dpjax.core.matrix_factorization`). The state keeps the
  last b - 1 w's: (b - 1) x params of float32 memory. One band is
  `gaussian` itself (the same transform, no history).

  Example:
    >>> tx = banded_gaussian(1.0, 1.0, jax.random.key(0), coefs=[0.8, 0.6])
    >>> state = tx.init(jnp.zeros(3))
    >>> noisy, state = tx.update(jnp.zeros(3), state)

  Args:
    noise_multiplier: sigma, in units of the sensitivity of one participation.
    l2_sensitivity: the L2 sensitivity of the incoming sum under add/remove
      (`grad_fn.sensitivity()`).
    key: the PRNG key, split on every update as in `gaussian`.
    coefs: the strategy's bands c_0..c_{b-1} (scaled here to unit norm, the
      largest column norm of C).

  Returns:
    An optax transform whose `update(sum, state)` returns (sum + w_t, state).

  Formal guarantees:
    The released sequence is a post-processing of C x + z with C's columns of
    norm <= 1. If every unit takes part only in steps at least b apart
    (`dpjax.core.sampling.CyclicPoissonSampler` with b groups), n steps are as
    private as ceil(n / b) steps of DP-SGD at the same sigma and sampling rate
    within a group (`dpjax.core.accounting.events.bandmf_event`, arXiv
    2306.08153); add/remove of one unit.
  """
  c = check_coefficients(coefs)
  if len(c) == 1:
    return gaussian(noise_multiplier, l2_sensitivity, key)
  check_positive(noise_multiplier, "noise_multiplier", allow_zero=True)
  check_positive(l2_sensitivity, "l2_sensitivity")
  draw = iid(standard_normal, float(noise_multiplier) * float(l2_sensitivity))
  head, tail = float(c[0]), jnp.asarray(c[1:], jnp.float32)  # tail: [b - 1]

  def step(z, h):  # h: the last b - 1 w's, newest first
    w = (z - jnp.tensordot(tail, h, axes=1)) / head
    return w, jnp.concatenate([w[None], h[:-1]])

  return _correlated_noise(draw, key, len(c) - 1, step, BandedNoiseState)


class BLTNoiseState(NamedTuple):
  """State of `blt_gaussian`: the key, the step count and the m buffers."""

  key: jax.Array
  count: jax.Array  # int32 scalar
  buffers: PyTree  # per leaf [m, *leaf.shape] float32


def blt_gaussian(
  noise_multiplier: float, l2_sensitivity: float, key: jax.Array, decay, scale
) -> optax.GradientTransformation:
  """Correlated Gaussian noise of a buffered linear Toeplitz (BLT) factorisation.

  Step t adds w = C^-1 z for the lower-triangular Toeplitz C with c_0 = 1,
  c_k = sum_j s_j d_j^(k-1) (`dpjax.core.matrix_factorization.blt_coefficients`),
  z_t ~ N(0, (sigma sens)^2 I) drawn exactly as `gaussian` draws its noise:
  w_t = z_t - sum_j s_j buf_j, then buf_j <- d_j buf_j + w_t (arXiv 2408.08868,
  Alg. 3). The state holds m buffers: m x params of float32 memory, whatever
  the horizon. All scales 0 (or m = 0) is `gaussian` itself.

  Example:
    >>> tx = blt_gaussian(1.0, 1.0, jax.random.key(0), decay=[0.9], scale=[0.3])
    >>> state = tx.init(jnp.zeros(3))
    >>> noisy, state = tx.update(jnp.zeros(3), state)

  Args:
    noise_multiplier: sigma.
    l2_sensitivity: the sensitivity of the whole released C x: the clipped
      sum's (`grad_fn.sensitivity()`) times C's under the run's participation
      (`matrix_factorization.toeplitz_sensitivity`).
    key: the PRNG key, split on every update as in `gaussian`.
    decay: d_1..d_m.
    scale: s_1..s_m.

  Returns:
    An optax transform whose `update(sum, state)` returns (sum + w_t, state).

  Formal guarantees:
    The released sequence is a post-processing of C x + z, one Gaussian
    mechanism of multiplier sigma when `l2_sensitivity` bounds the change of
    C x (`dpjax.core.accounting.events.blt_event`): no amplification by
    sampling is claimed.
  """
  d, s = check_blt(decay, scale)
  if not np.any(s > 0):
    return gaussian(noise_multiplier, l2_sensitivity, key)
  check_positive(noise_multiplier, "noise_multiplier", allow_zero=True)
  check_positive(l2_sensitivity, "l2_sensitivity")
  draw = iid(standard_normal, float(noise_multiplier) * float(l2_sensitivity))
  dj, sj = jnp.asarray(d, jnp.float32), jnp.asarray(s, jnp.float32)

  def step(z, buf):  # buf: [m, *z.shape]
    w = z - jnp.tensordot(sj, buf, axes=1)
    return w, dj.reshape((-1,) + (1,) * w.ndim) * buf + w[None]

  return _correlated_noise(draw, key, len(d), step, BLTNoiseState)


@register
@dataclasses.dataclass(frozen=True)
class Gaussian(Mechanism):
  """The Gaussian mechanism of DP-SGD: N(0, (sigma C)^2) on a sum of L2 sensitivity C.

  Formal guarantees:
    One update on a sum of L2 sensitivity C (add/remove of one unit) is
    `GaussianDpEvent(sigma)`, Poisson-sampled at the plan's rate; under
    user-level ELS (a user's at most G examples each sampled) it is the
    mixture `user_level.els_step`.
  """

  name: ClassVar[str] = "gaussian"
  noise_multiplier: float

  def __post_init__(self):
    check_noise_multiplier(self.noise_multiplier)

  def transform(self, key, sensitivity):
    return gaussian(self.noise_multiplier, sensitivity, key)

  def step_event(self, sampling_rate):
    return events.gaussian_step(self.noise_multiplier, sampling_rate)

  def user_step_event(self, sampling_rate, max_examples_per_user):
    return els_step(self.noise_multiplier, sampling_rate, max_examples_per_user)

  def noise_variance(self, sensitivity):
    return float((self.noise_multiplier * sensitivity) ** 2)


@dataclasses.dataclass(frozen=True)
class BandMF(Gaussian):
  """Gaussian noise correlated across steps by a b-banded strategy C (BandMF, arXiv 2306.08153).

  Recorded in the ledger as the Gaussian at its sigma in a segment of `bands`
  b > 1 (`events.bandmf_event`: with cyclic Poisson sampling over b groups, the
  steps compose as ceil(steps / b) DP-SGD steps).

  Attributes:
    coefs: the strategy's c_0..c_{b-1} (`matrix_factorization.strategy`).
    steps: the run's steps (the noise's variance is the largest at the last).
  """

  coefs: Tuple[float, ...] = (1.0,)
  steps: int = 1

  def transform(self, key, sensitivity):
    return banded_gaussian(self.noise_multiplier, sensitivity, key, self.coefs)

  def noise_variance(self, sensitivity):
    gain = float(np.sum(inverse_coefficients(self.coefs, self.steps) ** 2))
    return float(gain * (self.noise_multiplier * sensitivity) ** 2)


@dataclasses.dataclass(frozen=True)
class BLT(Gaussian):
  """Gaussian noise through a buffered linear Toeplitz strategy (BLT, arXiv 2408.08868).

  The noise is scaled to C x's sensitivity over the run (`c_sensitivity`:
  units in at most ceil(steps / b) steps, b apart); the ledger records the
  whole run as one Gaussian mechanism at sigma (`events.blt_event`).

  Attributes:
    blt: the fitted (decay, scale) of its m buffers.
    steps: the run's steps (the horizon the sensitivity covers).
    bands: b, the minimum separation of a unit's steps.
  """

  blt: Tuple[Tuple[float, ...], Tuple[float, ...]] = ((), ())
  steps: int = 1
  bands: int = 1

  @property
  def c_sensitivity(self) -> float:
    """The sensitivity of C x over the run (`matrix_factorization.toeplitz_sensitivity`)."""
    n, b = int(self.steps), int(self.bands)
    return toeplitz_sensitivity(blt_coefficients(*self.blt, n), n, b, -(-n // b))

  def transform(self, key, sensitivity):
    return blt_gaussian(self.noise_multiplier, sensitivity * self.c_sensitivity, key, *self.blt)

  def noise_variance(self, sensitivity):  # the largest, at the last step
    c = blt_coefficients(*self.blt, self.steps)
    gain = float(np.sum(inverse_coefficients(c, self.steps) ** 2)) * self.c_sensitivity**2
    return float(gain * (self.noise_multiplier * sensitivity) ** 2)
