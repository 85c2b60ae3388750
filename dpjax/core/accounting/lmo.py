"""LMO-DP noise (Yang et al. 2024, arXiv 2405.18776): sound accounting and parameter search.

The mechanism (`dpjax.core.mechanisms.lmo`): each step draws ONE inverse scale

    b = a1 * Gamma(k, theta) + a3 * Exp(rate lam) + a4 * Uniform(Ua, Ub)

and adds i.i.d. Laplace(0, Delta / b) noise to every coordinate of the sum of
per-example gradients clipped to L1 norm Delta.

Why the epsilon reported here is an upper bound (the argument):

1. **Reveal b.** The release is a post-processing of the pair (b, noisy sum),
   so any guarantee for the pair holds for the release. This step is not a
   formality: with one b shared by d coordinates, the d noise values estimate
   b to relative precision ~1/sqrt(d), so for gradient-sized d the adversary
   effectively knows b. The 1-D analysis of the mixture density (b hidden),
   and a fortiori an "equivalent Gaussian" sigma, do NOT bound the privacy of
   d-dimensional noise with a shared b; they are not used here.
2. **Given b** the step is the Laplace mechanism with scale Delta / b on a
   sum whose L1 sensitivity under add/remove of one example is Delta (L1
   clipping; with L2 clipping at C the L1 sensitivity is only sqrt(d) * C,
   which is what `mechanisms.lmo` charges then). Its privacy loss is dominated
   by the 1-D pair (Lap(0, s), Lap(Delta, s)): in d dimensions the loss is a
   sum of per-coordinate Laplace losses whose shifts add up to at most Delta,
   and the single-coordinate split is the worst (the standard dominating pair
   of the L1 Laplace mechanism; `tests/test_lmo.py` checks it numerically in
   two dimensions).
3. **Poisson subsampling** at rate q: the subsampled dominating pair
   dominates the subsampled mechanism (Zhu, Dong & Wang 2022); its
   hockey-stick divergence is in closed form (`laplace_delta`, equal to
   dp-accounting's `LaplacePrivacyLoss`).
4. **Mixing over b.** b is public (step 1) and independent of the data, so
   one step's privacy-loss distribution is the b-mixture of the per-b ones.
   b is cut into bins; each bin is charged its LARGEST b (the subsampled
   Laplace privacy profile grows with b), the mass above `b_max` (at most
   `tail`) is charged infinite loss, and every CDF value of b (by adaptive
   quadrature) is lowered by its error tolerance before differencing, so the
   distribution used is stochastically larger than the true one. The
   mixture's divergence is the weighted sum of the bins'; pessimistic
   connect-the-dots (Doroshenko et al. 2022, arXiv 2207.04380) turns it into
   a PMF on the loss grid whose divergence is at least the mixture's at
   every epsilon (a point mass b gives dp-accounting's own Laplace PLD).
5. **T steps** (fresh b each step): PLD self-composition by FFT
   (dp-accounting). epsilon(delta) is an upper bound.

Cross-check (`rdp_epsilon`): with b revealed, exp((a-1) RDP_a) of one step is
E_b exp((a-1) RDP_a^Laplace(b)) = (a M(a-1) + (a-1) M(-a)) / (2a - 1), with
M the MGF of b (the formula of the paper); q < 1 uses the general
Poisson-subsampled RDP bound of Zhu & Wang 2019 at integer orders. It is also
an upper bound, looser than the PLD, and infinite whenever M(a-1) is (heavy
Gamma/Exp tails), so it is never the reported number.

One module, longer than most, on purpose: the argument above and the code of
each of its steps (the parameters of b and their density, the binned
per-step PLD, the event and its accountant, the RDP cross-check) are read and
checked together.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, Optional, Sequence, Tuple

import attr
import dp_accounting
import numpy as np
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy import special

from dpjax.core.accounting import events as ev
from dpjax.core.checks import check_delta, check_sampling_rate, check_steps

# Defaults of the sound accountant: bins of b and the tail charged as infinite loss.
BINS = 128
TAIL = 1e-12
DISCRETIZATION = 1e-4
_CDF_TOL = 5e-15  # allowance for float error of the closed-form CDF (values near 1)
UNIFORM_CELLS = 64
MAX_GRID = 2_000_000  # loss-grid cells per direction; coarser (still pessimistic) beyond


@dataclasses.dataclass(frozen=True)
class LMOParams:
  """b = a1 Gamma(k, theta) + a3 Exp(rate lam) + a4 Uniform(Ua, Ub); noise Laplace(0, Delta / b)."""

  a1: float = 0.0
  a3: float = 0.0
  a4: float = 1.0
  theta: float = 1.0
  k: float = 1.0
  lam: float = 1.0
  Ua: float = 1.0
  Ub: float = 1.0

  def __post_init__(self):
    for name in ("a1", "a3", "a4", "Ua", "Ub"):
      v = getattr(self, name)
      if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"LMO parameter {name} must be finite and >= 0, got {v}")
    for name in ("theta", "k", "lam"):
      v = getattr(self, name)
      if not (math.isfinite(v) and v > 0):
        raise ValueError(f"LMO parameter {name} must be finite and > 0, got {v}")
    if self.Ub < self.Ua:
      raise ValueError(f"need Ua <= Ub, got Ua={self.Ua}, Ub={self.Ub}")
    if self.a1 == 0 and self.a3 == 0 and (self.a4 == 0 or self.Ub == 0):
      raise ValueError("b is identically 0 (infinite noise): give a positive a1, a3 or a4 * Ub")

  @classmethod
  def laplace(cls, b: float) -> LMOParams:
    """The point mass b: plain Laplace noise with scale Delta / b.

    Args:
      b: the fixed noise rate.

    Returns:
      LMOParams with all mass on b.
    """
    return cls(a1=0.0, a3=0.0, a4=1.0, Ua=float(b), Ub=float(b))

  def as_dict(self) -> Dict[str, float]:
    """The parameters as a dict of floats (for JSON)."""
    return dataclasses.asdict(self)

  def scaled(self, c: float) -> LMOParams:
    """The same shape with b multiplied by c (a1, a3, a4 scaled): noise scale / c.

    Args:
      c: the factor (> 0).

    Returns:
      The scaled LMOParams.
    """
    if not (math.isfinite(c) and c > 0):
      raise ValueError(f"scale must be finite and > 0, got {c}")
    return dataclasses.replace(self, a1=self.a1 * c, a3=self.a3 * c, a4=self.a4 * c)

  # --- the distribution of b ------------------------------------------------

  def mgf(self, t):
    """E[exp(t b)] (inf where it diverges); vectorised over t.

    Args:
      t: a float or an array of floats.

    Returns:
      An array of E[exp(t b)] with the shape of `t`.
    """
    t = np.asarray(t, np.float64)
    out = np.ones_like(t)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      if self.a1 > 0:
        base = 1.0 - self.a1 * self.theta * t
        out = out * np.where(base > 0, np.abs(base) ** (-self.k), np.inf)
      if self.a3 > 0:
        den = self.lam - self.a3 * t
        out = out * np.where(den > 0, self.lam / np.where(den > 0, den, 1.0), np.inf)
      if self.a4 > 0:
        lo, hi = self.a4 * self.Ua, self.a4 * self.Ub
        if hi > lo:
          w = t * (hi - lo)
          small = np.abs(w) < 1e-8
          u = np.where(small, 1.0, (np.exp(t * hi) - np.exp(t * lo)) / np.where(small, 1.0, w))
          out = out * np.where(small, np.exp(t * lo) * (1 + w / 2), u)
        else:
          out = out * np.exp(t * lo)
    return out

  def cdf_many(self, xs) -> Tuple[np.ndarray, float]:
    """(P(b' <= x) for every x, an absolute error bound), for the charged b' >= b.

    b' replaces the Uniform part by the upper end of its sub-interval among
    `UNIFORM_CELLS` equal ones (b' >= b pointwise: pessimistic, at most
    a4 (Ub - Ua) / UNIFORM_CELLS larger). For Z = a1 Gamma + a3 Exp,
    P(Z <= z) = F_G(z) - J(z) with J(z) = int_0^z e^{-(z-g)/s_e} f_G(g) dg
    = e^{-z/s_g} z^k / (Gamma(k+1) s_g^k) 1F1(1; k+1; -c z), c = 1/s_e - 1/s_g
    (Kummer's transformation of int g^(k-1) e^{c g} dg), all in closed form.

    Args:
      xs: the points x (an array).

    Returns:
      (the CDF values of b' at xs, an absolute error bound of each).
    """
    x = np.asarray(xs, np.float64)
    if self.a4 > 0 and self.Ub > self.Ua:
      cells = self.a4 * (
        self.Ua + (self.Ub - self.Ua) * np.arange(1, UNIFORM_CELLS + 1) / UNIFORM_CELLS
      )
    else:
      cells = np.array([self.a4 * self.Ua])
    z = x[:, None] - cells[None, :]
    return np.mean(self._z_cdf(z), axis=1), _CDF_TOL

  def _z_cdf(self, z):
    """P(a1 Gamma(k, theta) + a3 Exp(lam) <= z), vectorised."""
    zp = np.maximum(z, 0.0)
    has_g, has_e = self.a1 > 0, self.a3 > 0
    if not has_g and not has_e:
      return (z >= 0).astype(np.float64)
    if has_g:
      s_g = self.a1 * self.theta
      fg = special.gammainc(self.k, zp / s_g)
    if has_e:
      s_e = self.a3 / self.lam
    if has_g and not has_e:
      out = fg
    elif has_e and not has_g:
      out = -np.expm1(-zp / s_e)
    else:
      c = 1.0 / s_e - 1.0 / s_g
      with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        log_pre = (
          -zp / s_g
          + self.k * np.log(np.where(zp > 0, zp, 1.0))
          - special.gammaln(self.k + 1)
          - self.k * math.log(s_g)
        )
        j = np.exp(log_pre) * special.hyp1f1(1.0, self.k + 1.0, -c * zp)
      j = np.where(zp > 0, j, 0.0)
      out = fg - j
    return np.where(z > 0, np.clip(out, 0.0, 1.0), 0.0)

  def sf_bound(self, xs) -> np.ndarray:
    """An upper bound on P(b' > x), accurate in the far tail (no 1 - CDF cancellation).

    b' <= a1 G + a3 E + a4 Ub, and P(a1 G + a3 E > z) <= P(a1 G > z/2) + P(a3 E > z/2).

    Args:
      xs: the points x (an array).

    Returns:
      Upper bounds on P(b' > x), at most 1.
    """
    z = np.asarray(xs, np.float64) - self.a4 * self.Ub
    zp = np.maximum(z, 0.0)
    has_g, has_e = self.a1 > 0, self.a3 > 0
    if has_g and has_e:
      out = special.gammaincc(self.k, zp / 2 / (self.a1 * self.theta)) + np.exp(
        -zp / 2 / (self.a3 / self.lam)
      )
    elif has_g:
      out = special.gammaincc(self.k, zp / (self.a1 * self.theta))
    elif has_e:
      out = np.exp(-zp / (self.a3 / self.lam))
    else:
      out = np.zeros_like(zp)
    return np.where(z > 0, np.minimum(out, 1.0), 1.0)

  def cdf(self, x: float) -> Tuple[float, float]:
    """(P(b' <= x), an absolute error bound): `cdf_many` at one point.

    Args:
      x: the point.

    Returns:
      (the CDF value, its error bound).
    """
    v, e = self.cdf_many([x])
    return float(v[0]), e

  def sample(self, rng: np.random.Generator, size) -> np.ndarray:
    """Draws b (the exact mixture, not b') with a NumPy generator: for tests and audits.

    Args:
      rng: the generator.
      size: the output shape.

    Returns:
      An array of samples of b.
    """
    b = np.zeros(size)
    if self.a1 > 0:
      b = b + self.a1 * rng.gamma(self.k, self.theta, size)
    if self.a3 > 0:
      b = b + self.a3 * rng.exponential(1.0 / self.lam, size)
    if self.a4 > 0:
      b = b + self.a4 * rng.uniform(self.Ua, self.Ub, size)
    return b


def unit_noise(cands: Sequence[LMOParams], objective: str) -> np.ndarray:
  """Per-coordinate noise at sensitivity 1 for many candidates: E[1/b] or 2 E[1/b^2].

  1/b^m = int t^(m-1) e^(-t b) dt / (m-1)!, so E[1/b^m] is an integral of the
  MGF M(-t); t = e^s on a fixed grid. Divergence shows as a non-vanishing
  integrand at the end of the grid (inf).

  Args:
    cands: the candidate parameters.
    objective: "abs" (E[1/b]) or "var" (2 E[1/b^2]).

  Returns:
    One value per candidate (inf where the moment diverges).
  """
  if objective not in ("abs", "var"):
    raise ValueError(f"objective must be 'abs' or 'var', got {objective!r}")
  s = np.linspace(-30.0, 40.0, 20001)
  t = np.exp(s)
  ds = s[1] - s[0]
  power = 1 if objective == "abs" else 2
  out = np.empty(len(cands))
  for i in range(0, len(cands), 512):
    chunk = cands[i : i + 512]
    m = np.stack([c.mgf(-t) for c in chunk])
    val = np.sum(m * t**power, axis=1) * ds
    diverges = m[:, -1] * t[-1] ** power > 1e-6
    val = np.where(diverges, np.inf, val)
    out[i : i + 512] = val if objective == "abs" else 2.0 * val
  return out


def noise_magnitude(params: LMOParams, sensitivity: float = 1.0, objective: str = "abs") -> float:
  """Per-coordinate noise: E|Z| = Delta E[1/b] ("abs") or Var Z = 2 Delta^2 E[1/b^2] ("var").

  Args:
    params: the distribution of b.
    sensitivity: the L1 sensitivity Delta.
    objective: "abs" or "var".

  Returns:
    The per-coordinate noise magnitude.
  """
  power = 1 if objective == "abs" else 2
  return float(sensitivity**power * unit_noise([params], objective)[0])


# --- the PLD accountant ------------------------------------------------------


def _b_bins(params: LMOParams, bins: int, tail: float):
  """(b values charged, their probabilities, mass charged as infinite loss)."""
  if params.a1 == 0 and params.a3 == 0 and (params.a4 == 0 or params.Ub == params.Ua):
    return np.array([params.a4 * params.Ub]), np.array([1.0]), 0.0
  shift = params.a4 * params.Ua
  # Any b_max with P(b > b_max) <= tail is valid: the first of a fine geometric ladder.
  start = max(shift, 1e-3)
  b_max = None
  while b_max is None:
    ladder = start * np.geomspace(1.0, 8.0, 64)
    ok = np.flatnonzero(params.sf_bound(ladder) <= tail)
    if len(ok):
      b_max = float(ladder[ok[0]])
    start *= 8.0
    if start > 1e9:
      raise ValueError(f"b has no usable upper quantile for {params}")
  b_min = max(shift, b_max * 1e-4)
  edges = np.geomspace(b_min, b_max, bins)
  # CDF lowered by its error: the distribution charged is stochastically larger.
  vals, err = params.cdf_many(edges)
  cdf = np.maximum.accumulate(np.maximum(vals - err, 0.0))
  probs = np.diff(np.concatenate([[0.0], cdf]))  # bin (e_{j-1}, e_j] -> charged e_j
  return edges, probs, max(0.0, 1.0 - float(cdf[-1]))


def _grid_step(b_hi: float, q: float, discretization: float) -> float:
  """The loss-grid step: `discretization`, coarser (still pessimistic) past MAX_GRID cells."""
  span = (
    2.0 * b_hi
    if q == 1
    else math.log1p(-q + q * math.exp(min(b_hi, 700.0))) - math.log1p(-q + q * math.exp(-b_hi))
  )
  return max(float(discretization), span / MAX_GRID)


def grid_step(
  params: LMOParams,
  sampling_rate: float,
  *,
  bins: int = BINS,
  tail: float = TAIL,
  discretization: float = DISCRETIZATION,
) -> float:
  """The discretisation `step_pld` uses for these arguments (PLDs compose on one grid).

  Args:
    params: the distribution of b.
    sampling_rate: q.
    bins: bins of b's distribution.
    tail: mass of b charged as infinite loss.
    discretization: the requested loss-grid spacing.

  Returns:
    The loss-grid spacing.
  """
  values, probs, _ = _b_bins(params, bins, tail)
  return _grid_step(float(values[probs > 0].max()), float(sampling_rate), discretization)


def step_pld(
  params: LMOParams,
  sampling_rate: float,
  *,
  bins: int = BINS,
  tail: float = TAIL,
  discretization: float = DISCRETIZATION,
) -> pld_lib.PrivacyLossDistribution:
  """Privacy-loss distribution of ONE Poisson-sampled LMO step (add/remove, b revealed).

  Per bin of b, the Poisson-subsampled Laplace pair's hockey-stick
  divergence in closed form (`laplace_delta`), mixed with the bins' weights
  and turned into a PMF by pessimistic connect-the-dots (`_mixture_pmf`).
  A point mass b is dp-accounting's own Laplace PLD.

  Args:
    params: the distribution of b.
    sampling_rate: q.
    bins: bins of b's distribution.
    tail: mass of b charged as infinite loss.
    discretization: the requested loss-grid spacing.

  Returns:
    A dp-accounting PrivacyLossDistribution (pessimistic).
  """
  ev.check_sampling_rate(sampling_rate)
  q = float(sampling_rate)
  values, probs, inf_mass = _b_bins(params, bins, tail)
  keep = probs > 0
  values, probs = values[keep], probs[keep]
  h = _grid_step(float(values.max()), q, discretization)
  remove = _mixture_pmf(values, probs, inf_mass, q, h, remove=True)
  if q == 1.0:  # the Laplace pair is symmetric: add and remove have one PLD
    return pld_lib.PrivacyLossDistribution(remove)
  add = _mixture_pmf(values, probs, inf_mass, q, h, remove=False)
  return pld_lib.PrivacyLossDistribution(remove, add)


def laplace_delta(b: float, q: float, eps: np.ndarray, remove: bool) -> np.ndarray:
  """Hockey-stick divergence of the Poisson-subsampled Laplace pair, in closed form.

  The pair is Lap(0, 1/b) vs Lap(1, 1/b) (privacy loss u = b(|x| - |x - 1|)
  in [-b, b]), subsampled at rate q. Removal compares (1 - q) mu0 + q mu1
  with mu0 and has delta(eps) = q d(u*), u* = log(1 + (e^eps - 1) / q),
  d(t) = 1 - e^((t - b)/2) on [-b, b] (1 - e^t below, 0 above); addition
  compares mu0 with the mixture and has delta(eps) = q e^eps d'(u*),
  u* = log(1 + (e^-eps - 1) / q), d'(t) = e^t - e^((t - b)/2) on [-b, b]
  (0 below, e^t - 1 above). `tests/test_lmo.py` checks both against
  dp-accounting's `LaplacePrivacyLoss`.

  Args:
    b: the inverse noise scale (sensitivity 1).
    q: the sampling rate, in (0, 1].
    eps: the epsilons (an array).
    remove: the removal direction (else addition).

  Returns:
    delta(eps), an array like `eps`.
  """
  eps = np.asarray(eps, np.float64)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    if remove:
      arg = np.expm1(eps) / q  # e^u* - 1
      t = np.log1p(np.maximum(arg, -1.0))
      inside = -np.expm1((t - b) / 2)
      d = np.where(t < -b, -np.expm1(t), np.where(t >= b, 0.0, inside))
      out = np.where(arg <= -1.0, -np.expm1(eps), q * d)
    else:
      arg = np.expm1(-eps) / q
      t = np.log1p(np.maximum(arg, -1.0))
      inside = np.exp((t - b) / 2) * np.expm1((t + b) / 2)
      d = np.where(t <= -b, 0.0, np.where(t > b, np.expm1(t), inside))
      out = np.where(arg <= -1.0, 0.0, q * np.exp(eps) * d)
  return np.clip(out, 0.0, 1.0)


def _loss_range(b: float, q: float, remove: bool) -> Tuple[float, float]:
  """The smallest and largest privacy loss of the subsampled Laplace pair at b."""
  lo = math.log1p(q * math.expm1(-b))
  hi = math.log1p(q * math.expm1(min(b, 700.0))) if q < 1 else b
  return (lo, hi) if remove else (-hi, -lo)


def _mixture_pmf(
  values, probs, inf_mass: float, q: float, h: float, remove: bool
) -> pld_pmf.PLDPmf:
  """Connect-the-dots PMF (arXiv 2207.04380) of the b-mixture of subsampled Laplace pairs.

  The mixture's hockey-stick divergence is the probability-weighted sum of
  the bins' (b is public; `laplace_delta`), plus the mass charged as
  infinite loss at every epsilon. Pessimistic connect-the-dots on the grid
  of step h turns these deltas into a PMF whose divergence is at least the
  mixture's at every epsilon, without the per-step bias of rounding each
  loss up to the grid.
  """
  ranges = [_loss_range(float(b), q, remove) for b in values]
  starts = [math.floor(a / h) for a, _ in ranges]
  ends = [math.ceil(z / h) for _, z in ranges]
  lo, hi = min(starts), max(ends)
  eps = np.arange(lo, hi + 1) * h
  deltas = np.full(len(eps), float(inf_mass))
  # Below a bin's smallest loss its divergence is 1 - e^eps (no mass at
  # infinity), above its largest 0: only the span between is evaluated.
  below = np.zeros(len(eps) + 1)
  for b, a, z, p in zip(values, starts, ends, probs):
    i, j = a - lo, z - lo + 1
    deltas[i:j] += p * laplace_delta(float(b), q, eps[i:j], remove)
    below[0] += p
    below[i] -= p
  deltas += np.cumsum(below)[:-1] * np.maximum(0.0, -np.expm1(eps))
  return pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap(h, lo, hi, np.minimum(deltas, 1.0))


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(
  params: LMOParams,
  q: float,
  steps: int,
  delta: float,
  bins: int,
  tail: float,
  discretization: float,
) -> float:
  step = step_pld(params, q, bins=bins, tail=tail, discretization=discretization)
  composed = step.self_compose(steps) if steps > 1 else step
  return float(composed.get_epsilon_for_delta(delta))


def default_tail(delta: float, steps: int) -> float:
  """TAIL, or less when T steps of it would use more than 10% of delta.

  Args:
    delta: the target delta.
    steps: the number of steps T.

  Returns:
    The tail mass charged per step.
  """
  return max(min(TAIL, 0.1 * delta / steps), 2 * _CDF_TOL)


def lmo_epsilon(
  params: LMOParams,
  sampling_rate: float,
  steps: int,
  delta: float,
  *,
  bins: int = BINS,
  tail: Optional[float] = None,
  discretization: float = DISCRETIZATION,
) -> float:
  """Upper bound on epsilon of `steps` Poisson-sampled LMO steps (per example, add/remove).

  `tail` (mass of b charged as infinite loss per step): `default_tail` if None.

  Args:
    params: the distribution of b.
    sampling_rate: q.
    steps: the number of steps.
    delta: the target delta.
    bins: bins of b's distribution.
    tail: mass of b charged as infinite loss per step.
    discretization: the loss-grid spacing.

  Returns:
    The epsilon (memoised).
  """
  check_sampling_rate(sampling_rate)
  check_steps(steps)
  check_delta(delta)
  if tail is None:
    tail = default_tail(delta, steps)
  if tail * steps >= delta:
    raise ValueError(f"tail={tail} charged over {steps} steps reaches delta={delta}; lower tail")
  return _epsilon_cached(
    params,
    float(sampling_rate),
    int(steps),
    float(delta),
    int(bins),
    float(tail),
    float(discretization),
  )


# --- the event and its accountant --------------------------------------------


@attr.s(frozen=True, slots=True, auto_attribs=True)
class LMODpEvent(dp_accounting.DpEvent):
  """One Poisson-sampled LMO-DP release (b revealed), per unit, add/remove.

  Composed like any `DpEvent` (`SelfComposedDpEvent`, `ComposedDpEvent`) and
  consumed by `LMOAccountant`, which `dpjax.accounting.epsilon(..., "pld")`
  picks for events holding one.
  """

  params: LMOParams
  sampling_rate: float


class LMOAccountant(ev.LeafAccountant):
  """PLD accountant for compositions of `LMODpEvent`s (an upper bound).

  The tail of b charged as infinite loss depends on delta and on the number
  of releases (`default_tail`), so the PLDs are built when epsilon or delta
  is asked for. One kind of release composed T times gives exactly
  `lmo_epsilon(params, q, T, delta)`; several kinds are composed on one
  (the coarsest needed) loss grid.
  """

  def __init__(self):
    super().__init__(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    self._parts: Dict[Tuple[LMOParams, float], int] = {}

  def _leaf_error(self, event):
    if isinstance(event, LMODpEvent):
      return None
    return "the LMO accountant composes LMO-DP releases only"

  def _compose_leaf(self, event, count: int) -> None:
    k = (event.params, float(event.sampling_rate))
    self._parts[k] = self._parts.get(k, 0) + int(count)

  def _pld(self, delta: float):
    steps = sum(self._parts.values())
    tail = default_tail(delta, steps)
    if len(self._parts) == 1:
      return None, tail
    h = max(grid_step(p, q, tail=tail) for p, q in self._parts)
    out = None
    for (p, q), n in self._parts.items():
      step = step_pld(p, q, tail=tail, discretization=h)
      part = step.self_compose(n) if n > 1 else step
      out = part if out is None else out.compose(part)
    return out, tail

  def get_epsilon(self, target_delta: float) -> float:
    if not self._parts:
      return 0.0
    composed, tail = self._pld(target_delta)
    if composed is None:
      (p, q), n = next(iter(self._parts.items()))
      return lmo_epsilon(p, q, n, target_delta, tail=tail)
    return float(composed.get_epsilon_for_delta(target_delta))

  def get_delta(self, target_epsilon: float) -> float:
    raise NotImplementedError("the LMO accountant's tail depends on delta: ask for epsilon")


# --- the RDP cross-check -----------------------------------------------------


def _rdp_step_unsampled(params: LMOParams, alpha: int) -> float:
  """RDP of one unsampled step with b revealed (inf if the MGF diverges)."""
  if alpha == 1:
    raise ValueError("integer orders >= 2 only")
  val = (alpha * params.mgf(alpha - 1.0) + (alpha - 1) * params.mgf(-float(alpha))) / (
    2 * alpha - 1
  )
  return float(np.log(val) / (alpha - 1)) if np.isfinite(val) else math.inf


def rdp_epsilon(
  params: LMOParams,
  sampling_rate: float,
  steps: int,
  delta: float,
  orders: Sequence[int] = tuple(range(2, 65)),
) -> float:
  """Upper bound on epsilon by RDP (cross-check; looser than `lmo_epsilon`).

  Args:
    params: the distribution of b.
    sampling_rate: q.
    steps: the number of steps.
    delta: the target delta.
    orders: the integer Renyi orders tried.

  Returns:
    The smallest epsilon over `orders`.
  """
  q = float(sampling_rate)
  ev.check_sampling_rate(q)
  ev.check_steps(steps)
  eps_unsampled = {a: _rdp_step_unsampled(params, a) for a in range(2, max(orders) + 1)}
  best = math.inf
  for a in orders:
    if q == 1.0:
      r = eps_unsampled[a]
    else:
      # Zhu & Wang 2019 (ICML), general Poisson-subsampled RDP bound, integer a >= 2.
      terms = [(a - 1) * math.log1p(-q) + math.log(a * q - q + 1)]
      if math.isfinite(eps_unsampled[2]):
        terms.append(
          math.log(special.comb(a, 2))
          + 2 * math.log(q)
          + (a - 2) * math.log1p(-q)
          + eps_unsampled[2]
        )
      else:
        continue
      finite = True
      for l in range(3, a + 1):
        if not math.isfinite(eps_unsampled[l]):
          finite = False
          break
        terms.append(
          math.log(3.0)
          + math.log(special.comb(a, l))
          + l * math.log(q)
          + (a - l) * math.log1p(-q)
          + (l - 1) * eps_unsampled[l]
        )
      if not finite:
        continue
      r = float(special.logsumexp(terms)) / (a - 1)
    if not math.isfinite(r):
      continue
    total = steps * r
    # RDP -> (eps, delta) (Balle et al. 2020 / Canonne, Kamath & Steinke 2020).
    eps = total + math.log1p(-1.0 / a) - (math.log(delta) + math.log(a)) / (a - 1)
    best = min(best, max(eps, 0.0))
  return best
