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


@functools.lru_cache(maxsize=64)
def _optimal(bands: int, steps: int, iterations: int) -> Tuple[float, ...]:
  start = jnp.asarray(sqrt_strategy(bands), jnp.float32)
  loss = functools.partial(_prefix_error, steps=steps)
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
