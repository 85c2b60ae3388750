"""Our Flax decoders against transformers' PyTorch Llama/GPT-2; KV cache; GGUF loading."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.models.decoder import Decoder, DecoderConfig, causal_lm_loss, init_cache, init_params
from dpjax.models.generate import generate, left_pad, sample_logits
from dpjax.models.hf import (
  gguf_tokenizer,
  llama_cpp_permute,
  llama_cpp_unpermute,
  load_decoder,
  load_gguf,
)

try:  # the parity tests need torch; the cache, generation and loss tests do not
  import torch
  import transformers
except ImportError:
  torch = transformers = None
needs_torch = pytest.mark.skipif(
  torch is None, reason="torch (CPU) is needed for logit parity: pip install -e '.[test]'"
)

V = 101
# The shape of every tiny checkpoint compared with transformers (6 heads of 8, 2 KV heads).
SMALL = dict(
  vocab_size=V,
  hidden_size=48,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=6,
  num_key_value_heads=2,
)


def _tiny(family, tie=False):
  torch.manual_seed(0)
  if family in ("llama", "qwen2"):
    config, model = {
      "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    cfg = config(
      vocab_size=V,
      hidden_size=48,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=6,
      num_key_value_heads=2,
      max_position_embeddings=64,
      tie_word_embeddings=tie,
      rope_theta=500.0,
      pad_token_id=0,
      bos_token_id=1,
      eos_token_id=2,
    )
    return model(cfg).eval()
  cfg = transformers.GPT2Config(
    vocab_size=V,
    n_embd=48,
    n_layer=2,
    n_head=4,
    n_positions=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
  )
  return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module", params=["llama", "llama-tied", "gpt2"])
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
  ref = _randomise(_tiny(family, tie=request.param.endswith("tied")))  # biases, norms too
  path = tmp_path_factory.mktemp(request.param)
  ref.save_pretrained(path)
  cfg, params = load_decoder(str(path))
  return ref, cfg, params


def _ids(shape, seed=0):
  return np.random.default_rng(seed).integers(3, V, shape).astype(np.int32)


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


# ---------------------------------------------------------------------------
# GGUF


def _bytes_to_unicode():
  bs = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for _, c in sorted(zip(bs, cs))]


def _write_gguf(path, ref, qtype, rope_freqs=None):
  import gguf

  c = ref.config
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  base = _bytes_to_unicode()
  merges = ["h e", "l l", "he ll", "Ġ w", "o r"]
  extra = ["he", "ll", "hell", "Ġw", "or"]
  tokens = (["<pad>", "<s>", "</s>"] + base + extra)[: c.vocab_size]
  tokens += [f"<extra_{i}>" for i in range(c.vocab_size - len(tokens))]
  w.add_tokenizer_model("gpt2")
  w.add_token_list(tokens)
  w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(0)
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in ref.state_dict().items()}
  names = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
  }
  per_layer = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
  }
  for i in range(c.num_hidden_layers):
    for hf, gg in per_layer.items():
      names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
  for hf, gg in names.items():
    t = sd[hf]
    if gg.endswith("attn_q.weight"):
      t = llama_cpp_permute(t, c.num_attention_heads)
    elif gg.endswith("attn_k.weight"):
      t = llama_cpp_permute(t, c.num_key_value_heads)
    if t.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
      q = gguf.quants.quantize(t, qtype)
      w.add_tensor(gg, q, raw_shape=q.shape, raw_dtype=qtype)
    else:
      w.add_tensor(gg, t)
  if rope_freqs is not None:  # llama.cpp's form of llama3 rope scaling
    w.add_tensor("rope_freqs.weight", rope_freqs)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return tokens


def test_llama_cpp_permutation_round_trip():
  w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(48, 3)
  np.testing.assert_array_equal(llama_cpp_unpermute(llama_cpp_permute(w, 6), 6), w)
  assert not np.array_equal(llama_cpp_permute(w, 6), w)


@needs_torch
@pytest.mark.parametrize("qtype,atol", [("F32", 1e-4), ("Q8_0", 0.05)])
def test_gguf_loads_tiny_llama(tmp_path, qtype, atol):
  import gguf

  # Room for the 256 byte-level tokens; Q8_0 blocks are 32 wide, so every row
  # length (hidden 64, intermediate 96) is a multiple of 32.
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
    vocab_size=264,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    rope_theta=500.0,
  )
  ref = transformers.LlamaForCausalLM(cfg).eval()
  path = tmp_path / "tiny.gguf"
  tokens = _write_gguf(path, ref, getattr(gguf.GGMLQuantizationType, qtype))
  cfg, params = load_gguf(str(path))
  assert (cfg.num_heads, cfg.kv_heads, cfg.tie_embeddings) == (
    ref.config.num_attention_heads,
    ref.config.num_key_value_heads,
    False,
  )
  ids = _ids((2, 8), 7)
  with torch.no_grad():
    out = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  logits, _ = Decoder(cfg).apply({"params": params}, ids)
  err = np.max(np.abs(np.asarray(logits) - out))
  assert err < atol, err

  tok = gguf_tokenizer(str(path))
  enc = tok("hello world")["input_ids"]
  assert len(enc) > 0
  assert tokens.index("hell") in enc and tokens.index("Ġw") in enc
  assert tok.decode(enc) == "hello world"
  assert tok.eos_token == "</s>"


@needs_torch
def test_gguf_rope_frequency_factors_are_refused(tmp_path):
  import gguf

  cfg = transformers.LlamaConfig(
    vocab_size=264,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rope_theta=500.0,
  )
  ref = transformers.LlamaForCausalLM(cfg).eval()
  path = tmp_path / "scaled.gguf"
  _write_gguf(path, ref, gguf.GGMLQuantizationType.F32, rope_freqs=np.ones(8, np.float32))
  with pytest.raises(ValueError, match="rope scaling \\(rope_freqs.weight\\) is not implemented"):
    load_gguf(str(path))


def test_gguf_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="GGUF file not found"):
    load_gguf(str(tmp_path / "none.gguf"))


def _randomise(model, seed=0):
  """Every parameter random, biases and norm weights included (inits zero or one them)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(0.2 * torch.randn(p.shape, generator=g))
  return model


