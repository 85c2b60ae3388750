import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax.core import mechanisms
from tests import models_tiny as mt


@pytest.mark.parametrize("variant", mt.VARIANTS)
def test_std_within_two_percent_over_a_million_draws(variant):
  tx = mechanisms.gaussian(noise_multiplier=0.7, l2_sensitivity=2.0, key=jax.random.PRNGKey(0))
  zeros = {"a": jnp.zeros((1000, 500)), "b": jnp.zeros(500_000)}
  noisy, _ = variant(tx.update)(zeros, tx.init(zeros))
  draws = np.concatenate([np.ravel(x) for x in jax.tree.leaves(noisy)])
  assert draws.size == 10**6
  assert abs(draws.std() / 1.4 - 1.0) < 0.02
  assert abs(draws.mean()) < 0.01


@pytest.mark.parametrize("variant", mt.VARIANTS)
def test_noise_added_to_the_sum_and_never_repeats(variant):
  tx = mechanisms.gaussian(1.0, 1.0, jax.random.PRNGKey(1))
  grads = {"w": jnp.full((64,), 3.0), "v": jnp.full((64,), 3.0)}
  state = tx.init(grads)
  update = variant(tx.update)
  out1, state = update(grads, state)
  out2, state = update(grads, state)
  n1, n2 = out1["w"] - 3.0, out2["w"] - 3.0
  assert not np.allclose(n1, n2)
  assert not np.allclose(out1["w"], out1["v"])  # each leaf its own key
  assert int(state.count) == 2
  assert abs(float(jnp.mean(jnp.concatenate([n1, n2])))) < 0.5


def test_bf16_grads_get_f32_noise_and_keep_dtype():
  tx = mechanisms.gaussian(1e-3, 1.0, jax.random.PRNGKey(2))
  g = jnp.full((4096,), 256.0, jnp.bfloat16)
  out, _ = tx.update(g, tx.init(g))
  assert out.dtype == jnp.bfloat16
  # bf16 has an 8-bit mantissa: 256 + 1e-3 noise rounds back to 256 exactly,
  # while the noise itself, drawn in f32, is not quantised to zero first.
  small = jnp.zeros((4096,), jnp.bfloat16)
  noise, _ = tx.update(small, tx.init(small))
  assert float(jnp.std(noise.astype(jnp.float32))) == pytest.approx(1e-3, rel=0.05)
  assert np.all(np.asarray(out, np.float32) == 256.0)


def test_laplace_scale_and_variance():
  tx = mechanisms.laplace(noise_multiplier=0.5, l1_sensitivity=2.0, key=jax.random.PRNGKey(3))
  z = jnp.zeros(10**6)
  out, _ = tx.update(z, tx.init(z))
  # Laplace(0, b) has E|x| = b and var = 2 b^2, b = 1.0 here.
  assert float(jnp.mean(jnp.abs(out))) == pytest.approx(1.0, rel=0.01)
  assert float(jnp.var(out)) == pytest.approx(2.0, rel=0.02)


def test_normalize_divides_by_expected_batch_size():
  tx = dpjax.normalize(expected_batch_size=8.0)
  out, _ = tx.update({"w": jnp.full(3, 4.0)}, tx.init(None))
  np.testing.assert_allclose(out["w"], 0.5)


def test_chain_with_optax_and_state_holds_key():
  key = jax.random.PRNGKey(4)
  tx = optax.chain(mechanisms.gaussian(1.0, 1.0, key), dpjax.normalize(4.0), optax.sgd(1.0))
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  np.testing.assert_array_equal(state[0].key, key)
  updates, state2 = tx.update({"w": jnp.ones(3)}, state, params)
  assert updates["w"].shape == (3,)
  assert not np.array_equal(state2[0].key, key)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_noise_multiplier(bad):
  with pytest.raises(ValueError, match="noise_multiplier must be finite and >= 0"):
    mechanisms.gaussian(bad, 1.0, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="expected_batch_size"):
    dpjax.normalize(0)


# --- full-range noise ---------------------------------------------------------


def test_largest_attainable_noise_from_the_construction():
  from scipy import stats

  zeros = jnp.zeros((mechanisms.EXPONENT_WORDS, 1), jnp.uint32)
  # All exponent bits zero and the smallest significand: the largest Exp(1) draw.
  e_max = float(mechanisms.exponential_from_bits(zeros, jnp.zeros(1, jnp.uint32))[0])
  assert e_max == pytest.approx(97 * np.log(2), rel=1e-6)
  assert e_max == pytest.approx(mechanisms.MAX_EXPONENTIAL, rel=1e-6)
  # Box-Muller reaches sqrt(2 E): at least 9 sigma (float32 inverse-erf stops near 5.3).
  assert np.sqrt(2 * e_max) >= 9.0 and mechanisms.MAX_GAUSSIAN >= 9.0
  # Laplace |x| = E reaches a tail at least as thin as the Gaussian's at 9 sigma.
  assert np.exp(-e_max) <= 2 * stats.norm.sf(9.0)


