import math

import numpy as np
import pytest

from dpjax.core.sampling import PoissonSampler, ShuffledSampler, eval_batches


def test_poisson_inclusion_rate_within_three_standard_errors():
  n, q, steps = 500, 0.03, 400
  s = PoissonSampler(n, q, physical_batch_size=8, seed=0)
  counts = np.zeros(n)
  for t in range(steps):
    for pb in s.batches(t):
      real = pb.indices[pb.mask > 0]
      counts[real] += 1
      assert np.all(pb.indices[pb.mask == 0] == 0)
      assert pb.indices.shape == (8,) and pb.mask.shape == (8,)
  rate = counts.sum() / (n * steps)
  se = math.sqrt(q * (1 - q) / (n * steps))
  assert abs(rate - q) < 3 * se


def test_overflow_is_split_never_truncated():
  s = PoissonSampler(1000, 0.5, physical_batch_size=64, seed=1)
  idx = s.sample_indices(3)
  batches = s.batches(3)
  assert len(batches) == math.ceil(len(idx) / 64) >= 7
  got = np.concatenate([pb.indices[pb.mask > 0] for pb in batches])
  np.testing.assert_array_equal(got, idx)
  assert len(np.unique(idx)) == len(idx)


def test_deterministic_per_seed_and_step():
  a = PoissonSampler(100, 0.1, 16, seed=7)
  b = PoissonSampler(100, 0.1, 16, seed=7)
  np.testing.assert_array_equal(a.sample_indices(5), b.sample_indices(5))
  assert not np.array_equal(a.sample_indices(5), a.sample_indices(6))
  assert not np.array_equal(a.sample_indices(5), PoissonSampler(100, 0.1, 16, 8).sample_indices(5))


def test_empty_step_still_yields_one_masked_batch():
  s = PoissonSampler(3, 1e-9, physical_batch_size=4, seed=0)
  (pb,) = s.batches(0)
  assert pb.mask.sum() == 0


def test_shuffled_covers_each_epoch_once():
  s = ShuffledSampler(10, 3, seed=0)
  seen = np.concatenate([s.batches(t)[0].indices for t in range(s.steps_per_epoch)])
  assert len(np.unique(seen)) == 9
  assert list(np.concatenate([pb.indices[pb.mask > 0] for pb in eval_batches(5, 2)])) == [
    0,
    1,
    2,
    3,
    4,
  ]


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(sampling_rate=0.0), "sampling_rate"),
    (dict(num_units=0), "num_units"),
    (dict(physical_batch_size=0), "physical_batch_size"),
  ],
)
def test_bad_sampler_args(kwargs, match):
  args = dict(num_units=10, sampling_rate=0.1, physical_batch_size=4, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    PoissonSampler(**args)


# ---------------------------------------------------------------------------
# User-level samplers


def _users(seed=0, n_users=40):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, 12, n_users)
  ids = np.repeat([f"user{u:03d}" for u in range(n_users)], sizes)
  return ids[rng.permutation(len(ids))], sizes


def test_bound_contributions_keeps_at_most_G_deterministically():
  from dpjax.core.sampling import bound_contributions

  ids, sizes = _users()
  idx = bound_contributions(ids, 4, seed=7)
  # Users sort as user000, user001, ...: the order sizes were drawn in.
  np.testing.assert_array_equal(idx.counts, np.minimum(sizes, 4))
  for u, user in enumerate(idx.users):
    kept = idx.examples[u, : idx.counts[u]]
    assert len(set(kept)) == idx.counts[u] and np.all(ids[kept] == user)
  again = bound_contributions(ids, 4, seed=7)
  np.testing.assert_array_equal(again.examples, idx.examples)
  other = bound_contributions(ids, 4, seed=8)
  assert not np.array_equal(other.examples, idx.examples)
  with pytest.raises(ValueError, match="G must be an integer >= 1"):
    bound_contributions(ids, 0, seed=0)


def test_els_sampler_bounds_users_and_matches_q():
  from dpjax.core.sampling import ELSSampler, bound_contributions

  ids, _ = _users(1)
  idx = bound_contributions(ids, 3, seed=0)
  kept = set(idx.kept_examples().tolist())
  q, steps = 0.2, 400
  s = ELSSampler(idx, q, physical_batch_size=16, seed=3)
  hits = np.zeros(len(ids))
  for t in range(steps):
    chosen = np.concatenate([b.indices[b.mask > 0] for b in s.batches(t)])
    assert set(chosen.tolist()) <= kept
    per_user = {}
    for i in chosen:
      per_user[ids[i]] = per_user.get(ids[i], 0) + 1
    assert max(per_user.values(), default=0) <= 3
    hits[chosen] += 1
  rate = hits[sorted(kept)] / steps
  se = np.sqrt(q * (1 - q) / (steps * len(kept)))
  assert abs(rate.mean() - q) < 3 * se
  assert hits[[i for i in range(len(ids)) if i not in kept]].sum() == 0


def test_uls_sampler_groups_users_and_matches_q():
  from dpjax.core.sampling import ULSSampler, bound_contributions

  ids, _ = _users(2)
  idx = bound_contributions(ids, 5, seed=0)
  q, steps = 0.25, 600
  s = ULSSampler(idx, q, physical_users=6, seed=1)
  counts = np.zeros(len(idx.users))
  for t in range(steps):
    for b in s.batches(t):
      assert b.indices.shape == (6, 5) and b.example_mask.shape == (6, 5)
      for row, m, em in zip(b.indices, b.mask, b.example_mask):
        if m == 0:
          assert em.sum() == 0
          continue
        users = set(ids[row[em > 0]])
        assert len(users) == 1
        u = int(np.searchsorted(idx.users, users.pop()))
        assert em.sum() == idx.counts[u]
        counts[u] += 1
  se = np.sqrt(q * (1 - q) / (steps * len(idx.users)))
  assert abs(counts.mean() / steps - q) < 3 * se


def test_median_group_size_and_contribution_report():
  from dpjax.core.sampling import contribution_report, median_group_size

  ids = np.array(["a"] * 1 + ["b"] * 3 + ["c"] * 4 + ["d"] * 10)
  assert median_group_size(ids) == 3  # counts 1, 3, 4, 10 -> median 3.5 -> 3
  rep = contribution_report(ids, [1, 3, 10])
  assert [r["examples_kept"] for r in rep] == [4, 1 + 3 + 3 + 3, 18]
  assert rep[-1]["fraction_kept"] == 1.0 and rep[1]["users_capped"] == 2
