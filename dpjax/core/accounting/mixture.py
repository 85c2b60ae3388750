"""PLD accounting of mixtures of Gaussians (user-level DP with example-level sampling).

Under ELS (arXiv 2407.07737) one user's G examples are each sampled with rate
q, so one step's privacy loss is that of a Gaussian whose shift is the number
of the user's examples drawn: a mixture of Gaussians (dp-accounting's
`MixtureOfGaussiansDpEvent`). `MixtureAccountant` composes such events with
dp-accounting's pessimistic PLDs, memoising each step's PLD.
"""

from __future__ import annotations

import functools

import dp_accounting
from dp_accounting import dp_event, pld

from dpjax.core.accounting import events as ev

# The mixture's PLD is costly to build at 1e-4; at 1e-3 the epsilons agree to
# ~1e-6 relative in our tests and remain upper bounds (pessimistic rounding).
MOG_DISCRETIZATION = 1e-3



@functools.lru_cache(maxsize=64)
def _mixture_step_pld(standard_deviation: float, sensitivities: tuple, sampling_probs: tuple,
                      discretization: float):
  # Building a mixture's PLD takes seconds; a run asks for the same step's
  # composition at every log row and every calibration probe.
  return pld.privacy_loss_distribution.from_mixture_gaussian_mechanism(
      standard_deviation=standard_deviation, sensitivities=list(sensitivities),
      sampling_probs=list(sampling_probs), value_discretization_interval=discretization)


class MixtureAccountant(ev.LeafAccountant):
  """PLD accountant for compositions of `MixtureOfGaussiansDpEvent`s (ELS), step PLDs memoised.

  The same pessimistic PLDs as dp-accounting's `PLDAccountant` (built by
  `from_mixture_gaussian_mechanism`, self-composed per count): an upper bound.
  """

  def __init__(self, discretization: float = MOG_DISCRETIZATION):
    super().__init__(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    self._h = float(discretization)
    self._pld = None

  def _leaf_error(self, event):
    if isinstance(event, dp_event.MixtureOfGaussiansDpEvent):
      return None
    return "composes mixture-of-Gaussians (ELS) events only"

  def _compose_leaf(self, event, count: int) -> None:
    step = _mixture_step_pld(float(event.standard_deviation), tuple(event.sensitivities),
                             tuple(event.sampling_probs), self._h)
    part = step.self_compose(count) if count > 1 else step
    self._pld = part if self._pld is None else self._pld.compose(part)

  def get_epsilon(self, target_delta: float) -> float:
    return 0.0 if self._pld is None else float(self._pld.get_epsilon_for_delta(target_delta))

  def get_delta(self, target_epsilon: float) -> float:
    return 0.0 if self._pld is None else float(self._pld.get_delta_for_epsilon(target_epsilon))