@needs_torch
def test_qwen2_loads_its_qkv_biases_and_matches_pytorch(tmp_path):
  ref = _randomise(_tiny("qwen2"))
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

  ref = _tiny("llama")
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
  torch.manual_seed(0)
  cfg = transformers.MistralConfig(
    **SMALL,
    max_position_embeddings=64,
    sliding_window=4,
    rope_theta=500.0,
    pad_token_id=0,
  )
  ref = _randomise(transformers.MistralForCausalLM(cfg).eval())
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
  torch.manual_seed(0)
  cfg = transformers.Qwen3Config(
    **SMALL,
    head_dim=16,  # Qwen3 sets it apart from hidden / heads
    max_position_embeddings=64,
    tie_word_embeddings=tie,
    rope_theta=500.0,
    pad_token_id=0,
  )
  ref = _randomise(transformers.Qwen3ForCausalLM(cfg).eval())
  ids = _ids((2, 9))
  dcfg, params, err = _parity(ref, tmp_path, ids)
  assert dcfg.qk_norm and dcfg.dim_per_head == 16 and err < 1e-4
  assert params["layer_1"]["attn"]["k_norm"]["scale"].shape == (16,)


def _gemma(kind, tie):
  torch.manual_seed(0)
  common = dict(
    vocab_size=V,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    sliding_window=4,  # shorter than the 12 tokens compared: the windows matter
    query_pre_attn_scalar=24,
    tie_word_embeddings=tie,
    pad_token_id=0,
  )
  if kind == "gemma2":
    cfg = transformers.Gemma2Config(
      **common, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, rope_theta=500.0
    )
    return transformers.Gemma2ForCausalLM(cfg)
  cfg = transformers.Gemma3TextConfig(
    **common,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={
      "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
      "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
    },
  )
  return transformers.Gemma3ForCausalLM(cfg)


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
  ref = _randomise(_gemma(kind, tie).eval())
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
  torch.manual_seed(0)
  cfg = transformers.Phi3Config(
    **SMALL,
    max_position_embeddings=64,
    sliding_window=5,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
  )
  ref = _randomise(transformers.Phi3ForCausalLM(cfg).eval())
  ids = _ids((2, 12))
  dcfg, params, err = _parity(ref, tmp_path, ids)
  assert dcfg.sliding_window == 5 and err < 1e-4, err