@pytest.mark.parametrize("k", [0, 1, 5, 31, 32, 33, 63, 64, 95])
def test_exponent_is_the_count_of_leading_zero_bits(k):
  # Words whose first set bit is bit k (counting from the top of word 0): U in [2^-(k+1), 2^-k).
  words = np.zeros((mechanisms.EXPONENT_WORDS, 2), np.uint32)
  words[k // 32, :] = np.uint32(1) << np.uint32(31 - k % 32)
  sig = np.array([0, 0xFFFFFFFF], np.uint32)  # significand 1/2 and just below 1
  e = np.asarray(mechanisms.exponential_from_bits(jnp.asarray(words), jnp.asarray(sig)), np.float64)
  np.testing.assert_allclose(
    e, [(k + 1) * np.log(2), k * np.log(2) - np.log1p(-(2.0**-24))], rtol=1e-6, atol=1e-7
  )


def _moments(x):
  x = np.asarray(x, np.float64).ravel()
  return x.mean(), x.var(), np.mean((x - x.mean()) ** 4) / x.var() ** 2


def test_gaussian_and_laplace_moments_and_tails_over_a_million_draws():
  from scipy import stats

  n = 10**6
  zeros = {"a": jnp.zeros((500, 1000)), "b": jnp.zeros(500_001)}
  for tx, std, kurt, sf in (
    (mechanisms.gaussian(1.0, 1.0, jax.random.PRNGKey(3)), 1.0, 3.0, 2 * stats.norm.sf(4)),
    (mechanisms.laplace(1.0, 1.0, jax.random.PRNGKey(4)), np.sqrt(2), 6.0, np.exp(-9.0)),
  ):
    noisy, _ = jax.jit(tx.update)(zeros, tx.init(zeros))
    x = np.concatenate([np.ravel(v) for v in jax.tree.leaves(noisy)])
    assert x.size == n + 1
    mean, var, k = _moments(x)
    assert abs(mean) < 5 * std / np.sqrt(n)
    assert abs(var / std**2 - 1) < 0.006
    assert abs(k - kurt) < (0.05 if kurt == 3 else 0.3)
    # The tail beyond 4 sigma (Gaussian) or 9 scales (Laplace), against the exact rate.
    hits = np.sum(np.abs(x) > (4.0 if kurt == 3 else 9.0))
    assert abs(hits - n * sf) < 5 * np.sqrt(n * sf)
  # Kolmogorov-Smirnov against the exact Gaussian CDF.
  z = np.ravel(mechanisms.standard_normal(jax.random.PRNGKey(5), (200_000,)))
  assert stats.kstest(z, "norm").pvalue > 1e-3


@pytest.mark.parametrize("size", [0, 1, 7, 1001])
def test_random_words_are_both_halves_of_jax_threefry(size):
  """Both halves of jax's own Threefry-2x32 at the counters (0, i), for typed, raw and split keys,
  jitted or not; their xor is `jax.random.bits`' word (the partitionable layout)."""
  from jax.extend.random import threefry_2x32

  keys = (jax.random.key(3), jax.random.PRNGKey(9), jax.random.split(jax.random.key(1))[1])
  jitted = jax.jit(mechanisms.threefry_words, static_argnums=1)
  counters = np.concatenate([np.zeros(size, np.uint32), np.arange(size, dtype=np.uint32)])
  for k in keys:
    data = jax.random.key_data(k) if jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key) else k
    want = np.asarray(threefry_2x32(data, jnp.asarray(counters))) if size else np.zeros(0)
    for hi, lo in (mechanisms.threefry_words(k, size), jitted(k, size)):
      np.testing.assert_array_equal(np.asarray(hi), want[:size])
      np.testing.assert_array_equal(np.asarray(lo), want[size:])
      if jax.config.jax_threefry_partitionable:
        bits = np.asarray(jax.random.bits(k, (size,), jnp.uint32))
        np.testing.assert_array_equal(np.asarray(hi ^ lo), bits)


