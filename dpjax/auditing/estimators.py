"""Empirical privacy lower bounds from attack scores of canaries.

An (epsilon, delta)-DP mechanism bounds every membership test: for any
threshold, TPR <= e^eps FPR + delta and TNR <= e^eps FNR + delta (Kairouz et
al. 2015). Observed scores of canaries that were in ("in") and out ("out") of
the run therefore give, with confidence, an epsilon the mechanism must at
least have. Three estimators:

- `threshold_epsilon`: the two-sample threshold test (Nasr et al. 2021, arXiv
  2101.04535) with Clopper-Pearson intervals; the threshold is chosen under a
  Bonferroni correction over candidates drawn from a held-out share of the
  scores, or on a held-out split.
- `one_run_epsilon`: the one-run audit of Steinke, Nasr and Jagielski 2023
  (arXiv 2305.08846, Theorem 5.2): canaries included independently with
  probability 1/2 in ONE run, the attacker guesses the membership of its most
  confident ones, and the count of correct guesses is tested.
- `gdp_mu`: the Gaussian-DP parameter mu read off the TPR/FPR curve, with a
  confidence interval (Dong, Roth, Su 2019, arXiv 1905.02383).

`max_tpr` is the other side: the best TPR at a given FPR that the claimed
guarantee (a DpEvent's privacy curve) allows.

Scores are oriented so that a larger score means "more likely in".

Example:
  >>> rng = np.random.default_rng(0)
  >>> out = rng.normal(0.0, 1.0, 20_000)
  >>> inn = rng.normal(2.0, 1.0, 20_000)
  >>> r = gdp_mu(inn, out, confidence=0.95, seed=0)
  >>> bool(r.mu_lower < 2.0 < r.mu_upper)
  True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import optimize, stats

from dpjax.core import checks
from dpjax.core.accounting import accountants

STRATEGIES = ("bonferroni", "split")


@dataclasses.dataclass(frozen=True)
class EpsilonBound:
  """An empirical lower bound on epsilon at `delta`, holding with probability `confidence`.

  Attributes:
    epsilon: the lower bound (0 when the scores show nothing).
    delta: the delta it is a bound at.
    confidence: the probability that the true epsilon is at least `epsilon`.
    method: "threshold" or "one_run".
    details: what the bound was read from (threshold, counts, guesses, ...).
  """

  epsilon: float
  delta: float
  confidence: float
  method: str
  details: dict


@dataclasses.dataclass(frozen=True)
class GDPEstimate:
  """Gaussian-DP mu at one threshold: the estimate and its confidence interval.

  Attributes:
    mu: Phi^-1(TPR) - Phi^-1(FPR) at the chosen threshold.
    mu_lower: the lower end of the interval (an audit's lower bound on mu).
    mu_upper: the upper end.
    confidence: the probability that the interval holds the threshold's true mu.
    threshold: the threshold (score >= threshold -> "in").
  """

  mu: float
  mu_lower: float
  mu_upper: float
  confidence: float
  threshold: float


def clopper_pearson(k, n: int, alpha: float) -> Tuple[np.ndarray, np.ndarray]:
  """One-sided Clopper-Pearson bounds on a binomial proportion.

  Args:
    k: the successes (an int or an array).
    n: the trials.
    alpha: each bound's probability of failure.

  Returns:
    (lower, upper): P(p < lower) <= alpha and P(p > upper) <= alpha.
  """
  k = np.asarray(k, dtype=float)
  with np.errstate(invalid="ignore"):
    lo = np.where(k > 0, stats.beta.ppf(alpha, k, n - k + 1), 0.0)
    hi = np.where(k < n, stats.beta.ppf(1 - alpha, k + 1, n - k), 1.0)
  return lo, hi


def _check_scores(inn, out) -> Tuple[np.ndarray, np.ndarray]:
  inn, out = np.asarray(inn, dtype=float).ravel(), np.asarray(out, dtype=float).ravel()
  for name, s in (("in", inn), ("out", out)):
    if s.size < 2:
      raise ValueError(f"{name} scores: need at least 2, got {s.size}")
    if not np.all(np.isfinite(s)):
      raise ValueError(
        f"{name} scores must be finite, got {int(np.sum(~np.isfinite(s)))} that are not"
      )
  return inn, out


def _check_confidence(confidence: float) -> None:
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _candidates(inn: np.ndarray, out: np.ndarray, count: int) -> np.ndarray:
  """Thresholds at quantiles of the pooled scores, dense in both tails (log-spaced)."""
  tail = np.geomspace(1.0 / (len(inn) + len(out)), 0.5, count // 2)
  qs = np.unique(np.concatenate([tail, 1.0 - tail]))
  return np.unique(np.quantile(np.concatenate([inn, out]), qs))


def _counts(inn: np.ndarray, out: np.ndarray, thresholds: np.ndarray):
  """(true positives, false positives) of "score >= t -> in" at each threshold."""
  tp = len(inn) - np.searchsorted(np.sort(inn), thresholds, side="left")
  fp = len(out) - np.searchsorted(np.sort(out), thresholds, side="left")
  return tp, fp


def _threshold_bounds(inn, out, thresholds, delta, alpha):
  """Per threshold and direction, log((TPR_lo - delta) / FPR_hi): [2, len(thresholds)]."""
  n_in, n_out = len(inn), len(out)
  tp, fp = _counts(inn, out, thresholds)
  tpr_lo, _ = clopper_pearson(tp, n_in, alpha)
  _, fpr_hi = clopper_pearson(fp, n_out, alpha)
  tnr_lo, _ = clopper_pearson(n_out - fp, n_out, alpha)
  _, fnr_hi = clopper_pearson(n_in - tp, n_in, alpha)
  with np.errstate(divide="ignore", invalid="ignore"):
    up = np.log(np.maximum(tpr_lo - delta, 0.0)) - np.log(fpr_hi)
    down = np.log(np.maximum(tnr_lo - delta, 0.0)) - np.log(fnr_hi)
  return np.nan_to_num(np.stack([up, down]), nan=-np.inf), tp, fp


GRID_SHARE = 0.1  # the share of scores the Bonferroni strategy draws its candidates from


def _split(scores: np.ndarray, fraction: float, rng: np.random.Generator):
  """(a `fraction` of `scores`, the rest), at random; each part keeps at least one score."""
  perm = rng.permutation(len(scores))
  k = min(max(int(round(fraction * len(scores))), 1), len(scores) - 1)
  return scores[perm[:k]], scores[perm[k:]]


def threshold_epsilon(
  in_scores: Sequence[float],
  out_scores: Sequence[float],
  delta: float,
  *,
  confidence: float = 0.95,
  strategy: str = "bonferroni",
  thresholds: int = 64,
  split_fraction: float = 0.5,
  seed: Optional[int] = 0,
  threshold: Optional[float] = None,
) -> EpsilonBound:
  """Epsilon lower bound of the best threshold test, with Clopper-Pearson intervals.

  For a threshold t ("score >= t" guesses in) the bound is
  max(log((TPR_lo - delta) / FPR_hi), log((TNR_lo - delta) / FNR_hi)), the
  interval ends holding with the confidence asked for. "bonferroni" draws
  `thresholds` candidates from a random `GRID_SHARE` of the scores (not
  counted, so the candidates are fixed before the counted scores are seen)
  and splits the failure probability over every interval on the rest;
  "split" picks the threshold and direction on a `split_fraction` of the
  scores and evaluates it on the rest. A given
  `threshold` (chosen without looking at these scores) is evaluated alone,
  in the "score >= threshold is in" direction.

  Args:
    in_scores: scores of the canaries that were in.
    out_scores: scores of those that were out.
    delta: the delta of the bound.
    confidence: the probability that the bound holds.
    strategy: "bonferroni" or "split".
    thresholds: the number of candidate thresholds.
    split_fraction: the share of scores used to choose (with "split").
    seed: the seed of the random split (both strategies).
    threshold: a fixed threshold instead of a search (`strategy` is then unused).

  Returns:
    An `EpsilonBound` (method "threshold"; epsilon 0 when no test shows anything).
  """
  inn, out = _check_scores(in_scores, out_scores)
  checks.check_delta(delta)
  _check_confidence(confidence)
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  alpha = 1.0 - confidence
  if threshold is not None:
    ts = np.array([float(threshold)])
    eps, tp, fp = _threshold_bounds(inn, out, ts, delta, alpha / 2)
    d, j, n_in, n_out = 0, 0, len(inn), len(out)
    strategy = "explicit"
  elif strategy == "bonferroni":
    # The candidates come from a share of the scores never counted: a set drawn from the
    # counted scores themselves would not be fixed before they were seen, as the union bound
    # over Clopper-Pearson intervals needs.
    rng = np.random.default_rng(seed)
    (in_g, inn), (out_g, out) = _split(inn, GRID_SHARE, rng), _split(out, GRID_SHARE, rng)
    ts = _candidates(in_g, out_g, thresholds)
    per = alpha / (4 * len(ts))  # four one-sided intervals per threshold
    eps, tp, fp = _threshold_bounds(inn, out, ts, delta, per)
    d, j = np.unravel_index(int(np.argmax(eps)), eps.shape)
    n_in, n_out = len(inn), len(out)
  else:
    rng = np.random.default_rng(seed)
    (in_a, in_b), (out_a, out_b) = (
      _split(inn, split_fraction, rng),
      _split(out, split_fraction, rng),
    )
    ts = _candidates(in_a, out_a, thresholds)
    eps_a, _, _ = _threshold_bounds(in_a, out_a, ts, delta, alpha / 2)
    d, j = np.unravel_index(int(np.argmax(eps_a)), eps_a.shape)
    ts = ts[j : j + 1]
    eps, tp, fp = _threshold_bounds(in_b, out_b, ts, delta, alpha / 2)
    j, n_in, n_out = 0, len(in_b), len(out_b)
  best = float(eps[d, j])
  return EpsilonBound(
    epsilon=max(0.0, best),
    delta=float(delta),
    confidence=float(confidence),
    method="threshold",
    details={
      "strategy": strategy,
      "threshold": float(ts[j]),
      "direction": "score >= threshold is in" if d == 0 else "score < threshold is out",
      "tpr": float(tp[j] / n_in),
      "fpr": float(fp[j] / n_out),
      "n_in": int(n_in),
      "n_out": int(n_out),
    },
  )


def _one_run_p_value(m: int, guesses: int, correct: int, eps: float, delta: float) -> float:
  """Theorem 5.2's bound on P(correct guesses >= `correct`) under (eps, delta)-DP."""
  p = 1.0 / (1.0 + math.exp(-eps))
  tail = stats.binom.sf(correct - 1, guesses, p)  # P(B >= correct)
  if delta == 0.0 or correct == 0:
    return float(min(1.0, tail))
  i = np.arange(1, correct + 1)
  # P(correct - i <= B < correct) / i, the worst i
  window = stats.binom.sf(correct - i - 1, guesses, p) - tail
  return float(min(1.0, tail + 2 * m * delta * np.max(window / i)))


def one_run_epsilon(
  scores: Sequence[float],
  included: Sequence[bool],
  delta: float,
  *,
  confidence: float = 0.95,
  guesses: Optional[Sequence[int]] = None,
  one_sided: bool = False,
) -> EpsilonBound:
  """Epsilon lower bound of the one-run audit (arXiv 2305.08846, Theorem 5.2).

  Each of the m canaries must have been included in the run independently
  with probability 1/2 (`included`). For a number of guesses k, the attacker
  guesses "in" for the k/2 highest scores and "out" for the k/2 lowest
  (`one_sided`: "in" for the k highest, no "out" guesses); W
  correct guesses reject (eps, delta)-DP when Theorem 5.2's bound on
  P(W >= observed) is below 1 - confidence. The bound is the largest eps so
  rejected, maximised over `guesses` with a Bonferroni correction.

  Args:
    scores: one score per canary (larger: more likely in).
    included: whether each canary was in the run.
    delta: the delta of the bound (per canary).
    confidence: the probability that the bound holds.
    guesses: the numbers of guesses tried (default: m/50, m/20, m/10, m/4, m/2, m).
    one_sided: guess only "in".

  Returns:
    An `EpsilonBound` (method "one_run").
  """
  s = np.asarray(scores, dtype=float).ravel()
  inc = np.asarray(included).astype(bool).ravel()
  m = len(s)
  if m < 2 or len(inc) != m:
    raise ValueError(
      f"one score per canary and at least 2 canaries, got {m} scores, {len(inc)} flags"
    )
  if not np.all(np.isfinite(s)):
    raise ValueError("scores must be finite")
  checks.check_delta(delta)
  _check_confidence(confidence)
  if guesses is None:
    guesses = sorted({max(2, int(m * f)) for f in (0.02, 0.05, 0.1, 0.25, 0.5, 1.0)})
  for k in guesses:
    if int(k) != k or not 1 <= k <= m:
      raise ValueError(f"guesses must be integers in [1, {m}], got {k}")
  alpha = (1.0 - confidence) / len(guesses)
  order = np.argsort(-s, kind="stable")
  best = (0.0, None, None)
  for k in guesses:
    k_in, k_out = (int(k), 0) if one_sided else ((int(k) + 1) // 2, int(k) // 2)
    correct = int(np.sum(inc[order[:k_in]])) + (
      int(np.sum(~inc[order[m - k_out :]])) if k_out else 0
    )
    if _one_run_p_value(m, int(k), correct, 0.0, delta) > alpha:
      continue  # not even eps = 0 is rejected
    reject = lambda e, k=int(k), c=correct: alpha - _one_run_p_value(m, k, c, e, delta)
    hi = 1.0
    while reject(hi) > 0 and hi < 1e3:
      hi *= 2
    eps = hi if reject(hi) > 0 else optimize.brentq(reject, 0.0, hi, xtol=1e-9)
    if eps > best[0]:
      best = (float(eps), int(k), correct)
  return EpsilonBound(
    epsilon=best[0],
    delta=float(delta),
    confidence=float(confidence),
    method="one_run",
    details={
      "canaries": m,
      "guesses": best[1],
      "correct": best[2],
      "tried": list(map(int, guesses)),
    },
  )


def gdp_mu(
  in_scores: Sequence[float],
  out_scores: Sequence[float],
  *,
  confidence: float = 0.95,
  thresholds: int = 64,
  split_fraction: float = 0.5,
  seed: Optional[int] = 0,
) -> GDPEstimate:
  """Gaussian-DP mu of the scores' ROC at one threshold, with a confidence interval.

  Under mu-GDP every test has TPR <= Phi(Phi^-1(FPR) + mu); for two normal
  score distributions at distance mu (unit variance), Phi^-1(TPR) -
  Phi^-1(FPR) equals mu at every threshold. The threshold is chosen on a
  `split_fraction` of the scores (the largest lower end), and the interval
  is computed on the rest from two-sided Clopper-Pearson intervals of TPR
  and FPR.

  Args:
    in_scores: scores of the canaries that were in.
    out_scores: scores of those that were out.
    confidence: the probability that the interval holds.
    thresholds: the number of candidate thresholds.
    split_fraction: the share of scores used to choose the threshold.
    seed: the seed of the split.

  Returns:
    A `GDPEstimate`.
  """
  inn, out = _check_scores(in_scores, out_scores)
  _check_confidence(confidence)
  alpha = 1.0 - confidence
  rng = np.random.default_rng(seed)
  (in_a, in_b), (out_a, out_b) = _split(inn, split_fraction, rng), _split(out, split_fraction, rng)

  def interval(i, o, ts, a):
    tp, fp = _counts(i, o, ts)
    tpr_lo, tpr_hi = clopper_pearson(tp, len(i), a / 4)
    fpr_lo, fpr_hi = clopper_pearson(fp, len(o), a / 4)
    ppf = stats.norm.ppf
    with np.errstate(divide="ignore", invalid="ignore"):
      mid = ppf(tp / len(i)) - ppf(fp / len(o))
      return mid, ppf(tpr_lo) - ppf(fpr_hi), ppf(tpr_hi) - ppf(fpr_lo)

  ts = _candidates(in_a, out_a, thresholds)
  _, lower, _ = interval(in_a, out_a, ts, alpha)
  t = ts[int(np.argmax(np.nan_to_num(lower, nan=-np.inf)))]
  mid, lo, hi = (float(x[0]) for x in interval(in_b, out_b, np.array([t]), alpha))
  return GDPEstimate(
    mu=mid, mu_lower=lo, mu_upper=hi, confidence=float(confidence), threshold=float(t)
  )


def gdp_epsilon(mu: float, delta: float) -> float:
  """The epsilon of mu-GDP at `delta` (Dong, Roth, Su 2019, Corollary 2.13).

  Args:
    mu: the GDP parameter (>= 0).
    delta: in (0, 1).

  Returns:
    The smallest eps with Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) <= delta.
  """
  checks.check_delta(delta)
  if not mu > 0:
    return 0.0
  norm = stats.norm

  def excess(e):
    return norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta

  if excess(0.0) <= 0:
    return 0.0
  hi = 1.0
  while excess(hi) > 0:
    hi *= 2
  return float(optimize.brentq(excess, 0.0, hi, xtol=1e-12))


def max_tpr(
  event, fpr: float, *, accountant: str = "pld", epsilons: Optional[np.ndarray] = None
) -> float:
  """The largest TPR at `fpr` that the guarantee of `event` allows any membership test.

  From the privacy curve delta(eps) of `event`: TPR <= min over eps of
  min(e^eps FPR + delta(eps), 1 - e^-eps (1 - delta(eps) - FPR)). Every eps
  gives a valid bound; the minimum is taken over the grid `epsilons`, then
  refined around the best grid point.

  Args:
    event: the DpEvent of the claimed guarantee.
    fpr: the false-positive rate, in [0, 1].
    accountant: the accountant giving delta(eps).
    epsilons: the eps grid (default 0, 1, ..., 30).

  Returns:
    The bound on TPR, in [fpr, 1].
  """
  if not 0.0 <= fpr <= 1.0:
    raise ValueError(f"fpr must be in [0, 1], got {fpr}")
  grid = np.arange(0.0, 31.0) if epsilons is None else np.asarray(epsilons, float)
  composed = accountants.composed(event, accountant)  # composed once, queried per eps

  def bounds(e: float) -> Tuple[float, float]:
    d = min(1.0, float(composed.get_delta(max(float(e), 0.0))))
    return math.exp(e) * fpr + d, 1.0 - math.exp(-e) * (1.0 - d - fpr)

  at = np.array([bounds(e) for e in grid])  # [len(grid), 2]
  best = float(at.min())
  step = float(np.max(np.diff(grid))) if len(grid) > 1 else 1.0
  for k in range(2):
    e0 = float(grid[int(np.argmin(at[:, k]))])
    r = optimize.minimize_scalar(
      lambda e, k=k: bounds(e)[k],
      bounds=(max(0.0, e0 - step), e0 + step),
      method="bounded",
      options={"xatol": 1e-4},
    )
    best = min(best, float(r.fun))
  return float(min(1.0, max(best, fpr)))
