"""Host-side index samplers with fixed physical shapes.

Poisson sampling (each unit independently with probability q, arXiv
1607.00133) gives a batch of random size; to keep `jit` compiling once, each
logical batch is cut into physical batches of a fixed size, padded with
masked rows. A logical batch that overflows one physical batch is SPLIT into
several (gradient accumulation), never truncated: truncation would change
the sampling distribution the accountant assumes.

Every draw is a pure function of `(seed, step, draw)`, so a run resumed at
step k sees exactly the batches of an uninterrupted run; `draw` separates
independent draws of one step (e.g. charged DP-SAM's ascent batch, draw 1).
The seed of a private run is secret (`dpjax.training.plan.Secret`): the batches are
part of the mechanism.
"""

from __future__ import annotations

import math
from typing import Iterator, List, NamedTuple

import numpy as np

from dpjax.core.checks import check_max_examples_per_user, check_sampling_rate


class PhysicalBatch(NamedTuple):
  indices: np.ndarray  # [P] int64; padded rows hold index 0
  mask: np.ndarray  # [P] float32; 1 for a real row, 0 for padding


def _rng(seed: int, step: int, stream: int, draw: int = 0) -> np.random.Generator:
  words = [int(seed), int(stream), int(step)] + ([int(draw)] if draw else [])
  return np.random.default_rng(words)


