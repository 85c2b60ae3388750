import math

import numpy as np
import pytest

from dpjax.data.sampling import PoissonSampler, ShuffledSampler, eval_batches


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
  assert list(np.concatenate([pb.indices[pb.mask > 0] for pb in eval_batches(5, 2)])) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampling_rate=0.0), "sampling_rate"), (dict(num_units=0), "num_units"),
    (dict(physical_batch_size=0), "physical_batch_size")])
def test_bad_sampler_args(kwargs, match):
  args = dict(num_units=10, sampling_rate=0.1, physical_batch_size=4, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    PoissonSampler(**args)
