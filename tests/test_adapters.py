"""LoRA, prefix-tuning and trainable masks, each against an independent computation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax.models import adapters
from dpjax.models.decoder import Decoder, DecoderConfig, causal_lm_loss, init_cache
from dpjax.models.decoder import init_params as init_decoder
from dpjax.models.encoder import Encoder, EncoderConfig
from dpjax.models.encoder import init_params as init_encoder

DEC = DecoderConfig(
  family="llama",
  vocab_size=50,
  hidden_size=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  intermediate_size=48,
  rope_theta=100.0,
)
GPT = DecoderConfig(
  family="gpt2",
  vocab_size=50,
  hidden_size=32,
  num_layers=2,
  num_heads=4,
  intermediate_size=48,
  max_position=32,
)
ENC = EncoderConfig(
  vocab_size=50,
  hidden_size=32,
  num_layers=1,
  num_heads=4,
  intermediate_size=48,
  max_position=32,
  num_labels=2,
)


def _ids(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 50, shape), jnp.int32)


def test_partition_combine_round_trip_and_mask_errors():
  params = init_decoder(DEC, jax.random.PRNGKey(0))
  mask = adapters.trainable_mask(params, r".*mlp_norm/.*|final_norm/.*")
  trainable, frozen = adapters.partition(params, mask)
  assert adapters.count(trainable) == 3 * 32
  assert adapters.count(trainable) + adapters.count(frozen) == adapters.count(params)
  back = adapters.combine(trainable, frozen)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, params))
  with pytest.raises(ValueError, match="matches no parameter"):
    adapters.trainable_mask(params, r"nothing/.*")


@pytest.mark.parametrize(
  "cfg", [DEC, pytest.param(GPT, marks=pytest.mark.slow)], ids=["llama", "gpt2"]
)
def test_lora_equals_merged_weights(cfg):
  params = init_decoder(cfg, jax.random.PRNGKey(0))
  lora = adapters.init_lora(params, jax.random.PRNGKey(1), rank=4, targets=r".*attn/(q|v)|.*mlp/up")
  assert set(lora["layer_0"]["attn"]) == {"q", "v"}
  ids = _ids((2, 7))
  model = Decoder(cfg)
  base, _ = model.apply({"params": params}, ids)
  with adapters.lora(lora, alpha=8.0):
    start, _ = model.apply({"params": params}, ids)
  np.testing.assert_allclose(start, base, atol=1e-6)  # B = 0: the adapted model starts as the base
  lora = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape), lora)
  with adapters.lora(lora, alpha=8.0):
    adapted, _ = model.apply({"params": params}, ids)
  merged, _ = model.apply({"params": adapters.merge_lora(params, lora, alpha=8.0)}, ids)
  assert np.max(np.abs(np.asarray(adapted) - np.asarray(base))) > 1e-3
  np.testing.assert_allclose(adapted, merged, atol=2e-5)


@pytest.mark.slow  # long; the default run keeps the suite under 15 min on CI
def test_lora_private_gradient_matches_merged_loop():
  """Clipped per-example LoRA grads (interceptor, vmap) == a loop through merged weights."""
  params = init_decoder(DEC, jax.random.PRNGKey(0))
  lora = adapters.init_lora(params, jax.random.PRNGKey(1), rank=2, targets=r".*attn/(q|v)")
  lora = jax.tree.map(lambda x: x + 0.05, lora)
  model = Decoder(DEC)
  batch = {"ids": _ids((5, 6), 3), "mask": jnp.ones((5, 6), jnp.int32).at[1, 4:].set(0)}

  def loss(lora, ex, base):
    with adapters.lora(lora):
      logits, _ = model.apply({"params": base}, ex["ids"][None], ex["mask"][None])
    return causal_lm_loss(logits, ex["ids"][None], ex["mask"][None])[0]

  clip = 0.05
  total, aux = dpjax.clipped_grad(loss, l2_clip_norm=clip)(lora, batch, params)
  assert jax.tree.structure(total) == jax.tree.structure(lora)  # only the adapter

  def merged_loss(lora, i):
    logits, _ = model.apply(
      {"params": adapters.merge_lora(params, lora)},
      batch["ids"][i : i + 1],
      batch["mask"][i : i + 1],
    )
    return causal_lm_loss(logits, batch["ids"][i : i + 1], batch["mask"][i : i + 1])[0]

  ref = jax.tree.map(jnp.zeros_like, lora)
  for i in range(5):
    g = jax.grad(merged_loss)(lora, i)
    n = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))
    np.testing.assert_allclose(aux.norms[i], n, rtol=1e-4)
    ref = jax.tree.map(lambda r, x: r + x * jnp.minimum(1.0, clip / n), ref, g)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), total, ref)

  # A private step then touches the adapter only; the base is an untouched argument.
  tx = optax.chain(dpjax.mechanisms.gaussian(1.0, clip, jax.random.PRNGKey(0)), optax.sgd(0.1))
  updates, _ = tx.update(total, tx.init(lora), lora)
  assert jax.tree.structure(updates) == jax.tree.structure(lora)


@pytest.mark.parametrize("cfg", [DEC, GPT], ids=["llama", "gpt2"])
def test_decoder_prefix_equals_real_context(cfg):
  """Prefixes holding a context's cached keys/values == running with that context."""
  params = init_decoder(cfg, jax.random.PRNGKey(0))
  model = Decoder(cfg)
  ctx, ids = _ids((1, 4), 5), _ids((1, 6), 6)
  full, _ = model.apply({"params": params}, jnp.concatenate([ctx, ids], 1))
  _, cache = model.apply({"params": params}, ctx, cache=init_cache(cfg, 1, 4))
  prefixes = {i: (cache.k[i, 0], cache.v[i, 0]) for i in range(cfg.num_layers)}
  with_prefix, _ = model.apply({"params": params}, ids, prefixes=prefixes, position_offset=4)
  np.testing.assert_allclose(with_prefix[0], full[0, 4:], atol=1e-5)


