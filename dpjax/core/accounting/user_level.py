"""User-level guarantees for example-level (ELS) and user-level (ULS) sampling.

Charles et al. 2024 (arXiv 2407.07737). Each user holds at most G examples
(contribution bounding happens before sampling). Neighbouring datasets differ
by adding or removing ONE USER with all of their examples.

- **ULS** samples users with probability q_user; a sampled user's clipped
  contribution has norm <= C. One step is the Poisson-subsampled Gaussian at
  the user level: `uls_event` is `dpsgd_event` with users as the unit.
- **ELS** samples examples with probability q and clips each example to C.
  A user's G examples enter independently, so J ~ Binomial(G, q) of them are
  in a batch and the user's contribution has norm <= J C (worst case: all
  aligned). One step is the mixture-of-Gaussians mechanism
  N(0, sigma^2 C^2) vs sum_j Binom(G, q)(j) N(j C, sigma^2 C^2)
  (dp-accounting's `MixtureOfGaussiansDpEvent`, arXiv 2310.15526), which
  its PLD accountant composes with pessimistic discretisation: an upper
  bound. For G = 1 it is exactly the example-level subsampled Gaussian.
- **Group privacy** (the loose baseline): an example-level (eps, delta)
  guarantee gives (G eps, G e^{(G-1) eps} delta) for a group of G examples;
  an example-level RDP curve gives the group's through Mironov's
  Proposition 2 (`rdp_group_epsilon`).
"""

from __future__ import annotations

import functools
import math

import dp_accounting
import numpy as np
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp_accountant
from scipy import special, stats

from dpjax.core.accounting import accountants
from dpjax.core.accounting import events as ev
from dpjax.core.accounting.roots import last_crossing
from dpjax.core.accounting.step_pld import MOG_DISCRETIZATION, StepPLDAccountant
from dpjax.core.checks import (
  check_delta,
  check_max_examples_per_user,
  check_noise_multiplier,
  check_sampling_rate,
  check_steps,
)


def els_step(
  noise_multiplier: float, sampling_rate: float, max_examples_per_user: int
) -> dp_accounting.DpEvent:
  """One ELS step seen by one user with G examples (the mixture of Gaussians).

  Args:
    noise_multiplier: sigma.
    sampling_rate: q, the probability that an example is sampled.
    max_examples_per_user: G, the cap on a user's examples.

  Returns:
    A MixtureOfGaussiansDpEvent over the Binomial(G, q) count of sampled examples.
  """
  G = max_examples_per_user  # the papers' G
  check_noise_multiplier(noise_multiplier)
  check_sampling_rate(sampling_rate)
  check_max_examples_per_user(G)
  js = list(range(G + 1))
  probs = [float(p) for p in stats.binom.pmf(js, G, sampling_rate)]
  # Drop numerically-zero weights; the PLD is built from the remaining support.
  keep = [(j, p) for j, p in zip(js, probs) if p > 0.0]
  return dp_event.MixtureOfGaussiansDpEvent(
    float(noise_multiplier), [float(j) for j, _ in keep], [p for _, p in keep]
  )


def els_event(
  noise_multiplier: float, sampling_rate: float, steps: int, max_examples_per_user: int
) -> dp_accounting.DpEvent:
  """`steps` ELS steps: user-level event for PLD accounting.

  Args:
    noise_multiplier: sigma.
    sampling_rate: q per example.
    steps: the number of steps.
    max_examples_per_user: G.

  Returns:
    A SelfComposedDpEvent of `els_step`.
  """
  G = max_examples_per_user  # the papers' G
  check_steps(steps)
  return dp_accounting.SelfComposedDpEvent(els_step(noise_multiplier, sampling_rate, G), int(steps))


def uls_event(
  noise_multiplier: float, user_sampling_rate: float, steps: int
) -> dp_accounting.DpEvent:
  """`steps` ULS steps: the subsampled Gaussian with users as the unit.

  Args:
    noise_multiplier: sigma.
    user_sampling_rate: the probability that a user is sampled.
    steps: the number of steps.

  Returns:
    The Poisson-sampled Gaussian event with users as the unit.
  """
  return ev.dpsgd_event(noise_multiplier, user_sampling_rate, steps)


