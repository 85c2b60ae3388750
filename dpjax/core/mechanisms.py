"""Privatizers as optax transforms: noise added once to the clipped sum.

Each mechanism takes the SUM of clipped per-unit gradients (from
`dpjax.clipped_grad`) and adds noise scaled to its sensitivity, exactly once
per `update`. Chain it before `normalize` and the optimizer:

    tx = optax.chain(gaussian(0.8, 1.0, key), normalize(1024), optax.adam(1e-3))

The Gaussian mechanism is the one of DP-SGD (arXiv 1607.00133); the Laplace
mechanism is the L1 analogue; `banded_gaussian` correlates the Gaussian
noise across steps (BandMF, arXiv 2306.08153), `blt_gaussian` likewise with
a buffered linear Toeplitz strategy (arXiv 2408.08868).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax.core.accounting.lmo import LMOParams
from dpjax.core.checks import check_positive
from dpjax.core.matrix_factorization import check_blt, check_coefficients

PyTree = Any


class NoiseState(NamedTuple):
  """State of a noise transform: the next key and the number of noised steps."""

  key: jax.Array
  count: jax.Array  # int32 scalar


def _noise_transform(
  draw: Callable[[jax.Array, list], list], key: jax.Array
) -> optax.GradientTransformation:
  """Adds `draw(step_key, leaves)` (one f32 noise array per leaf), fresh key each step."""

  def init_fn(params):
    del params
    return NoiseState(key=jnp.asarray(key), count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    next_key, step_key = jax.random.split(state.key)
    leaves, treedef = jax.tree.flatten(updates)
    # Noise is drawn and added in f32 so bf16 gradients get full-precision
    # noise; only the final sum is cast back to the gradient's dtype.
    noised = [
      (leaf.astype(jnp.float32) + z).astype(leaf.dtype)
      for leaf, z in zip(leaves, draw(step_key, leaves))
    ]
    return jax.tree.unflatten(treedef, noised), NoiseState(next_key, state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


# --- full-range samplers -------------------------------------------------------
#
# `jax.random.normal` in float32 is the inverse error function of a 23-bit
# uniform: it never exceeds ~5.3 sigma, and float32 Laplace by the inverse
# CDF is confined to about [-15.5, 16.6] scales. A release shifted past that
# edge by one unit is told apart with certainty, far above any delta. Here
# U in (0, 1) gets its binary exponent from EXPONENT_BITS random bits (the
# number of leading zeros: U in [2^-(k+1), 2^-k) with probability 2^-(k+1))
# and its significand from 23 more, so E = -log U is Exp(1) out to
# `MAX_EXPONENTIAL` = 97 ln 2 ~ 67.2; Laplace is sign * E and the Gaussian
# comes from E by Box-Muller, sqrt(2E) * (cos, sin)(2 pi V), out to
# `MAX_GAUSSIAN` ~ 11.6 sigma. Within that range the law is exact up to the
# significand's 2^-24 grid (relative, at every scale of U), V's 2^-23 grid
# and float32 rounding of log and sqrt and of the cosine and sine
# polynomials (within 1e-7 of the exact values at every V); what remains is
# the floating-point caveat of Mironov (CCS 2012): the set of attainable
# float32 values is not translation invariant, so the output grid itself
# could in principle leak through the lowest bits of a released value. dpjax
# adds noise in float32 to the float32 clipped sum and releases the sum (no
# snapping); see the README's "What the guarantee assumes".

# --- random words -------------------------------------------------------------
#
# Threefry-2x32, the hash of jax's default keys, maps a 64-bit counter to 64
# random bits. `threefry_words` returns both 32-bit halves for the counters
# 0..n-1, two words per hash, where `jax.random.bits` (partitionable layout)
# xors the halves into one word. The hash is written out round by round: jax
# lowers it on the CPU as a rolled loop of 5 x 4 rounds over the whole array,
# which materialises the state between rounds, while unrolled XLA fuses it
# with its consumers into one pass. Tested against jax's own hash
# (`jax.extend.random.threefry_2x32`) and words (`jax.random.bits`); keys of
# other implementations take `jax.random.bits` itself.

_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry_key_data(key) -> Optional[jax.Array]:
  """The uint32[2] Threefry key behind `key`, or None for another implementation."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if str(jax.random.key_impl(key)) == "threefry2x32" and key.shape == ():
      return jax.random.key_data(key)
    return None
  if jax.config.jax_default_prng_impl == "threefry2x32" and key.shape == (2,):
    return key
  return None