def test_draws_in_their_shape_pair_neighbours_on_the_last_axis():
  """Words at `counters(shape)` are the flat counters' words, row-major. A normal draw
  is Box-Muller on pairs of neighbours: (sqrt(2 E) cos, sqrt(2 E) sin)(2 pi V) of pair j
  at positions 2j and 2j + 1 of the last axis (of the flat draw when it is odd)."""
  words, normal, exponential, turns = (
    jax.jit(f, static_argnums=1)
    for f in (
      mechanisms.threefry_words,
      mechanisms.standard_normal,
      mechanisms.standard_exponential,
      lambda v, _: mechanisms.cos_sin_turns(v),
    )
  )
  k = jax.random.key(5)
  ke, ku = jax.random.split(k)
  for shape in [(6, 5, 4), (4, 7), (), (3,)]:
    n, pairs = int(np.prod(shape)), -(-int(np.prod(shape)) // 2)
    for got, flat in zip(words(k, shape), words(k, n)):
      np.testing.assert_array_equal(np.asarray(got).reshape(-1), np.asarray(flat))
    z = np.asarray(normal(k, shape))
    assert z.shape == shape
    r = np.sqrt(2 * np.asarray(exponential(ke, (pairs,))))
    c, s = (np.asarray(a) for a in turns(words(ku, pairs)[0], 0))
    want = np.stack([r * c, r * s], axis=-1).reshape(-1)[:n]
    np.testing.assert_allclose(z.reshape(-1), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1])
def test_a_sharded_draw_is_split_over_the_devices(axis):
  """Noise for a parameter split over 8 devices: each device hashes only its slice (an
  eighth of one device's FLOPs), and the values are one device's draw."""
  from jax.sharding import NamedSharding, PartitionSpec

  mesh = jax.make_mesh((8,), ("model",), devices=jax.devices()[:8])
  spec = [None, None]
  spec[axis] = "model"
  at = NamedSharding(mesh, PartitionSpec(*spec))
  shape = (512, 256)

  def draw(k):
    return mechanisms.standard_normal(k, shape)

  k = jax.random.key(2)
  one = jax.jit(draw).lower(k).compile()
  split = jax.jit(draw, out_shardings=at).lower(k).compile()

  def flops(c):
    cost = c.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

  assert flops(split) < 0.15 * flops(one)
  np.testing.assert_array_equal(np.asarray(split(k)), np.asarray(one(k)))


def test_other_key_implementations_take_jax_randoms_path():
  k = jax.random.key(4, impl="rbg")
  hi, lo = mechanisms.threefry_words(k, 5)
  want = np.asarray(jax.random.bits(k, (2, 5), jnp.uint32))
  np.testing.assert_array_equal(np.stack([hi, lo]), want)


def test_cos_sin_of_every_angle_on_the_grid():
  """All 2^23 angles of the uniform grid against float64 cos and sin (the low 9 bits unused)."""
  v = np.arange(2**23, dtype=np.uint32)
  exact = 2 * np.pi * v / 2.0**23
  for low in (0, 0x1FF):
    c, s = jax.jit(mechanisms.cos_sin_turns)(jnp.asarray((v << np.uint32(9)) | np.uint32(low)))
    c, s = np.asarray(c, np.float64), np.asarray(s, np.float64)
    assert np.max(np.abs(c - np.cos(exact))) < 1e-7
    assert np.max(np.abs(s - np.sin(exact))) < 1e-7
    assert np.all(np.abs(c) <= 1) and np.all(np.abs(s) <= 1)
  # The four axis points exactly.
  for turn, want in ((0, (1, 0)), (2**21, (0, 1)), (2**22, (-1, 0)), (3 * 2**21, (0, -1))):
    c, s = mechanisms.cos_sin_turns(jnp.asarray([turn << 9], jnp.uint32))
    assert (float(c[0]), float(s[0])) == want


def test_gaussian_pairs_are_isotropic():
  """The cosine and sine halves of one pair: uncorrelated, the angle uniform, r^2 Exp(mean 2)."""
  from scipy import stats

  n = 200_000
  z = np.asarray(mechanisms.standard_normal(jax.random.key(6), (2 * n,)), np.float64)
  x, y = z[:n], z[n:]
  assert abs(np.corrcoef(x, y)[0, 1]) < 5 / np.sqrt(n)
  assert stats.kstest((np.arctan2(y, x) / (2 * np.pi)) % 1.0, "uniform").pvalue > 1e-3
  assert stats.kstest(x**2 + y**2, "expon", args=(0, 2)).pvalue > 1e-3
  # Sign patterns by octant pairs: each quadrant a quarter.
  quad = (x > 0).astype(int) * 2 + (y > 0)
  counts = np.bincount(quad, minlength=4)
  assert stats.chisquare(counts).pvalue > 1e-3


def test_register_refuses_a_mechanism_it_could_not_make_in_one_line():
  class NoField(mechanisms.Mechanism):  # scaled, but not made from a noise multiplier
    name = "no_field"

    def transform(self, key, sensitivity):
      return mechanisms.gaussian(1.0, sensitivity, key)

    def step_event(self, sampling_rate):
      return None

    def noise_variance(self, sensitivity):
      return 0.0

  with pytest.raises(ValueError, match="cannot be made from a noise multiplier alone"):
    mechanisms.register(NoField)
  with pytest.raises(ValueError, match="name 'gaussian' is taken"):
    mechanisms.register(type("Other", (mechanisms.Gaussian,), {"name": "gaussian"}))
  assert "no_field" not in mechanisms.names()