def test_prefix_layer_mask_removes_layers():
  params = init_decoder(DEC, jax.random.PRNGKey(0))
  prefix = adapters.init_prefix(
    jax.random.PRNGKey(1),
    num_layers=2,
    num_tokens=3,
    num_kv_heads=2,
    head_dim=8,
    layers=[False, True],
    scale=1.0,
  )
  assert set(prefix) == {"layer_1"}
  model = Decoder(DEC)
  ids = _ids((2, 5))
  _, _, plain = model.apply({"params": params}, ids, return_hidden=True)
  _, _, pref = model.apply(
    {"params": params}, ids, prefixes=adapters.prefix_layers(prefix), return_hidden=True
  )
  np.testing.assert_allclose(pref[0], plain[0], atol=1e-6)  # layer 0 has no prefix
  assert np.max(np.abs(np.asarray(pref[1]) - np.asarray(plain[1]))) > 1e-3
  both = adapters.init_prefix(
    jax.random.PRNGKey(1), num_layers=2, num_tokens=3, num_kv_heads=2, head_dim=8
  )
  assert set(adapters.select_prefix_layers(both, [True, False])) == {"layer_0"}
  with pytest.raises(ValueError, match="layer mask has 3 entries"):
    adapters.init_prefix(
      jax.random.PRNGKey(1),
      num_layers=2,
      num_tokens=3,
      num_kv_heads=2,
      head_dim=8,
      layers=[True] * 3,
    )


def test_encoder_prefix_equals_extra_tokens():
  """With position embeddings zeroed, a 1-layer encoder's prefix = keys/values of extra tokens."""
  params = init_encoder(ENC, jax.random.PRNGKey(0))
  params["position_embeddings"]["embedding"] = jnp.zeros_like(
    params["position_embeddings"]["embedding"]
  )
  model = Encoder(ENC)
  extra, ids = _ids((1, 3), 7), _ids((1, 5), 8)
  full = model.apply(
    {"params": params},
    jnp.concatenate([extra, ids], 1),
    jnp.ones((1, 8)),
    method=Encoder.hidden_states,
  )
  emb = model.apply({"params": params}, extra, jnp.ones((1, 3)), method=Encoder.embed)[0]
  att = params["layer_0"]["attention"]
  kv = [(emb @ att[n]["kernel"] + att[n]["bias"]).reshape(3, 4, 8) for n in ("key", "value")]
  got = model.apply(
    {"params": params}, ids, jnp.ones((1, 5)), prefixes={0: tuple(kv)}, method=Encoder.hidden_states
  )
  np.testing.assert_allclose(got[0], full[0, 3:], atol=1e-5)