def els_accountant(
  noise_multiplier: float, sampling_rate: float, steps: int, max_examples_per_user: int
) -> StepPLDAccountant:
  """A StepPLDAccountant holding `els_event`.

  Args:
    noise_multiplier: sigma.
    sampling_rate: q per example.
    steps: the number of steps.
    max_examples_per_user: G.

  Returns:
    The accountant, with the event composed.
  """
  G = max_examples_per_user  # the papers' G
  acc = StepPLDAccountant(MOG_DISCRETIZATION)
  acc.compose(els_event(noise_multiplier, sampling_rate, steps, G))
  return acc


@functools.lru_cache(maxsize=256)
def els_epsilon(
  noise_multiplier: float,
  sampling_rate: float,
  steps: int,
  max_examples_per_user: int,
  delta: float,
) -> float:
  """User-level epsilon of ELS (PLD, upper bound); memoised, as the mixture's PLD is costly.

  Args:
    noise_multiplier: sigma.
    sampling_rate: q per example.
    steps: the number of steps.
    max_examples_per_user: G.
    delta: the user-level delta.

  Returns:
    The user-level epsilon.
  """
  G = max_examples_per_user  # the papers' G
  check_delta(delta)
  return float(els_accountant(noise_multiplier, sampling_rate, steps, G).get_epsilon(delta))


RDP_GROUP_ORDERS = tuple(range(2, 257))  # orders beta of the group's RDP (1.5 adds little)


def sampled_gaussian_rdp(noise_multiplier: float, sampling_rate: float, order: int) -> float:
  """RDP of one Poisson-sampled Gaussian step at an integer order (add/remove).

  Mironov, Talwar, Zhang 2019 (arXiv 1908.10530, Theorem 5): for integer
  alpha, exp((alpha - 1) RDP) = sum_k C(alpha, k) (1 - q)^(alpha - k) q^k
  exp((k^2 - k) / (2 sigma^2)), summed in log space.

  Args:
    noise_multiplier: sigma.
    sampling_rate: q.
    order: the integer order alpha >= 2.

  Returns:
    The RDP epsilon at `order`.
  """
  check_noise_multiplier(noise_multiplier)
  check_sampling_rate(sampling_rate)
  a, q, s2 = int(order), float(sampling_rate), 2.0 * noise_multiplier**2
  if q == 1.0:
    return a / s2
  k = np.arange(a + 1, dtype=np.float64)
  log_terms = (
    special.gammaln(a + 1)
    - special.gammaln(k + 1)
    - special.gammaln(a - k + 1)
    + (a - k) * math.log1p(-q)
    + k * math.log(q)
    + (k * k - k) / s2
  )
  return float(special.logsumexp(log_terms) / (a - 1))


def rdp_group_epsilon(
  noise_multiplier: float,
  sampling_rate: float,
  steps: int,
  max_examples_per_user: int,
  delta: float,
) -> float:
  """User-level epsilon of ELS by RDP group privacy (Mironov 2017, Proposition 2).

  An (alpha, eps)-RDP mechanism is (alpha / 2^c, 3^c eps)-RDP for datasets
  2^c examples apart when alpha >= 2^(c+1). With c = ceil(log2 G), the
  group's RDP at order beta is 3^c T RDP(2^c beta) of the example-level
  step, converted to (eps, delta) by dp-accounting's `compute_epsilon`.
  Looser than the ELS accountant, but finite where the (eps, delta) route
  needs an example-level delta below the PLD's resolution.

  Args:
    noise_multiplier: sigma.
    sampling_rate: q per example.
    steps: the number of steps T.
    max_examples_per_user: G.
    delta: the user-level delta.

  Returns:
    The user-level epsilon.
  """
  G = max_examples_per_user
  check_delta(delta)
  check_max_examples_per_user(G)
  check_steps(steps)
  c = math.ceil(math.log2(G)) if G > 1 else 0
  rdp = [
    3**c * steps * sampled_gaussian_rdp(noise_multiplier, sampling_rate, 2**c * b)
    for b in RDP_GROUP_ORDERS
  ]
  eps, _ = rdp_accountant.compute_epsilon(list(RDP_GROUP_ORDERS), rdp, delta)
  return float(eps)


