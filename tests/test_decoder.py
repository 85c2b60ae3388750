"""Our Flax decoders against transformers' PyTorch models of every family; KV cache; generation.

GGUF files are in test_gguf.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.models.decoder import Decoder, DecoderConfig, causal_lm_loss, init_cache, init_params
from dpjax.models.generate import generate, left_pad, sample_logits
from dpjax.models.hf import load_decoder
from tests import hf_tiny
from tests.hf_tiny import SMALL, V

try:  # the parity tests need torch; the cache, generation and loss tests do not
  import torch
  import transformers
except ImportError:
  torch = transformers = None
needs_torch = pytest.mark.skipif(
  torch is None, reason="torch (CPU) is needed for logit parity: pip install -e '.[test]'"
)
_ids = hf_tiny.ids
_randomise = hf_tiny.randomise


@pytest.fixture(
  scope="module", params=["llama", pytest.param("llama-tied", marks=pytest.mark.slow), "gpt2"]
)
def tiny(request, tmp_path_factory):
  family = request.param.split("-")[0]
  if torch is None:  # the same shapes, dpjax's own random init
    cfg = DecoderConfig(
      family=family,
      vocab_size=V,
      hidden_size=48,
      num_layers=2,
      num_heads=6 if family == "llama" else 4,
      num_kv_heads=2 if family == "llama" else None,
      intermediate_size=64 if family == "llama" else 192,
      max_position=64,
      tie_embeddings=family == "gpt2" or request.param.endswith("tied"),
      rope_theta=500.0,
      pad_token_id=0,
      bos_token_id=1,
      eos_token_id=2,
    )
    return None, cfg, init_params(cfg, jax.random.PRNGKey(0))
  ref = hf_tiny.model(family, tie=request.param.endswith("tied"))  # biases, norms too
  path = tmp_path_factory.mktemp(request.param)
  ref.save_pretrained(path)
  cfg, params = load_decoder(str(path))
  return ref, cfg, params


@needs_torch
def test_logits_match_pytorch(tiny):
  ref, cfg, params = tiny
  ids = _ids((3, 10))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0  # right padding: compare real positions
  with torch.no_grad():
    out = ref(
      input_ids=torch.tensor(ids, dtype=torch.long),
      attention_mask=torch.tensor(mask, dtype=torch.long),
    ).logits.numpy()
  logits, cache = Decoder(cfg).apply({"params": params}, ids, mask)
  assert cache is None
  valid = mask.astype(bool)
  assert np.max(np.abs(np.asarray(logits)[valid] - out[valid])) < 1e-4


def test_left_padding_does_not_change_logits(tiny):
  _, cfg, params = tiny
  seqs = [list(_ids((7,), 1)), list(_ids((4,), 2))]
  ids, mask = left_pad(seqs, cfg.pad_token_id)
  model = Decoder(cfg)
  batched, _ = model.apply({"params": params}, ids, mask)
  for b, s in enumerate(seqs):
    alone, _ = model.apply({"params": params}, np.asarray([s], np.int32))
    np.testing.assert_allclose(np.asarray(batched)[b, -len(s) :], np.asarray(alone)[0], atol=1e-5)


def test_incremental_cache_equals_full_pass(tiny):
  _, cfg, params = tiny
  ids = _ids((2, 9), 3)
  model = Decoder(cfg)
  full, _ = model.apply({"params": params}, ids)
  cache = init_cache(cfg, 2, 12)
  head, cache = model.apply({"params": params}, ids[:, :5], cache=cache)
  steps = [head]
  for t in range(5, 9):
    lg, cache = model.apply({"params": params}, ids[:, t : t + 1], cache=cache)
    steps.append(lg)
  np.testing.assert_allclose(
    np.concatenate([np.asarray(s) for s in steps], 1), np.asarray(full), atol=1e-4
  )
  assert int(cache.index) == 9 and int(cache.mask.sum()) == 18


def test_greedy_generation_with_cache_equals_without(tiny):
  _, cfg, params = tiny
  ids, mask = left_pad([list(_ids((6,), 4)), list(_ids((3,), 5))], cfg.pad_token_id)
  key = jax.random.PRNGKey(0)
  kw = dict(max_new_tokens=8, temperature=0.0)
  with_cache, _ = generate(cfg, params, ids, mask, key, use_cache=True, **kw)
  without, _ = generate(cfg, params, ids, mask, key, use_cache=False, **kw)
  assert with_cache.shape == (2, 8)
  np.testing.assert_array_equal(np.asarray(with_cache), np.asarray(without))
  # Teacher forcing on prompt + output: each new token is the argmax after its context.
  seq = np.concatenate([ids[1:], np.asarray(with_cache)[1:]], 1)
  seq_mask = np.concatenate([mask[1:], np.ones((1, 8), np.int32)], 1)
  logits, _ = Decoder(cfg).apply({"params": params}, seq, seq_mask)
  for t, tok in enumerate(np.asarray(with_cache)[1]):
    assert tok == int(np.argmax(np.asarray(logits)[0, ids.shape[1] - 1 + t]))
    if tok == cfg.eos_token_id:
      break


def test_sampled_generation_with_cache_equals_without(tiny):
  _, cfg, params = tiny
  ids, mask = left_pad([list(_ids((5,), 6))] * 3, cfg.pad_token_id)
  kw = dict(max_new_tokens=6, temperature=0.8, top_k=20, top_p=0.9)
  key = jax.random.PRNGKey(3)
  a, _ = generate(cfg, params, ids, mask, key, use_cache=True, **kw)
  b, _ = generate(cfg, params, ids, mask, key, use_cache=False, **kw)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sample_logits_top_k_top_p_support():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.split(jax.random.PRNGKey(0), 1)[0]
  k1 = np.asarray(sample_logits(logits, keys, top_k=2))
  assert set(k1) == {0, 1}
  assert abs(np.mean(k1 == 0) - 0.5 / 0.8) < 0.03  # renormalised over the top 2
  p = np.asarray(sample_logits(logits, keys, top_p=0.85))  # 0.5 + 0.3 < 0.85 -> keep 3
  assert set(p) == {0, 1, 2}
  assert set(np.asarray(sample_logits(logits, keys, top_p=0.4))) == {0}
  np.testing.assert_array_equal(np.asarray(sample_logits(logits, keys, temperature=0.0)), 0)
  full = np.asarray(sample_logits(logits, keys))
  assert abs(np.mean(full == 3) - 0.05) < 0.015
  with pytest.raises(ValueError, match="top_p"):
    sample_logits(logits, keys, top_p=0.0)


def test_causal_lm_loss_masks_padding():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 6, 11)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 11, (2, 6)))
  mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
  loss = causal_lm_loss(logits, ids, mask)
  logp = jax.nn.log_softmax(logits, -1)
  ref0 = -np.mean([logp[0, t, ids[0, t + 1]] for t in range(3)])
  ref1 = -np.mean([logp[1, t, ids[1, t + 1]] for t in range(2, 5)])
  np.testing.assert_allclose(np.asarray(loss), [ref0, ref1], rtol=1e-5)
  # Changing a padded token or its logits changes nothing.
  ids2 = ids.at[0, 5].set((ids[0, 5] + 1) % 11)
  logits2 = logits.at[0, 4:].add(3.0)
  np.testing.assert_allclose(np.asarray(causal_lm_loss(logits2, ids2, mask)), np.asarray(loss))


@needs_torch
def test_qwen2_loads_its_qkv_biases_and_matches_pytorch(tmp_path):
  ref = hf_tiny.model("qwen2")
  ref.save_pretrained(tmp_path)
  dcfg, params = load_decoder(str(tmp_path))
  assert dcfg.bias and not dcfg.o_bias
  assert "bias" in params["layer_0"]["attn"]["q"] and "bias" not in params["layer_0"]["attn"]["o"]
  ids = _ids((2, 9))
  with torch.no_grad():
    out = ref(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  logits, _ = Decoder(dcfg).apply({"params": params}, ids)
  assert np.max(np.abs(np.asarray(logits) - out)) < 1e-4


@needs_torch
def test_a_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path):
  import dataclasses

  from dpjax.models import hf

  ref = hf_tiny.model("llama")
  ref.save_pretrained(tmp_path)
  cfg, params = load_decoder(str(tmp_path))
  # The same tensors against a model with q/k/v/o biases: the biases are missing.
  biased = dataclasses.replace(cfg, attention_bias=True)
  expected = jax.eval_shape(lambda: hf.init_params(biased, jax.random.PRNGKey(0)))
  with pytest.raises(ValueError, match="does not fit the model: unused tensors \\[\\], missing"):
    hf.check_tree(params, expected, str(tmp_path))


def _parity(ref, tmp_path, ids):
  ref.save_pretrained(tmp_path)
  dcfg, params = load_decoder(str(tmp_path))
  with torch.no_grad():
    out = ref(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  logits, _ = Decoder(dcfg).apply({"params": params}, ids)
  return dcfg, params, float(np.max(np.abs(np.asarray(logits) - out)))


@needs_torch
@pytest.mark.parametrize(
  "rope",
  [
    {"rope_type": "linear", "factor": 3.0},
    # head_dim 8 at theta 500: wavelengths 6, 30, 140, 660 against 64 / 4 and 64 / 1,
    # so one frequency is kept, one interpolated and two divided by the factor.
    {
      "rope_type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64,
    },
  ],
)
def test_rope_scaling_matches_pytorch(tmp_path, rope):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
    **SMALL,
    max_position_embeddings=512,
    rope_parameters={"rope_theta": 500.0, **rope},
    pad_token_id=0,
  )
  ref = _randomise(transformers.LlamaForCausalLM(cfg).eval())
  ids = _ids((2, 40))
  dcfg, params, err = _parity(ref, tmp_path, ids)
  assert dcfg.rope_type == rope["rope_type"] and err < 1e-4
  plain = dataclasses.replace(dcfg, rope_type="default")  # the scaling must matter
  logits, _ = Decoder(plain).apply({"params": params}, ids)
  with torch.no_grad():
    out = ref(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  assert np.max(np.abs(np.asarray(logits) - out)) > 1e-2


@needs_torch
def test_mistral_sliding_window_matches_pytorch(tmp_path):
  ref = hf_tiny.model("mistral", sliding_window=4)
  ids = _ids((2, 12))
  dcfg, params, err = _parity(ref, tmp_path, ids)
  assert dcfg.sliding_window == 4 and err < 1e-4
  full = dataclasses.replace(dcfg, sliding_window=None)
  a, _ = Decoder(full).apply({"params": params}, ids)
  b, _ = Decoder(dcfg).apply({"params": params}, ids)
  assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-2  # the window matters here


@needs_torch
def test_unimplemented_rope_types_are_refused(tmp_path):
  cfg = transformers.LlamaConfig(
    vocab_size=V,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=6,
    max_position_embeddings=64,
    rope_parameters={"rope_theta": 500.0, "rope_type": "dynamic", "factor": 2.0},
  )
  transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="rope type 'dynamic' is not implemented"):
    load_decoder(str(tmp_path))


@needs_torch
@pytest.mark.parametrize("tie", [False, True])
def test_qwen3_loads_its_qk_norms_and_matches_pytorch(tmp_path, tie):
  ref = hf_tiny.model("qwen3", tie)
  ids = _ids((2, 9))
  dcfg, params, err = _parity(ref, tmp_path, ids)
  assert dcfg.qk_norm and dcfg.dim_per_head == 16 and err < 1e-4
  assert params["layer_1"]["attn"]["k_norm"]["scale"].shape == (16,)


@needs_torch
@pytest.mark.parametrize(
  "kind,tie",
  [
    ("gemma2", True),
    ("gemma3", False),
    pytest.param("gemma2", False, marks=pytest.mark.slow),
    pytest.param("gemma3", True, marks=pytest.mark.slow),
  ],
)
def test_gemma_matches_pytorch(tmp_path, kind, tie):
  ref = hf_tiny.model(kind, tie)
  ids = _ids((2, 12))
  dcfg, params, err = _parity(ref, tmp_path, ids)
  assert dcfg.sandwich_norms and dcfg.embed_scale and dcfg.norm_offset == 1.0
  assert err < 1e-4, err
  if kind == "gemma2":
    assert (dcfg.attn_softcap, dcfg.final_softcap) == (5.0, 3.0)
    ablations = dict(attn_softcap=None, final_softcap=None, sliding_window=None)
  else:
    assert dcfg.qk_norm and dcfg.rope_local_theta == 100.0 and dcfg.rope_type == "linear"
    ablations = dict(rope_local_theta=None, rope_type="default", sliding_window=None)
  ablations.update(query_pre_attn_scalar=None)
  base, _ = Decoder(dcfg).apply({"params": params}, ids)
  for field, value in ablations.items():  # every feature matters on this input
    other, _ = Decoder(dataclasses.replace(dcfg, **{field: value})).apply({"params": params}, ids)
    assert np.max(np.abs(np.asarray(other) - np.asarray(base))) > 1e-3, field


@needs_torch
def test_phi3_fused_projections_and_sliding_window_match_pytorch(tmp_path):
  ref = hf_tiny.model("phi3")
  ids = _ids((2, 12))
  dcfg, params, err = _parity(ref, tmp_path, ids)
  assert dcfg.sliding_window == 5 and err < 1e-4, err