def threefry_words(key: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """The two uint32 halves of Threefry-2x32 under `key` at the counters 0..size-1.

  Example:
    >>> hi, lo = threefry_words(jax.random.key(0), 4)
    >>> bool(jnp.all((hi ^ lo) == jax.random.bits(jax.random.key(0), (4,), jnp.uint32)))
    True

  Args:
    key: a PRNG key (typed, or a raw uint32[2] threefry key).
    size: the number of counters.

  Returns:
    Two `[size]` uint32 arrays of independent random words (for a key of
    another implementation, `jax.random.bits(key, (2, size))`'s two rows).
  """
  data = _threefry_key_data(key)
  if data is None or size >= 2**32:
    words = jax.random.bits(key, (2, size), jnp.uint32)
    return words[0], words[1]
  k1, k2 = data[0], data[1]
  ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
  # The counter of word i is the 64-bit i as (hi, lo) = (0, i) below 2^32.
  x0 = jnp.zeros((size,), jnp.uint32) + ks[0]
  x1 = jax.lax.iota(jnp.uint32, size) + ks[1]
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
  return x0, x1


EXPONENT_WORDS = 3  # 96 bits for U's binary exponent
EXPONENT_BITS = 32 * EXPONENT_WORDS
MAX_EXPONENTIAL = (EXPONENT_BITS + 1) * math.log(2.0)  # -log of the smallest U: 2^-97
MAX_GAUSSIAN = math.sqrt(2.0 * MAX_EXPONENTIAL)


def exponential_from_bits(exponent_words, significand: jax.Array) -> jax.Array:
  """-log U for U = 2^-k (1/2 + m 2^-24): k leading zeros of the words, m 23 bits of `significand`.

  Args:
    exponent_words: EXPONENT_WORDS uint32 arrays of random words, each of
      `significand`'s shape (a sequence, or one array stacked on axis 0).
    significand: uint32 random words (their top 23 bits are used).

  Returns:
    float32 draws of Exp(1) of `significand`'s shape (k capped at EXPONENT_BITS).
  """
  lz = jnp.zeros(significand.shape, jnp.int32)
  done = jnp.zeros(significand.shape, jnp.bool_)
  for w in exponent_words:
    lz = lz + jnp.where(done, 0, jax.lax.clz(w).astype(jnp.int32))
    done = done | (w != 0)
  m = (significand >> 9).astype(jnp.float32)  # [0, 2^23): exact in float32
  half_to_one = 0.5 + m * (2.0**-24)  # [1/2, 1) on an exact grid
  return lz.astype(jnp.float32) * math.log(2.0) - jnp.log(half_to_one)


def standard_exponential(key: jax.Array, shape) -> jax.Array:
  """Exp(1) draws in float32 with the full tail out to MAX_EXPONENTIAL.

  Four words per draw (the exponent's three and the significand), from two hashes.

  Args:
    key: a PRNG key.
    shape: the output shape.

  Returns:
    A float32 array of Exp(1) draws.
  """
  shape = tuple(shape)
  size = math.prod(shape)
  ka, kb = jax.random.split(key)
  w0, w1 = threefry_words(ka, size)
  w2, significand = threefry_words(kb, size)
  return exponential_from_bits((w0, w1, w2), significand).reshape(shape)


def standard_laplace(key: jax.Array, shape) -> jax.Array:
  """Laplace(0, 1) draws in float32, |x| out to MAX_EXPONENTIAL.

  Args:
    key: a PRNG key.
    shape: the output shape.

  Returns:
    A float32 array of Laplace(0, 1) draws.
  """
  shape = tuple(shape)
  ke, ks = jax.random.split(key)
  coin, _ = threefry_words(ks, math.prod(shape))
  sign = jnp.where(coin < jnp.uint32(2**31), 1.0, -1.0).reshape(shape)  # the top bit
  return sign * standard_exponential(ke, shape)


# Taylor coefficients of sin and cos on [0, pi/4]: the first omitted terms,
# phi^11 / 11! and phi^12 / 12!, are below 2e-9 there (float32's half ulp of
# 1 is 6e-8).
_SIN = tuple((-1) ** j / math.factorial(2 * j + 1) for j in range(5))
_COS = tuple((-1) ** j / math.factorial(2 * j) for j in range(6))


def _horner(x2: jax.Array, coefs) -> jax.Array:
  """sum_j coefs[j] x2^j."""
  acc = jnp.full(x2.shape, coefs[-1], jnp.float32)
  for c in coefs[-2::-1]:
    acc = acc * x2 + jnp.float32(c)
  return acc


def cos_sin_turns(words: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin of 2 pi V in float32, V = (words >> 9) / 2^23: jax's uniform grid.

  The top 3 bits pick the octant, the next 20 the angle phi in [0, pi/4]
  within it (counted back from the octant's end in odd octants), whose sine
  and cosine are polynomials; the octant then swaps and signs them. No
  range reduction and no branch: the work is the same for every word, and on
  the CPU it is several times cheaper than `jnp.cos` and `jnp.sin`.

  Example:
    >>> c, s = cos_sin_turns(jnp.asarray([0, 2**30], jnp.uint32))  # 0 and 1/4 turn
    >>> tuple(float(abs(v)) for v in (c[0], s[0], c[1], s[1]))
    (1.0, 0.0, 0.0, 1.0)

  Args:
    words: uint32 random words.

  Returns:
    (cos, sin), float32 arrays of `words`' shape, within 1e-7 of the exact values.
  """
  octant = (words >> 29).astype(jnp.int32)
  odd = (octant & 1) == 1
  f = ((words >> 9) & jnp.uint32(0xFFFFF)).astype(jnp.float32) * (2.0**-20)  # exact
  phi = jnp.where(odd, 1.0 - f, f) * (math.pi / 4)
  phi2 = phi * phi
  s = phi * _horner(phi2, _SIN)
  c = _horner(phi2, _COS)
  # theta = n pi / 2 + phi (even octants) or - phi (odd), n = ceil(octant / 2) mod 4.
  s = jnp.where(odd, -s, s)
  n = ((octant + 1) >> 1) & 3
  cos_t = jnp.where(n == 0, c, jnp.where(n == 1, -s, jnp.where(n == 2, -c, s)))
  sin_t = jnp.where(n == 0, s, jnp.where(n == 1, c, jnp.where(n == 2, -s, -c)))
  return cos_t, sin_t


def standard_normal(key: jax.Array, shape) -> jax.Array:
  """N(0, 1) draws in float32 by Box-Muller from a full-range Exp(1), |x| out to MAX_GAUSSIAN.

  Each pair of draws is sqrt(2 E) (cos, sin)(2 pi V): five words (E's four
  and V's) from three hashes, 1.5 hashes per draw.

  Args:
    key: a PRNG key.
    shape: the output shape.

  Returns:
    A float32 array of N(0, 1) draws.
  """
  shape = tuple(shape)
  size = math.prod(shape)
  pairs = -(-size // 2)
  ke, ku = jax.random.split(key)
  r = jnp.sqrt(2.0 * standard_exponential(ke, (pairs,)))
  v, _ = threefry_words(ku, pairs)
  cos, sin = cos_sin_turns(v)
  # The cosines then the sines, as one [2, pairs] select: XLA's CPU fusion of a
  # concatenate with these producers is several times slower than this.
  rows = jnp.arange(2)[:, None]
  z = jnp.where(rows == 0, r * cos, r * sin).reshape(-1)[:size]
  return z.reshape(shape)


def _iid(sample: Callable[[jax.Array, tuple], jax.Array], std_scale: float):
  """A `draw` of i.i.d. `std_scale * sample(key, shape)`, one key per leaf."""

  def draw(step_key, leaves):
    keys = jax.random.split(step_key, len(leaves))
    return [sample(k, leaf.shape) * std_scale for leaf, k in zip(leaves, keys)]

  return draw


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
  return _noise_transform(_iid(standard_normal, std), key)


def _correlated_noise(draw, key, rows: int, step, state_type) -> optax.GradientTransformation:
  """The noise transform of a correlated strategy: iid draws z_t through `step` per leaf.

  Args:
    draw: `_iid(...)`: the key and the leaves -> one z per leaf, as `gaussian` draws.
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
  draw = _iid(standard_normal, float(noise_multiplier) * float(l2_sensitivity))
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
  draw = _iid(standard_normal, float(noise_multiplier) * float(l2_sensitivity))
  dj, sj = jnp.asarray(d, jnp.float32), jnp.asarray(s, jnp.float32)

  def step(z, buf):  # buf: [m, *z.shape]
    w = z - jnp.tensordot(sj, buf, axes=1)
    return w, dj.reshape((-1,) + (1,) * w.ndim) * buf + w[None]

  return _correlated_noise(draw, key, len(d), step, BLTNoiseState)


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
  draw = _iid(standard_normal, float(noise_multiplier))

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


def find_state(opt_state: PyTree, kind: type):
  """The one state of type `kind` inside a chained optimizer state.

  Args:
    opt_state: the optimizer state (tuples, lists, dicts, chains).
    kind: the state's type (e.g. `QuantileClipState`).

  Returns:
    That state (ValueError when there is none or more than one).
  """
  found = []

  def walk(s):
    if isinstance(s, kind):
      found.append(s)
    elif isinstance(s, (tuple, list)):
      for x in s:
        walk(x)
    elif isinstance(s, dict):
      for x in s.values():
        walk(x)

  walk(opt_state)
  if len(found) != 1:
    raise ValueError(f"expected one {kind.__name__} in the optimizer state, found {len(found)}")
  return found[0]


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
  return _noise_transform(_iid(standard_laplace, scale), key)


def normalize(expected_batch_size: float) -> optax.GradientTransformation:
  """Divides the noisy sum by the EXPECTED number of units per step.

  With Poisson sampling the realised batch size is itself private, so the
  mean is formed with the public expected size (q * N), never the realised
  count. Post-processing: no privacy cost.

  Args:
    expected_batch_size: q N, the expected units per step (> 0).

  Returns:
    An optax transform dividing every leaf by `expected_batch_size`.
  """
  check_positive(expected_batch_size, "expected_batch_size")
  inv = 1.0 / float(expected_batch_size)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda g: (g * inv).astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


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

  return _noise_transform(draw, key)
