"""Banded Toeplitz strategies for correlated noise (DP-MF / BandMF).

The matrix mechanism releases the prefix sums A x of the clipped gradient
sums x_1..x_n through a factorisation A = B C: it privatises C x with
i.i.d. Gaussian noise z and the model sees x + C^-1 z, i.e. step t adds the
correlated noise w_t with (C w)_t = z_t. Here C is lower-triangular,
Toeplitz and b-banded: C[t, t-j] = c_j for 0 <= j < b, so w_t needs only the
b - 1 previous noise vectors (`dpjax.mechanisms.banded_gaussian` keeps them in
its state: (b - 1) x params of memory, none for b = 1).

Sensitivity and amplification (Choquette-Choo et al., "Amplified banded
matrix factorization", arXiv 2306.08153): if a unit takes part only in
steps at least b apart (b-min-separation; cyclic Poisson sampling over b
fixed groups gives it), the columns of C it touches have disjoint supports,
so the L2 sensitivity of C x is the root of the sum of their squared norms;
the strategies here are scaled to a largest column norm of 1. With cyclic
Poisson sampling at rate q within each group, n steps of BandMF with noise
multiplier sigma are as private as ceil(n / b) steps of Poisson-sampled
DP-SGD at (q, sigma) (`dpjax.core.accounting.events.bandmf_event`). b = 1 is
DP-SGD itself: C = I.

Strategies: `sqrt_strategy` truncates the square root of the prefix-sum
matrix (the coefficients of (1 - x)^(-1/2); Fichtenberger et al., arXiv
2202.11205; banded: Kalinin & Lampert, arXiv 2405.13763), a closed form;
`optimal_strategy` minimises the mean squared error of the prefix sums over
the b coefficients (McKenna, arXiv 2405.15913, the banded Toeplitz case),
from the square root as its start.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

STRATEGIES = ("optimal", "sqrt")
# Strategies fitted to the run's horizon by an optimiser (BandMF's "optimal", and "blt",
# `blt_strategy`): a resume refits them, and must land on the same values.
FITTED = ("optimal", "blt")


def check_coefficients(coefs: Sequence[float]) -> np.ndarray:
  """The strategy's coefficients as a float64 array, refused unless usable.

  Args:
    coefs: c_0..c_{b-1}, the bands of the lower-triangular Toeplitz C.

  Returns:
    The coefficients, scaled to unit L2 norm (the largest column norm of C).
  """
  c = np.asarray(coefs, np.float64)
  if c.ndim != 1 or c.size < 1 or not np.all(np.isfinite(c)):
    raise ValueError(f"strategy coefficients must be a non-empty finite 1-D list, got {coefs!r}")
  if not c[0] > 0:
    raise ValueError(f"the strategy's diagonal c_0 must be > 0 (C invertible), got {c[0]}")
  return c / np.linalg.norm(c)


def sqrt_strategy(bands: int) -> np.ndarray:
  """The b-banded square root of the prefix-sum matrix, at unit column norm.

  Example:
    >>> sqrt_strategy(3).round(4).tolist()
    [0.848, 0.424, 0.318]

  Args:
    bands: b >= 1.

  Returns:
    c_0..c_{b-1}: binom(2j, j) / 4^j scaled to unit L2 norm.
  """
  _check_bands(bands)
  r = np.ones(bands)
  for j in range(1, bands):
    r[j] = r[j - 1] * (2 * j - 1) / (2 * j)
  return r / np.linalg.norm(r)


def inverse_coefficients(coefs: Sequence[float], steps: int) -> np.ndarray:
  """The first `steps` coefficients of C^-1 (lower-triangular Toeplitz too).

  Args:
    coefs: the strategy's bands c_0..c_{b-1}.
    steps: n, how many coefficients.

  Returns:
    d_0..d_{n-1} with sum_j c_j d_{k-j} = [k == 0].
  """
  c = np.asarray(coefs, np.float64)
  tail = c[1:]  # c_1..c_{b-1}
  d = np.zeros(steps)
  for k in range(steps):
    m = min(len(tail), k)  # d_{k-1}, ..., d_{k-m}
    acc = (1.0 if k == 0 else 0.0) - (np.dot(tail[:m], d[k - m : k][::-1]) if m else 0.0)
    d[k] = acc / c[0]
  return d


def strategy_matrix(coefs: Sequence[float], steps: int) -> np.ndarray:
  """The dense n x n strategy C (for tests and small problems).

  Args:
    coefs: the bands c_0..c_{b-1}.
    steps: n.

  Returns:
    The lower-triangular banded Toeplitz matrix.
  """
  c = np.asarray(coefs, np.float64)
  C = np.zeros((steps, steps))
  for j, v in enumerate(c[:steps]):
    C += v * np.eye(steps, k=-j)
  return C


def _prefix_error(v: jax.Array, steps: int) -> jax.Array:
  """||c||^2 ||A C^-1||_F^2 / n for prefix sums A: mean squared error at unit sensitivity."""
  b = v.shape[0]

  def body(hist, k):  # hist: [b - 1] the last d's, newest first
    acc = jnp.where(k == 0, 1.0, 0.0) - jnp.dot(v[1:], hist)
    d = acc / v[0]
    return jnp.concatenate([d[None], hist[:-1]]) if b > 1 else hist, d

  _, d = jax.lax.scan(body, jnp.zeros(b - 1, v.dtype), jnp.arange(steps))
  e = jnp.cumsum(d)  # A C^-1 is Toeplitz with coefficients the prefix sums of d
  weights = jnp.arange(steps, 0, -1, dtype=v.dtype)  # coefficient k appears n - k times
  return jnp.dot(v, v) * jnp.dot(weights, e * e) / steps


def mean_error(coefs: Sequence[float], steps: int) -> float:
  """Mean squared error of the n prefix sums per unit noise, at C's sensitivity.

  Args:
    coefs: the bands c_0..c_{b-1} (any scale: the error is scale-free).
    steps: n.

  Returns:
    ||c||^2 ||A C^-1||_F^2 / n (DP-SGD, b = 1: (n + 1) / 2).
  """
  c = np.asarray(coefs, np.float64)
  e = np.cumsum(inverse_coefficients(c, steps))
  return float(np.dot(c, c) * np.dot(np.arange(steps, 0, -1), e * e) / steps)


def _lbfgs(loss, start: jax.Array, iterations: int) -> jax.Array:
  """`iterations` L-BFGS steps on `loss` from `start` (optax, jitted)."""
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  @jax.jit
  def step(v, state):
    value, grad = value_and_grad(v, state=state)
    updates, state = opt.update(grad, state, v, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(v, updates), state

  v, state = start, opt.init(start)
  for _ in range(iterations):
    v, state = step(v, state)
  return v


@functools.lru_cache(maxsize=64)
def _optimal(bands: int, steps: int, iterations: int) -> Tuple[float, ...]:
  start = jnp.asarray(sqrt_strategy(bands), jnp.float32)
  v = _lbfgs(functools.partial(_prefix_error, steps=steps), start, iterations)
  c = np.asarray(v, np.float64)
  if not (np.all(np.isfinite(c)) and c[0] > 0) or mean_error(c, steps) > mean_error(
    np.asarray(start, np.float64), steps
  ):
    c = np.asarray(start, np.float64)  # never worse than the closed form
  return tuple(check_coefficients(c).tolist())


def optimal_strategy(bands: int, steps: int, iterations: int = 200) -> np.ndarray:
  """The b-banded Toeplitz strategy of least mean prefix-sum error over n steps.

  L-BFGS over the b coefficients from the square root; the result is never
  worse than `sqrt_strategy(bands)` (it falls back to it), and its privacy
  does not depend on how good it is: any strategy with unit column norm has
  the same sensitivity.

  Args:
    bands: b >= 1.
    steps: n, the horizon the error is averaged over.
    iterations: L-BFGS iterations.

  Returns:
    c_0..c_{b-1} at unit L2 norm.
  """
  _check_bands(bands)
  if bands == 1:
    return np.ones(1)
  return np.asarray(_optimal(int(bands), int(steps), int(iterations)))


def strategy(name: str, bands: int, steps: int) -> np.ndarray:
  """The named strategy's coefficients.

  Args:
    name: "optimal" or "sqrt".
    bands: b >= 1.
    steps: n, the run's steps (the horizon "optimal" is fitted to).

  Returns:
    c_0..c_{b-1} at unit L2 norm.
  """
  if name not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
  return optimal_strategy(bands, steps) if name == "optimal" else sqrt_strategy(bands)


def sensitivity(
  coefs: Sequence[float], steps: int, min_separation: int, max_participations: int
) -> float:
  """L2 sensitivity of C x when a unit takes part in at most k steps, at least b' apart.

  Formal guarantees:
    For b' >= b (the bands), the columns of C a unit touches have disjoint
    supports, so for any contributions of norm <= 1 the change of C x has
    squared norm at most the sum of those columns' squared norms; column
    norms of a banded Toeplitz C do not grow with the column index, so the
    worst pattern is steps 0, b', 2 b', ... and the bound is attained.
    b' < b is refused (overlapping columns need the general bound).

  Args:
    coefs: the bands c_0..c_{b-1} (as given, not rescaled).
    steps: n.
    min_separation: b', the fewest steps between two participations.
    max_participations: k >= 1.

  Returns:
    The sensitivity (1 for one participation of a unit-norm strategy).
  """
  c = np.asarray(coefs, np.float64)
  _check_bands(min_separation, "min_separation")
  if min_separation < len(c):
    raise ValueError(
      f"min_separation={min_separation} < bands={len(c)}: the columns a unit touches "
      "overlap; the disjoint-column bound does not hold"
    )
  if int(max_participations) != max_participations or max_participations < 1:
    raise ValueError(f"max_participations must be an integer >= 1, got {max_participations}")
  total = 0.0
  for m in range(min(int(max_participations), math.ceil(steps / min_separation))):
    j = m * min_separation
    total += float(np.sum(c[: max(0, min(len(c), steps - j))] ** 2))
  return math.sqrt(total)


def _check_bands(bands: int, name: str = "bands") -> None:
  if isinstance(bands, bool) or int(bands) != bands or bands < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {bands!r}")


# ---------------------------------------------------------------------------
# Buffered linear Toeplitz (BLT) strategies: C with c_0 = 1 and
# c_k = sum_j s_j d_j^(k-1) (k >= 1), m buffers (Dvijotham et al., arXiv
# 2404.16706; McMahan et al., arXiv 2408.08868). Its noise C^-1 z streams with
# m buffers whatever the horizon: w_t = z_t - sum_j s_j buf_j, then
# buf_j <- d_j buf_j + w_t (`dpjax.mechanisms.blt_gaussian`). Not banded, so
# no amplification by sampling: under b-min-separated participation (at most k
# times, b or more steps apart) the run is one Gaussian mechanism whose
# sensitivity is `toeplitz_sensitivity` (`events.blt_event`).


def check_blt(decay: Sequence[float], scale: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
  """BLT parameters as float64 arrays, refused unless C's coefficients are >= 0 and
  non-increasing (0 <= d_j < 1, s_j >= 0, sum s_j <= 1), which `toeplitz_sensitivity` needs.

  Args:
    decay: d_1..d_m, the buffers' decays.
    scale: s_1..s_m, their output scales.

  Returns:
    (decay, scale).
  """
  d, s = np.asarray(decay, np.float64).reshape(-1), np.asarray(scale, np.float64).reshape(-1)
  if d.shape != s.shape or not (np.all(np.isfinite(d)) and np.all(np.isfinite(s))):
    raise ValueError(
      f"BLT decay and scale must be finite lists of one length, got {decay}, {scale}"
    )
  if np.any(d < 0) or np.any(d >= 1) or np.any(s < 0) or s.sum() > 1 + 1e-12:
    raise ValueError(
      f"BLT parameters need 0 <= decay < 1, scale >= 0 and sum(scale) <= 1 (coefficients >= 0 "
      f"and non-increasing), got decay {d.tolist()}, scale {s.tolist()}"
    )
  return d, s


def blt_coefficients(decay: Sequence[float], scale: Sequence[float], steps: int) -> np.ndarray:
  """The Toeplitz coefficients c_0..c_{n-1} of a BLT strategy.

  Example:
    >>> blt_coefficients([0.5], [0.4], 4).tolist()
    [1.0, 0.4, 0.2, 0.1]

  Args:
    decay: d_1..d_m.
    scale: s_1..s_m.
    steps: n.

  Returns:
    c_0 = 1, c_k = sum_j s_j d_j^(k-1).
  """
  d, s = check_blt(decay, scale)
  k = np.arange(max(int(steps) - 1, 0))
  return np.concatenate([[1.0], (s[None, :] * d[None, :] ** k[:, None]).sum(1)])[: int(steps)]


def _minsep_count(steps: int, min_separation: int, max_participations: int) -> int:
  _check_bands(min_separation, "min_separation")
  if int(max_participations) != max_participations or max_participations < 1:
    raise ValueError(f"max_participations must be an integer >= 1, got {max_participations}")
  return min(int(max_participations), math.ceil(steps / min_separation))


def toeplitz_sensitivity(
  coefs: Sequence[float], steps: int, min_separation: int, max_participations: int
) -> float:
  """L2 sensitivity of C x for a lower-triangular Toeplitz C with coefficients >= 0 and
  non-increasing, when a unit takes part in at most k steps, at least b apart.

  Formal guarantees:
    C's columns then have non-negative inner products, so contributions of
    norm <= 1 change C x most when they are all the same unit vector, and
    among b-separated patterns the earliest, tightest one (steps 0, b, 2b,
    ...) has the largest norm (Kalinin & Lampert, arXiv 2405.13763, Thm 2):
    the bound is ||C u|| for that pattern's indicator u, and it is attained.

  Args:
    coefs: c_0, c_1, ... (fewer than n: the rest are 0).
    steps: n.
    min_separation: b, the fewest steps between two participations.
    max_participations: k >= 1.

  Returns:
    The sensitivity.
  """
  c = np.zeros(int(steps))
  given = np.asarray(coefs, np.float64)[: int(steps)]
  c[: len(given)] = given
  if np.any(c < 0) or np.any(np.diff(c) > 1e-12):
    raise ValueError("toeplitz_sensitivity needs coefficients >= 0 and non-increasing")
  k = _minsep_count(steps, min_separation, max_participations)
  u = np.zeros(int(steps))
  u[: k * int(min_separation) : int(min_separation)] = 1.0
  return float(np.linalg.norm(np.convolve(c, u)[: int(steps)]))


def _blt_loss(params: jax.Array, steps: int, pattern: jax.Array) -> jax.Array:
  """sensitivity^2 x mean prefix-sum error per unit noise of the BLT these logits give."""
  m = params.shape[0] // 2
  decay = jax.nn.sigmoid(params[:m])
  scale = jax.nn.sigmoid(params[-1]) * jax.nn.softmax(params[m:-1])

  def stream(inverse):
    def body(buf, u):  # the buffers hold the past inputs of C: x for C x, the output for C^-1 y
      if inverse:
        x = u - jnp.dot(scale, buf)
        return decay * buf + x, x
      return decay * buf + u, u + jnp.dot(scale, buf)

    return body

  impulse = jnp.zeros(steps).at[0].set(1.0)
  _, y = jax.lax.scan(stream(False), jnp.zeros(m), pattern)  # C u
  _, d = jax.lax.scan(stream(True), jnp.zeros(m), impulse)  # C^-1's coefficients
  e = jnp.cumsum(d)
  weights = jnp.arange(steps, 0, -1, dtype=e.dtype)
  return jnp.dot(y, y) * jnp.dot(weights, e * e) / steps


def blt_error(
  decay: Sequence[float],
  scale: Sequence[float],
  steps: int,
  min_separation: int,
  max_participations: int,
) -> float:
  """Mean squared error of the n prefix sums per unit noise, at the BLT's min-sep sensitivity.

  Args:
    decay: d_1..d_m.
    scale: s_1..s_m.
    steps: n.
    min_separation: b.
    max_participations: k.

  Returns:
    sens^2 ||A C^-1||_F^2 / n (DP-SGD without amplification, C = I: k' (n + 1) / 2).
  """
  c = blt_coefficients(decay, scale, steps)
  sens = toeplitz_sensitivity(c, steps, min_separation, max_participations)
  e = np.cumsum(inverse_coefficients(c, steps))
  return float(sens**2 * np.dot(np.arange(steps, 0, -1), e * e) / steps)


@functools.lru_cache(maxsize=64)
def _blt(buffers: int, steps: int, b: int, k: int, iterations: int) -> Tuple[tuple, tuple]:
  j = np.arange(1, buffers + 1)
  decay0 = 1.0 - float(steps) ** (-j / (buffers + 1))  # spread over the horizon's time scales
  start = jnp.asarray(
    np.concatenate([np.log(decay0 / (1 - decay0)), np.zeros(buffers), [0.0]]), jnp.float32
  )
  pattern = np.zeros(steps, np.float32)
  pattern[: _minsep_count(steps, b, k) * b : b] = 1.0
  v = _lbfgs(
    functools.partial(_blt_loss, steps=steps, pattern=jnp.asarray(pattern)), start, iterations
  )
  v = np.clip(np.asarray(v, np.float64), -500.0, 500.0)  # logits: no overflow in exp
  decay = 1.0 / (1.0 + np.exp(-v[:buffers]))
  p = np.exp(v[buffers:-1] - v[buffers:-1].max())
  scale = p / p.sum() / (1.0 + np.exp(-v[-1]))
  none = (np.zeros(buffers), np.zeros(buffers))  # C = I
  try:
    if blt_error(decay, scale, steps, b, k) < blt_error(*none, steps, b, k):
      return tuple(decay.tolist()), tuple(scale.tolist())
  except ValueError:  # rounding left the constraints: keep the identity
    pass
  return tuple(none[0].tolist()), tuple(none[1].tolist())


def blt_strategy(
  buffers: int, steps: int, min_separation: int, max_participations: int, iterations: int = 300
) -> Tuple[np.ndarray, np.ndarray]:
  """The m-buffer BLT of least `blt_error` for this horizon and participation.

  L-BFGS over the decays (in (0, 1)) and the scales (>= 0, summing to < 1, so
  the coefficients stay >= 0 and non-increasing and `toeplitz_sensitivity`
  holds). Never worse than C = I (it falls back to it); its privacy does not
  depend on how good it is: the noise is scaled by the sensitivity of the
  parameters returned, computed in float64.

  Args:
    buffers: m >= 1.
    steps: n.
    min_separation: b, the fewest steps between a unit's participations.
    max_participations: k.
    iterations: L-BFGS iterations.

  Returns:
    (decay, scale), each [m].
  """
  _check_bands(buffers, "buffers")
  _minsep_count(steps, min_separation, max_participations)
  d, s = _blt(int(buffers), int(steps), int(min_separation), int(max_participations), iterations)
  return np.asarray(d), np.asarray(s)