def group_privacy_epsilon(
  noise_multiplier: float,
  sampling_rate: float,
  steps: int,
  max_examples_per_user: int,
  delta: float,
  accountant: str = "pld",
) -> float:
  """User-level epsilon of ELS from the example-level guarantee by group privacy.

  The smaller of two valid bounds: the (eps, delta) route, which finds the
  example-level (eps_1, delta_1) with G e^{(G-1) eps_1} delta_1 = delta on
  the example-level privacy curve of `accountant` and gives G eps_1 (inf
  when that delta_1 is below the curve's resolution), and the RDP route
  (`rdp_group_epsilon`).

  Args:
    noise_multiplier: sigma.
    sampling_rate: q per example.
    steps: the number of steps.
    max_examples_per_user: G.
    delta: the user-level delta.
    accountant: the example-level accountant of the (eps, delta) route.

  Returns:
    The user-level epsilon.
  """
  G = max_examples_per_user  # the papers' G
  check_delta(delta)
  check_max_examples_per_user(G)
  event = ev.dpsgd_event(noise_multiplier, sampling_rate, steps)
  if G == 1:
    return accountants.epsilon(event, delta, accountant)
  # delta_1(eps_1) decreases in eps_1 while the group's factor increases:
  # the smallest eps_1 with G e^{(G-1) eps_1} delta_1(eps_1) <= delta.
  acc = accountants.composed(event, accountant)  # composed once, queried many times

  def excess(e1: float) -> float:
    d1 = float(acc.get_delta(e1))
    return math.log(G) + (G - 1) * e1 + math.log(max(d1, 1e-300)) - math.log(delta)

  by_curve = G * last_crossing(excess, 1e4)
  return min(by_curve, rdp_group_epsilon(noise_multiplier, sampling_rate, steps, G, delta))


def group_size_tradeoff(
  examples_per_user,
  group_sizes,
  noise_multiplier: float,
  batch_size: float,
  steps: int,
  delta: float,
):
  """The ELS trade-off in G at fixed noise and fixed expected examples per step.

  `examples_per_user[u]` is how many examples user u holds. For each G the
  users are capped to G examples (kept = sum min(n_u, G)), ELS samples
  q = batch_size / kept, and the user-level epsilon is reported by the tight
  ELS accountant and by group privacy. Larger G keeps more data (and lowers
  q) but lets one user weigh more in a batch.

  Args:
    examples_per_user: an array, the examples each user holds.
    group_sizes: the caps G tried.
    noise_multiplier: sigma.
    batch_size: the expected examples per step.
    steps: the number of steps.
    delta: the user-level delta.

  Returns:
    One dict per G: G, examples_kept, fraction_kept, sampling_rate,
    epsilon_els, epsilon_group.
  """
  counts = np.asarray(examples_per_user)
  if counts.ndim != 1 or len(counts) == 0 or np.any(counts < 1):
    raise ValueError("examples_per_user must be a non-empty 1-D array of counts >= 1")
  rows = []
  for G in group_sizes:
    check_max_examples_per_user(G)
    kept = int(np.minimum(counts, G).sum())
    q = batch_size / kept
    check_sampling_rate(q)
    rows.append(
      {
        "G": int(G),
        "examples_kept": kept,
        "fraction_kept": kept / int(counts.sum()),
        "sampling_rate": q,
        "epsilon_els": els_epsilon(noise_multiplier, q, steps, int(G), delta),
        "epsilon_group": group_privacy_epsilon(noise_multiplier, q, steps, int(G), delta),
      }
    )
  return rows