def pad_to_physical(
  indices: np.ndarray, physical_batch_size: int, min_batches: int = 1
) -> List[PhysicalBatch]:
  """Cuts `indices` into `[P]`-shaped masked batches (at least `min_batches`).

  Args:
    indices: the unit indices of one logical batch.
    physical_batch_size: P, the rows of every physical batch.
    min_batches: the fewest batches returned (padding only, if need be).

  Returns:
    `PhysicalBatch`es whose masks mark the real rows; together they hold `indices`.
  """
  if physical_batch_size < 1:
    raise ValueError(f"physical_batch_size must be >= 1, got {physical_batch_size}")
  n = len(indices)
  num = max(min_batches, -(-n // physical_batch_size))
  out = []
  for b in range(num):
    chunk = indices[b * physical_batch_size : (b + 1) * physical_batch_size]
    idx = np.zeros(physical_batch_size, np.int64)
    mask = np.zeros(physical_batch_size, np.float32)
    idx[: len(chunk)] = chunk
    mask[: len(chunk)] = 1.0
    out.append(PhysicalBatch(idx, mask))
  return out


class PoissonSampler:
  """Poisson sampling of units with rate q, as fixed-shape masked batches.

  Formal guarantees:
    At every step each of the `num_units` units is included independently with
    probability `sampling_rate`, independently across steps; this is the
    sampling of `dp_accounting.PoissonSampledDpEvent(sampling_rate, ...)`.
    No included unit is ever dropped (overflow goes to extra physical batches).
  """

  STREAM = 0
  per_user = False  # a unit is one example row (ULSSampler: a user's group of rows)

  def __init__(self, num_units: int, sampling_rate: float, physical_batch_size: int, seed: int):
    if num_units < 1:
      raise ValueError(f"num_units must be >= 1, got {num_units}")
    check_sampling_rate(sampling_rate)
    if physical_batch_size < 1:
      raise ValueError(f"physical_batch_size must be >= 1, got {physical_batch_size}")
    self.num_units = int(num_units)
    self.sampling_rate = float(sampling_rate)
    self.physical_batch_size = int(physical_batch_size)
    self.seed = int(seed)

  @property
  def expected_batch_size(self) -> float:
    return self.num_units * self.sampling_rate

  def sample_indices(self, step: int, draw: int = 0) -> np.ndarray:
    """The sorted unit indices included at `step` (independent draws by `draw`).

    Args:
      step: the logical step.
      draw: the draw (0 for training; others for extra independent releases).

    Returns:
      The sorted indices of the units sampled.
    """
    rng = _rng(self.seed, step, self.STREAM, draw)
    # Binomial count then a uniform subset of that size: the same law as N
    # independent Bernoulli(q) draws, at O(count) cost for the subset.
    count = rng.binomial(self.num_units, self.sampling_rate)
    return np.sort(rng.choice(self.num_units, size=count, replace=False))

  def batches(self, step: int, draw: int = 0) -> List[PhysicalBatch]:
    """The physical batches of logical step `step` (at least one, maybe all padding).

    Args:
      step: the logical step.
      draw: the draw, as in `sample_indices`.

    Returns:
      The `PhysicalBatch`es of the sampled units.
    """
    return pad_to_physical(self.sample_indices(step, draw), self.physical_batch_size)


def unit_groups(seed: int, num_units: int, bands: int) -> np.ndarray:
  """Each unit's group, drawn independently for every unit (balls in bins).

  Unit i's group is the i-th word of one random stream of `seed`, modulo b:
  it depends on (seed, i) only, never on how many other units there are.
  Appending a unit to the dataset leaves every other unit's group as it was,
  and under add/remove the others' groups have the same joint law with or
  without any one unit. (A balanced split such as `permutation(N)[g::b]`
  moves other units when N changes; it is sound only under replace-one.)

  Example:
    >>> a, b = unit_groups(7, 5, 2), unit_groups(7, 6, 2)
    >>> bool((a == b[:5]).all())
    True

  Args:
    seed: the sampler's (secret) seed.
    num_units: N.
    bands: b, the number of groups.

  Returns:
    `[N]` int64 group indices in [0, b): i.i.d., each uniform up to a bias
    below b / 2^64 (64-bit words reduced mod b); the privacy argument needs
    only that the units' groups are independent and identically distributed.
  """
  words = _rng(seed, 0, CyclicPoissonSampler.STREAM).bit_generator.random_raw(num_units)
  return (np.asarray(words, np.uint64) % np.uint64(bands)).astype(np.int64)


class CyclicPoissonSampler(PoissonSampler):
  """Cyclic Poisson sampling: units in b groups, step t samples group t mod b at rate q.

  Each unit's group is drawn once, independently and uniformly
  (`unit_groups`), so the group sizes vary (Binomial(N, 1/b)) and the
  expected batch is q N / b; padding absorbs the spread.

  Formal guarantees:
    Neighbouring relation: add/remove of one unit (and so replace-one). A
    unit takes part only in steps congruent to its group mod b (so at least
    b apart, and in at most ceil(steps / b) of them), each time
    independently with probability q; adding or removing one unit changes
    neither the group nor the inclusions of any other unit. This is the
    b-min-separated Poisson sampling of amplified BandMF
    (`dpjax.core.accounting.events.bandmf_event`, arXiv 2306.08153). No
    sampled unit is dropped. b = 1 is Poisson sampling.
  """

  STREAM = 5

  def __init__(
    self, num_units: int, sampling_rate: float, physical_batch_size: int, seed: int, bands: int
  ):
    super().__init__(num_units, sampling_rate, physical_batch_size, seed)
    if isinstance(bands, bool) or int(bands) != bands or not 1 <= bands <= num_units:
      raise ValueError(f"bands must be an integer in [1, num_units={num_units}], got {bands!r}")
    self.bands = int(bands)
    self.group_of = unit_groups(self.seed, self.num_units, self.bands)  # [N]
    self.groups = [np.flatnonzero(self.group_of == g) for g in range(self.bands)]

  @property
  def expected_batch_size(self) -> float:
    return self.num_units * self.sampling_rate / self.bands

  def sample_indices(self, step: int, draw: int = 0) -> np.ndarray:
    """The sorted unit indices of group `step mod b` included at `step`.

    Each member of the group is included independently with probability q:
    one uniform per unit, indexed by the unit (so an added unit changes no
    other unit's inclusion either).

    Args:
      step: the logical step.
      draw: the draw (0 for training).

    Returns:
      The sorted indices of the units sampled.
    """
    group = self.groups[step % self.bands]
    rng = _rng(self.seed, step, self.STREAM, draw + 1)
    u = rng.random(self.num_units)  # [N], one uniform per unit, by index
    return group[u[group] < self.sampling_rate]


class ShuffledSampler:
  """Fixed-size batches from a fresh permutation each epoch (no privacy claim).

  Disjoint shuffled batches are not what Poisson or without-replacement
  accountants analyse; use this for non-private baselines and evaluation.
  """

  STREAM = 1
  per_user = False

  def __init__(self, num_units: int, batch_size: int, seed: int, drop_remainder: bool = True):
    if num_units < 1 or batch_size < 1:
      raise ValueError(f"num_units and batch_size must be >= 1, got {num_units}, {batch_size}")
    if drop_remainder and batch_size > num_units:
      raise ValueError(f"batch_size={batch_size} > num_units={num_units} with drop_remainder")
    self.num_units = int(num_units)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.drop_remainder = drop_remainder

  @property
  def steps_per_epoch(self) -> int:
    if self.drop_remainder:
      return self.num_units // self.batch_size
    return math.ceil(self.num_units / self.batch_size)

  def batches(self, step: int, draw: int = 0) -> List[PhysicalBatch]:
    """The batch of `step`: the next slice of this epoch's permutation (no privacy claim).

    Args:
      step: the step.
      draw: ignored (one fixed schedule).

    Returns:
      One `PhysicalBatch`.
    """
    del draw  # no privacy claim: one fixed schedule
    epoch, pos = divmod(step, self.steps_per_epoch)
    perm = _rng(self.seed, epoch, self.STREAM).permutation(self.num_units)
    idx = perm[pos * self.batch_size : (pos + 1) * self.batch_size]
    return pad_to_physical(idx, self.batch_size)


def eval_batches(num_units: int, batch_size: int) -> Iterator[PhysicalBatch]:
  """Every unit once, in order, as masked fixed-shape batches.

  Args:
    num_units: how many units (examples) to cover.
    batch_size: the fixed leading size of each batch; the last is padded.

  Returns:
    An iterator of `PhysicalBatch` (indices and a 0/1 mask of real rows).
  """
  yield from pad_to_physical(np.arange(num_units), batch_size)


# ---------------------------------------------------------------------------
# User-level sampling (arXiv 2407.07737): contribution bounding, ELS and ULS.


_BOUND_STREAM = 2


class UserIndex(NamedTuple):
  """Each user's examples after contribution bounding to at most G."""

  users: np.ndarray  # [U] the distinct user ids, sorted
  examples: np.ndarray  # [U, G] int64 example indices; padded slots hold 0
  counts: np.ndarray  # [U] int64, examples kept per user (1..G)

  @property
  def G(self) -> int:
    return int(self.examples.shape[1])

  @property
  def example_mask(self) -> np.ndarray:  # [U, G] float32
    return (np.arange(self.G)[None, :] < self.counts[:, None]).astype(np.float32)

  def kept_examples(self) -> np.ndarray:
    """All kept example indices, sorted."""
    return np.sort(self.examples[self.example_mask > 0])


def bound_contributions(user_ids, max_examples_per_user: int, seed: int) -> UserIndex:
  """Keeps at most G examples per user, chosen uniformly by `seed` (before any sampling).

  `user_ids[i]` is the user of example i. The choice depends only on
  (seed, the dataset), never on the step, so each user contributes at most G
  distinct examples over the whole run.

  Args:
    user_ids: `[N]`, the user of each example.
    max_examples_per_user: the cap G, an integer >= 1.
    seed: chooses which of a larger user's examples are kept.

  Returns:
    A `UserIndex`: the sorted user ids `[U]`, each user's kept example
    indices `[U, G]` (padded slots hold 0) and their counts `[U]`.
  """
  G = max_examples_per_user  # the papers' G
  check_max_examples_per_user(G)
  user_ids = np.asarray(user_ids)
  if user_ids.ndim != 1 or len(user_ids) == 0:
    raise ValueError(f"user_ids must be a non-empty 1-D sequence, got shape {user_ids.shape}")
  users, inverse = np.unique(user_ids, return_inverse=True)
  order = np.argsort(inverse, kind="stable")
  starts = np.searchsorted(inverse[order], np.arange(len(users)))
  ends = np.append(starts[1:], len(order))
  rng = _rng(seed, 0, _BOUND_STREAM)
  examples = np.zeros((len(users), G), np.int64)
  counts = np.zeros(len(users), np.int64)
  for u, (a, b) in enumerate(zip(starts, ends)):
    mine = order[a:b]
    if len(mine) > G:
      mine = np.sort(rng.choice(mine, size=G, replace=False))
    examples[u, : len(mine)] = mine
    counts[u] = len(mine)
  return UserIndex(users, examples, counts)


class ELSSampler(PoissonSampler):
  """Example-level sampling over the bounded examples: each kept example w.p. q.

  Formal guarantees:
    Per step, each of a user's (at most G) kept examples is included
    independently with probability q; examples beyond G are never seen. The
    user-level accountant is `dpjax.core.accounting.user_level.els_event(sigma, q,
    steps, G)`. Batches hold dataset example indices.
  """

  STREAM = 3

  def __init__(self, index: UserIndex, sampling_rate: float, physical_batch_size: int, seed: int):
    self.index = index
    self._kept = index.kept_examples()
    super().__init__(len(self._kept), sampling_rate, physical_batch_size, seed)

  def sample_indices(self, step: int, draw: int = 0) -> np.ndarray:
    """The example indices sampled at `step`, among the examples kept after capping.

    Args:
      step: the logical step.
      draw: the draw, as in `PoissonSampler.sample_indices`.

    Returns:
      The sorted example indices.
    """
    return self._kept[super().sample_indices(step, draw)]


class _UserPoisson(PoissonSampler):
  STREAM = 4


class UserBatch(NamedTuple):
  indices: np.ndarray  # [P, G] int64 example indices
  mask: np.ndarray  # [P] float32: 1 for a sampled user, 0 for padding
  example_mask: np.ndarray  # [P, G] float32: which of the user's slots hold examples


class ULSSampler:
  """User-level sampling: each user w.p. q_user, with all of their (at most G) kept examples.

  Formal guarantees:
    Per step, each user is included independently with probability
    `user_sampling_rate`; a sampled user is one privacy unit `[G, ...]`
    (average its examples, then clip). The accountant is the subsampled
    Gaussian with users as the unit (`user_level.uls_event`). Overflow users
    go to extra physical batches, never dropped.
  """

  per_user = True  # batches of `UserBatch`: [P, G, ...] examples of P users

  def __init__(self, index: UserIndex, user_sampling_rate: float, physical_users: int, seed: int):
    self.index = index
    self._users = _UserPoisson(len(index.users), user_sampling_rate, physical_users, seed)

  @property
  def expected_batch_size(self) -> float:
    return self._users.expected_batch_size

  def sample_users(self, step: int, draw: int = 0) -> np.ndarray:
    """The user indices sampled at `step` (into `index.users`).

    Args:
      step: the logical step.
      draw: the draw, as in `PoissonSampler.sample_indices`.

    Returns:
      The sorted user indices.
    """
    return self._users.sample_indices(step, draw)

  def batches(self, step: int, draw: int = 0) -> List[UserBatch]:
    """The physical batches of `step`: each row one sampled user's (at most G) examples.

    Args:
      step: the logical step.
      draw: the draw, as in `PoissonSampler.sample_indices`.

    Returns:
      `UserBatch`es (example indices [P, G], user mask [P], example mask [P, G]).
    """
    out = []
    ex_mask = self.index.example_mask
    for pb in self._users.batches(step, draw):
      real = pb.mask[:, None]
      out.append(
        UserBatch(self.index.examples[pb.indices] * (real > 0), pb.mask, ex_mask[pb.indices] * real)
      )
    return out


def median_group_size(user_ids) -> int:
  """The ELS choice of G in arXiv 2407.07737: the median number of examples per user.

  Args:
    user_ids: the user of each example.

  Returns:
    The median examples per user, rounded down, at least 1.
  """
  _, counts = np.unique(np.asarray(user_ids), return_counts=True)
  if len(counts) == 0:
    raise ValueError("user_ids is empty")
  return max(1, int(np.floor(np.median(counts))))


def contribution_report(user_ids, group_sizes) -> List[dict]:
  """For each G: how many examples contribution bounding keeps (the data side of the trade-off).

  Larger G keeps more data but, under ELS, costs more user-level epsilon at
  the same noise (see `dpjax.core.accounting.user_level.els_epsilon`).

  Args:
    user_ids: the user of each example.
    group_sizes: the caps G tried.

  Returns:
    One dict per G: G, users, examples_kept, fraction_kept, users_capped.
  """
  _, counts = np.unique(np.asarray(user_ids), return_counts=True)
  total = int(counts.sum())
  out = []
  for G in group_sizes:
    check_max_examples_per_user(G)
    kept = int(np.minimum(counts, G).sum())
    out.append(
      {
        "G": int(G),
        "users": int(len(counts)),
        "examples_kept": kept,
        "fraction_kept": kept / total,
        "users_capped": int(np.sum(counts > G)),
      }
    )
  return out
