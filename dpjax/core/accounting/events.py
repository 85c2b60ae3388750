"""DpEvents for DP-SGD steps, in dp-accounting's event algebra.

A training run is described by the events that actually happened; any
accountant (`dpjax.core.accounting.epsilon`) consumes them. Builders here cover
Poisson-sampled steps (the setting of arXiv 1607.00133 and of the PLD
accountant, arXiv 2106.08567) and fixed-size batches drawn without
replacement (replace-one neighbouring relation, arXiv 1908.10530).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import dp_accounting

from dpjax.core.checks import check_noise_multiplier, check_sampling_rate, check_steps

DpEvent = dp_accounting.DpEvent

POISSON = "poisson"
FIXED_BATCH = "fixed_batch"


def gaussian_step(noise_multiplier: float, sampling_rate: float) -> DpEvent:
  """One Poisson-sampled Gaussian step (q = 1: every unit, every step).

  Args:
    noise_multiplier: noise std / L2 sensitivity.
    sampling_rate: q in (0, 1].

  Returns:
    A dp-accounting event of one step.
  """
  check_noise_multiplier(noise_multiplier)
  check_sampling_rate(sampling_rate)
  inner = dp_accounting.GaussianDpEvent(noise_multiplier)
  if sampling_rate == 1.0:
    return inner
  return dp_accounting.PoissonSampledDpEvent(sampling_rate, inner)


def laplace_step(noise_multiplier: float, sampling_rate: float) -> DpEvent:
  """One Poisson-sampled Laplace step (noise_multiplier = scale / L1 sensitivity).

  Args:
    noise_multiplier: Laplace scale / L1 sensitivity.
    sampling_rate: q in (0, 1].

  Returns:
    A dp-accounting event of one step.
  """
  check_noise_multiplier(noise_multiplier)
  check_sampling_rate(sampling_rate)
  inner = dp_accounting.LaplaceDpEvent(noise_multiplier)
  if sampling_rate == 1.0:
    return inner
  return dp_accounting.PoissonSampledDpEvent(sampling_rate, inner)


def dpsgd_event(
  noise_multiplier: float, sampling_rate: float, steps: int, mechanism: str = "gaussian"
) -> DpEvent:
  """`steps` Poisson-sampled DP-SGD steps at rate q with one noise multiplier.

  Neighbouring relation: add/remove one unit (the unit being whatever
  `clipped_grad` clipped: an example or a user).

  Args:
    noise_multiplier: sigma (Gaussian std / L2 sensitivity) or the Laplace
      scale / L1 sensitivity.
    sampling_rate: q in (0, 1]; 1 is every unit in every step.
    steps: an integer >= 1.
    mechanism: "gaussian" or "laplace".

  Returns:
    `SelfComposedDpEvent(PoissonSampledDpEvent(q, Gaussian/LaplaceDpEvent), steps)`.
  """
  check_steps(steps)
  if mechanism == "gaussian":
    step = gaussian_step(noise_multiplier, sampling_rate)
  elif mechanism == "laplace":
    step = laplace_step(noise_multiplier, sampling_rate)
  else:
    raise ValueError(f"mechanism must be 'gaussian' or 'laplace', got {mechanism!r}")
  return dp_accounting.SelfComposedDpEvent(step, int(steps))


def bandmf_event(noise_multiplier: float, sampling_rate: float, steps: int, bands: int) -> DpEvent:
  """`steps` steps of amplified BandMF with b bands: ceil(steps / b) DP-SGD steps.

  Formal guarantees:
    With a b-banded strategy of largest column norm 1
    (`dpjax.mechanisms.banded_gaussian`) and cyclic Poisson sampling (each
    unit's group drawn once, independently of every other unit; step t
    samples group t mod b at rate q: `dpjax.core.sampling.CyclicPoissonSampler`),
    the run is as private as ceil(steps / b) Poisson-sampled Gaussian steps
    at (q, sigma) under add/remove of one unit (Choquette-Choo et al., arXiv
    2306.08153, the amplified BandMF theorem). The theorem holds the other
    units' groups fixed: a split that depends on N (e.g. balanced groups of
    a permutation) moves other units when one is added and is covered only
    under replace-one. b = 1 is `dpsgd_event`.

  Args:
    noise_multiplier: sigma.
    sampling_rate: q, the rate within a unit's group.
    steps: the steps run (>= 1).
    bands: b >= 1.

  Returns:
    `SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), ceil(steps / b))`.
  """
  check_steps(steps)
  check_steps(bands, name="bands")
  return dpsgd_event(noise_multiplier, sampling_rate, -(-int(steps) // int(bands)))


def blt_event(noise_multiplier: float) -> DpEvent:
  """A whole run of BLT (or any matrix-factorisation) noise scaled to C x's sensitivity.

  Formal guarantees:
    `dpjax.mechanisms.blt_gaussian` releases C x + z with z ~ N(0, (sigma
    Delta)^2 I), Delta the sensitivity of C x over every participation the
    run allows (`matrix_factorization.toeplitz_sensitivity`: at most k times,
    b or more steps apart); everything trained is post-processing. That is one
    Gaussian mechanism of multiplier sigma, however many steps ran; sampling
    is not assumed to amplify anything.

  Args:
    noise_multiplier: sigma, in units of Delta.

  Returns:
    `GaussianDpEvent(sigma)`.
  """
  check_noise_multiplier(noise_multiplier)
  return dp_accounting.GaussianDpEvent(float(noise_multiplier))


def fixed_batch_event(
  noise_multiplier: float, dataset_size: int, batch_size: int, steps: int
) -> DpEvent:
  """`steps` Gaussian steps on batches of `batch_size` drawn without replacement.

  Each step draws a uniformly random subset of fixed size, independently of
  other steps. Valid under the replace-one relation only (accounted by RDP).
  Shuffling into disjoint batches per epoch is NOT this event; no tight
  accountant for it exists in dp-accounting, so dpjax does not claim one.

  Args:
    noise_multiplier: noise std / L2 sensitivity.
    dataset_size: the number of units n.
    batch_size: the fixed batch size (at most n).
    steps: the number of steps.

  Returns:
    A SelfComposedDpEvent of SampledWithoutReplacementDpEvent steps.
  """
  check_noise_multiplier(noise_multiplier)
  check_steps(steps)
  if not (1 <= batch_size <= dataset_size):
    raise ValueError(
      f"need 1 <= batch_size <= dataset_size, got batch_size={batch_size}, "
      f"dataset_size={dataset_size}"
    )
  return dp_accounting.SelfComposedDpEvent(
    dp_accounting.SampledWithoutReplacementDpEvent(
      int(dataset_size), int(batch_size), dp_accounting.GaussianDpEvent(noise_multiplier)
    ),
    int(steps),
  )


def compose(events: Sequence[DpEvent]) -> DpEvent:
  """Sequential composition of heterogeneous phases (e.g. a change of sigma).

  Args:
    events: the phases, in order.

  Returns:
    A ComposedDpEvent of `events`.
  """
  if not events:
    raise ValueError("compose needs at least one event")
  return dp_accounting.ComposedDpEvent(list(events))


def is_replace_one(event: DpEvent) -> bool:
  """Whether the event is only meaningful under the replace-one relation.

  Args:
    event: any dp-accounting event.

  Returns:
    True when it contains sampling without replacement (replace-one only).
  """
  if isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent):
    return True
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return is_replace_one(event.event)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return any(is_replace_one(e) for e in event.events)
  return False


def contains(event: DpEvent, kind: type) -> bool:
  """Whether `event` holds an event of type `kind` anywhere in its composition.

  Args:
    event: any dp-accounting event.
    kind: a DpEvent subclass.

  Returns:
    True when some sub-event is an instance of `kind`.
  """
  if isinstance(event, kind):
    return True
  if isinstance(
    event,
    (
      dp_accounting.SelfComposedDpEvent,
      dp_accounting.PoissonSampledDpEvent,
      dp_accounting.SampledWithoutReplacementDpEvent,
    ),
  ):
    return contains(event.event, kind)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return any(contains(e, kind) for e in event.events)
  return False


def leaf_events(event: DpEvent, count: int = 1) -> List[Tuple[DpEvent, int]]:
  """`event` unrolled into (leaf event, times composed), NoOp events dropped, order kept.

  Args:
    event: any dp-accounting event.
    count: how many times `event` itself is composed.

  Returns:
    [(leaf event, count)] with self-compositions multiplied out.
  """
  if isinstance(event, dp_accounting.NoOpDpEvent):
    return []
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return leaf_events(event.event, count * event.count)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return [leaf for e in event.events for leaf in leaf_events(e, count)]
  return [(event, count)]


class LeafAccountant(dp_accounting.PrivacyAccountant):
  """A `PrivacyAccountant` over leaf events: compositions are unrolled by `leaf_events`.

  Subclasses say which leaves they support (`_leaf_error`: None or why not)
  and how one is composed `count` times (`_compose_leaf`).
  """

  def _leaf_error(self, event: DpEvent) -> Optional[str]:
    raise NotImplementedError

  def _compose_leaf(self, event: DpEvent, count: int) -> None:
    raise NotImplementedError

  def _maybe_compose(self, event, count: int, do_compose: bool):
    leaves = leaf_events(event, count)
    for leaf, _ in leaves:
      why = self._leaf_error(leaf)
      if why is not None:
        return self.CompositionErrorDetails(invalid_event=leaf, error_message=why)
    if do_compose:
      for leaf, n in leaves:
        self._compose_leaf(leaf, n)
    return None
