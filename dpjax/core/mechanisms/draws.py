"""The noise transform's frame and its full-range draws: what every mechanism adds noise with.

`noise_transform(draw, key)` is the optax transform that adds one draw to
the clipped sum per update, with a fresh key each step; `standard_normal`
and `standard_laplace` are exact out to ~11.6 sigma and ~67 scales (the
float32 inverse-CDF draws of `jax.random` stop at ~5.3 sigma, far inside
what a shifted release can be told apart at). `normalize` divides the noised
sum by the public expected batch; `find_state` finds one state in a chain.
"""

from __future__ import annotations

import math
import secrets
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from dpjax.core.checks import check_positive

PyTree = Any


def secret_key() -> jax.Array:
  """A fresh noise key from 64 bits of OS entropy (`secrets`), for a private step of your own.

  The guarantee of a noise transform assumes nobody can predict its key: a
  fixed `jax.random.PRNGKey(0)` lets anyone who knows the code subtract the
  noise. Keep the key where the noise may be seen (never log or publish it).

  Example:
    >>> k1, k2 = secret_key(), secret_key()
    >>> k1.shape, str(k1.dtype), bool((k1 != k2).any())
    ((2,), 'uint32', True)

  Returns:
    A raw uint32[2] threefry key (what `jax.random.PRNGKey` returns).
  """
  return jnp.asarray([secrets.randbits(32), secrets.randbits(32)], dtype=jnp.uint32)


class NoiseState(NamedTuple):
  """State of a noise transform: the next key and the number of noised steps."""

  key: jax.Array
  count: jax.Array  # int32 scalar


def noise_transform(
  draw: Callable[[jax.Array, list], list], key: jax.Array
) -> optax.GradientTransformation:
  """Adds `draw(step_key, leaves)` (one f32 noise array per leaf), fresh key each step.

  Args:
    draw: (a step's key, the update's leaves) -> one float32 noise array per leaf.
    key: the first key (raw uint32[2] or typed); the state holds the next one.

  Returns:
    An optax transform whose `update(sum, state)` returns (sum + noise, state).
  """

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


def counters(shape) -> jax.Array:
  """uint32 row-major positions 0..n-1 laid out in `shape`, built from per-axis iotas.

  Elementwise in every axis, so a sharded consumer draws only its own slice:
  XLA partitions the hash over the mesh like any elementwise op, where a flat
  `iota(n)` reshaped to a sharded shape is computed whole on every device.

  Example:
    >>> counters((2, 3)).tolist()
    [[0, 1, 2], [3, 4, 5]]

  Args:
    shape: the array shape (fewer than 2^32 entries).

  Returns:
    A uint32 array of `shape`.
  """
  shape = tuple(shape)
  pos = jnp.zeros(shape, jnp.uint32)
  for axis, n in enumerate(shape):
    pos = pos * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
  return pos


def threefry_words(key: jax.Array, shape) -> tuple[jax.Array, jax.Array]:
  """The two uint32 halves of Threefry-2x32 under `key` at the counters `counters(shape)`.

  Example:
    >>> hi, lo = threefry_words(jax.random.key(0), 4)
    >>> bool(jnp.all((hi ^ lo) == jax.random.bits(jax.random.key(0), (4,), jnp.uint32)))
    True

  Args:
    key: a PRNG key (typed, or a raw uint32[2] threefry key).
    shape: the output shape (an int: a flat size); entry i (row-major) is counter i.

  Returns:
    Two `shape` uint32 arrays of independent random words (for a key of
    another implementation, `jax.random.bits(key, (2, *shape))`'s two rows).
  """
  shape = (shape,) if isinstance(shape, int) else tuple(shape)
  data = _threefry_key_data(key)
  if data is None or math.prod(shape) >= 2**32:
    words = jax.random.bits(key, (2,) + shape, jnp.uint32)
    return words[0], words[1]
  k1, k2 = data[0], data[1]
  ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
  # The counter of word i is the 64-bit i as (hi, lo) = (0, i) below 2^32.
  x0 = jnp.zeros(shape, jnp.uint32) + ks[0]
  x1 = counters(shape) + ks[1]
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
  ka, kb = jax.random.split(key)
  w0, w1 = threefry_words(ka, shape)
  w2, significand = threefry_words(kb, shape)
  return exponential_from_bits((w0, w1, w2), significand)


def standard_laplace(key: jax.Array, shape) -> jax.Array:
  """Laplace(0, 1) draws in float32, |x| out to MAX_EXPONENTIAL.

  Args:
    key: a PRNG key.
    shape: the output shape.

  Returns:
    A float32 array of Laplace(0, 1) draws.
  """
  ke, ks = jax.random.split(key)
  coin, _ = threefry_words(ks, shape)
  sign = jnp.where(coin < jnp.uint32(2**31), 1.0, -1.0)  # the top bit
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
  # Pair j's two draws sit side by side on the last axis (its cosine, then its
  # sine), so any slice of whole pairs is drawn from its own counters alone: a
  # device holding a slice of a sharded parameter hashes only that slice.
  in_shape = bool(shape) and shape[-1] % 2 == 0
  pairs = shape[:-1] + (shape[-1] // 2,) if in_shape else (-(-math.prod(shape) // 2),)
  ke, ku = jax.random.split(key)
  r = jnp.sqrt(2.0 * standard_exponential(ke, pairs))[..., None]
  v, _ = threefry_words(ku, pairs)
  cos, sin = cos_sin_turns(v[..., None])
  # One select into [*pairs, 2]: XLA's CPU fusion of a concatenate (or a stack)
  # with these producers is several times slower than this.
  side = jax.lax.broadcasted_iota(jnp.int32, pairs + (2,), len(pairs))
  z = jnp.where(side == 0, r * cos, r * sin)
  if in_shape:
    return z.reshape(shape)
  return z.reshape(-1)[: math.prod(shape)].reshape(shape)


def iid(sample: Callable[[jax.Array, tuple], jax.Array], std_scale: float):
  """A `draw` of i.i.d. `std_scale * sample(key, shape)`, one key per leaf.

  Args:
    sample: (key, shape) -> a float32 array of standard draws (`standard_normal`).
    std_scale: their scale.

  Returns:
    The draw, for `noise_transform`.
  """

  def draw(step_key, leaves):
    keys = jax.random.split(step_key, len(leaves))
    return [sample(k, leaf.shape) * std_scale for leaf, k in zip(leaves, keys)]

  return draw


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
