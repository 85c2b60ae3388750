"""GGUF (llama.cpp) files of every family dpjax loads: logits against transformers' torch models.

The files are written here as llama.cpp's converter writes them: tensor names from
the gguf package's own Hugging Face -> GGUF map, the q/k rows of the Llama
architecture permuted, Gemma's norms stored as 1 + w, GPT-2's Conv1D weights
transposed and its tied head written out. transformers' own GGUF reader is run
on some of them too, as a check of the writer against a reader that is not ours.
"""

import dataclasses
import importlib.util

import numpy as np
import pytest

from dpjax.models import llama_cpp
from dpjax.models.decoder import Decoder
from dpjax.models.llama_cpp import gguf_tokenizer, llama_cpp_permute, llama_cpp_unpermute, load_gguf

gguf = pytest.importorskip("gguf")
try:
  import torch
  import transformers

  from tests import hf_tiny
except ImportError:
  torch = transformers = hf_tiny = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch (CPU) writes the reference models")

# transformers model_type -> GGUF architecture (Mistral is written as Llama by llama.cpp).
ARCH = {
  "llama": "llama",
  "mistral": "llama",
  "qwen2": "qwen2",
  "qwen3": "qwen3",
  "phi3": "phi3",
  "gemma": "gemma",
  "gemma2": "gemma2",
  "gemma3_text": "gemma3",
  "gpt2": "gpt2",
}


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


def _byte_bpe(w, vocab_size):
  """A byte-level BPE vocabulary (llama.cpp's "gpt2" tokenizer model) of vocab_size tokens."""
  merges = ["h e", "l l", "he ll", "Ġ w", "o r"]
  extra = ["he", "ll", "hell", "Ġw", "or"]
  tokens = (["<pad>", "<s>", "</s>"] + _bytes_to_unicode() + extra)[:vocab_size]
  tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
  w.add_tokenizer_model("gpt2")
  w.add_token_list(tokens)
  w.add_token_merges(merges)
  return tokens


def _sentencepiece(w, vocab_size):
  """A SentencePiece BPE vocabulary (llama.cpp's "llama" tokenizer model, Llama 2 / Gemma):
  each merged piece scored above the later merges, so "hello world" merges to two pieces."""
  merged = ["ll", "he", "hell", "hello", "▁hello", "or", "wor", "ld", "world", "▁world"]
  pieces = ["<unk>", "<s>", "</s>", "▁", "h", "e", "l", "o", "w", "r", "d"] + merged
  scores = [0.0] * 3 + [-100.0] * 8 + [-1.0 - i for i in range(len(merged))]
  types = [2, 3, 3] + [1] * (len(pieces) - 3)  # unknown, control, normal; 6: byte
  pieces += [f"<0x{b:02X}>" for b in range(vocab_size - len(pieces))]
  scores += [0.0] * (vocab_size - len(scores))
  types += [6] * (vocab_size - len(types))
  w.add_tokenizer_model("llama")
  w.add_token_list(pieces)
  w.add_token_scores(scores)
  w.add_token_types(types)
  w.add_unk_token_id(0)
  return pieces


def write_gguf(path, ref, qtype="F32", tokenizer="gpt2", meta=None, extra_tensors=None):
  """Writes `ref` (a transformers causal LM) as llama.cpp's converter would.

  Args:
    path: the file.
    ref: the torch model.
    qtype: the quantisation of 2-D tensors.
    tokenizer: "gpt2" (byte-level BPE) or "llama" (SentencePiece).
    meta: extra {key suffix: value} metadata of the architecture, as (writer method, value).
    extra_tensors: {name: array} written as they are.

  Returns:
    The vocabulary written.
  """
  c = ref.config
  model_type = c.model_type
  arch = ARCH[model_type]
  w = gguf.GGUFWriter(str(path), arch)
  gpt2 = model_type == "gpt2"
  heads = c.n_head if gpt2 else c.num_attention_heads
  w.add_block_count(c.n_layer if gpt2 else c.num_hidden_layers)
  w.add_context_length(c.n_positions if gpt2 else c.max_position_embeddings)
  w.add_embedding_length(c.n_embd if gpt2 else c.hidden_size)
  w.add_head_count(heads)
  w.add_vocab_size(c.vocab_size)
  if gpt2:
    w.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
    w.add_layer_norm_eps(c.layer_norm_epsilon)
  else:
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = c.rope_parameters
    rope = rope.get("full_attention", rope)
    w.add_rope_freq_base(rope["rope_theta"])
    hd = getattr(c, "head_dim", None) or c.hidden_size // heads
    w.add_rope_dimension_count(hd)
    if hd != c.hidden_size // heads:
      w.add_key_length(hd)
      w.add_value_length(hd)
    if rope.get("rope_type", "default") == "linear":
      w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
      w.add_rope_scaling_factor(rope["factor"])
    if model_type in ("phi3", "gemma2", "gemma3_text"):
      w.add_sliding_window(c.sliding_window)
    if model_type == "gemma2":
      w.add_attn_logit_softcapping(c.attn_logit_softcapping)
      w.add_final_logit_softcapping(c.final_logit_softcapping)
    if model_type in ("gemma2", "gemma3_text"):
      w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
      w.add_attention_scale(c.query_pre_attn_scalar**-0.5)
    if model_type == "gemma3_text":
      w.add_rope_freq_base_swa(c.rope_parameters["sliding_attention"]["rope_theta"])
  for method, value in (meta or {}).items():
    getattr(w, method)(value)
  tokens = (_byte_bpe if tokenizer == "gpt2" else _sentencepiece)(w, c.vocab_size)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  if tokenizer == "gpt2":
    w.add_pad_token_id(0)
  n_layers = c.n_layer if gpt2 else c.num_hidden_layers
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in ref.state_dict().items()}
  if c.tie_word_embeddings:
    sd.pop("lm_head.weight", None)
  q = getattr(gguf.GGMLQuantizationType, qtype)
  for hf_name, t in sd.items():
    if hf_name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
      continue
    gg = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    assert gg is not None, hf_name
    if arch == "llama" and gg.endswith("attn_q.weight"):
      t = llama_cpp_permute(t, c.num_attention_heads)
    elif arch == "llama" and gg.endswith("attn_k.weight"):
      t = llama_cpp_permute(t, c.num_key_value_heads)
    if arch.startswith("gemma") and gg.endswith("norm.weight"):
      t = t + 1.0
    if gpt2 and t.ndim == 2 and gg.startswith("blk."):
      t = np.ascontiguousarray(t.T)
    if gpt2 and gg == "token_embd.weight":  # llama.cpp writes GPT-2's tied head out
      w.add_tensor("output.weight", t)
    if t.ndim == 2 and q != gguf.GGMLQuantizationType.F32:
      packed = gguf.quants.quantize(t, q)
      w.add_tensor(gg, packed, raw_shape=packed.shape, raw_dtype=q)
    else:
      w.add_tensor(gg, t)
  for name, t in (extra_tensors or {}).items():
    w.add_tensor(name, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return tokens


def _err(cfg, params, ref, ids):
  got, _ = Decoder(cfg).apply({"params": params}, ids)
  return float(np.max(np.abs(np.asarray(got) - hf_tiny.logits(ref, ids))))


CASES = [
  ("llama", False),
  pytest.param("llama", True, marks=pytest.mark.slow),
  ("qwen2", True),
  ("qwen3", False),
  ("phi3", False),
  pytest.param("gemma", True, marks=pytest.mark.slow),
  ("gemma2", True),
  ("gemma3", False),
  ("gpt2", True),
]


@needs_torch
@pytest.mark.parametrize("family,tie", CASES)
def test_gguf_of_every_family_matches_pytorch(tmp_path, family, tie):
  ref = hf_tiny.model(family, tie)
  path = tmp_path / "tiny.gguf"
  write_gguf(path, ref)
  cfg, params = load_gguf(str(path))
  ids = hf_tiny.ids((2, 12))
  assert _err(cfg, params, ref, ids) < 1e-4
  assert cfg.tie_embeddings == (tie or family == "gpt2")
  if family == "mistral":  # llama.cpp writes no window for its Llama architecture
    assert cfg.sliding_window is None
  else:  # the same model as the Hugging Face directory gives
    ref.save_pretrained(tmp_path / "hf")
    from dpjax.models import hf

    want = hf.decoder_config(str(tmp_path / "hf"))
    assert cfg.norm_eps == pytest.approx(want.norm_eps, rel=1e-6)  # stored as float32
    assert cfg == dataclasses.replace(want, norm_eps=cfg.norm_eps)


@needs_torch
@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma2", "gpt2"])
@pytest.mark.skipif(
  importlib.util.find_spec("accelerate") is None,
  reason="transformers reads GGUF models through accelerate: pip install -e '.[parity]'",
)
def test_the_files_written_here_read_the_same_in_transformers(tmp_path, family):
  """transformers' GGUF tensor reader (not ours) gives back the model the file was written
  from: names, q/k order, norm offsets, fused and transposed layouts. Its metadata reader
  misses fields (Qwen3's head_dim, GPT-2's context), so the model's config is passed."""
  ref = hf_tiny.model(family, tie=family == "gemma2")
  write_gguf(tmp_path / "tiny.gguf", ref)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
    str(tmp_path), gguf_file="tiny.gguf", config=ref.config, local_files_only=True
  ).eval()
  ids = hf_tiny.ids((2, 12))
  with torch.no_grad():
    got = theirs(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  assert np.max(np.abs(got - hf_tiny.logits(ref, ids))) < 1e-4


@needs_torch
@pytest.mark.parametrize("qtype,atol", [("Q8_0", 0.05), ("Q4_0", 0.5)])
def test_quantised_gguf_dequantises_close_to_pytorch(tmp_path, qtype, atol):
  # Q8_0 / Q4_0 blocks are 32 wide: every row length (hidden 64, intermediate 96) divides.
  ref = hf_tiny.model("llama", hidden_size=64, intermediate_size=96, num_attention_heads=4)
  write_gguf(tmp_path / "q.gguf", ref, qtype)
  cfg, params = load_gguf(str(tmp_path / "q.gguf"))
  err = _err(cfg, params, ref, hf_tiny.ids((2, 8), 7))
  assert 1e-4 < err < atol  # quantised, and close


def test_gguf_names_are_the_gguf_packages_map():
  for arch, table in llama_cpp.NAMES.items():
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], 2)
    for g, h in table.items():
      for i in (0, 1) if "{i}" in g else (None,):
        assert names.get_name(h.format(i=i)) == g.format(i=i), (arch, h)


def test_llama_cpp_permutation_round_trip():
  w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(48, 3)
  np.testing.assert_array_equal(llama_cpp_unpermute(llama_cpp_permute(w, 6), 6), w)
  assert not np.array_equal(llama_cpp_permute(w, 6), w)


def test_llama_cpp_defaults_for_what_gemma_files_do_not_say():
  assert llama_cpp._layer_types(6, 12) == tuple(
    "full_attention" if i in (5, 11) else "sliding_attention" for i in range(12)
  )
  assert llama_cpp._layer_types(2, 4) == ("sliding_attention", "full_attention") * 2
  assert llama_cpp._layer_types([True, False], 2) == ("sliding_attention", "full_attention")


@needs_torch
def test_gemma_files_without_pattern_or_scale_take_llama_cpps_rules(tmp_path):
  ref = hf_tiny.model("gemma2", True, query_pre_attn_scalar=16, layer_types=None)
  write_gguf(tmp_path / "g.gguf", ref)
  cfg, _ = load_gguf(str(tmp_path / "g.gguf"))
  assert cfg.query_pre_attn_scalar == 16.0
  # Now the same file without the pattern and scale keys: llama.cpp's defaults.
  reader = gguf.GGUFReader(str(tmp_path / "g.gguf"))
  hf_cfg = llama_cpp.hf_config(
    _Without(reader, ("attention.sliding_window_pattern", "attention.scale")), "g.gguf"
  )
  assert hf_cfg.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
  assert hf_cfg.query_pre_attn_scalar == 16  # head_dim: not the 27B model


class _Without:
  """A reader whose fields lack some keys of its architecture."""

  def __init__(self, reader, drop):
    arch = reader.fields["general.architecture"].contents()
    self.tensors = reader.tensors
    self.fields = {k: v for k, v in reader.fields.items() if k not in {f"{arch}.{d}" for d in drop}}


@needs_torch
@pytest.mark.parametrize(
  "meta,tensors,match",
  [
    ({}, {"rope_freqs.weight": np.ones(4, np.float32)}, "rope_freqs.weight.*not implemented"),
    ({}, {"rope_factors_long.weight": np.ones(4, np.float32)}, "longrope.*not implemented"),
    ({"add_rope_scaling_type": gguf.RopeScalingType.YARN}, {}, "rope scaling 'yarn'"),
    ({"add_expert_count": 4}, {}, "metadata dpjax does not implement: \\['llama.expert_count'"),
    ({"add_sliding_window": 4}, {}, "sliding window in a llama file"),
    ({}, {"blk.0.attn_gate.weight": np.ones((8, 8), np.float32)}, "has no place"),
  ],
)
def test_what_dpjax_does_not_implement_is_refused(tmp_path, meta, tensors, match):
  ref = hf_tiny.model("llama", num_hidden_layers=1)
  write_gguf(tmp_path / "x.gguf", ref, meta=meta, extra_tensors=tensors)
  with pytest.raises(ValueError, match=match):
    load_gguf(str(tmp_path / "x.gguf"))


def test_unsupported_architecture_and_missing_file_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="GGUF file not found"):
    load_gguf(str(tmp_path / "none.gguf"))
  w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
  w.add_block_count(1)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="architecture 'mamba' is not supported"):
    load_gguf(str(tmp_path / "m.gguf"))


@needs_torch
def test_byte_level_bpe_tokenizer_is_transformers(tmp_path):
  ref = hf_tiny.model("llama", vocab_size=264, num_hidden_layers=1)
  tokens = write_gguf(tmp_path / "t.gguf", ref)
  tok = gguf_tokenizer(str(tmp_path / "t.gguf"))
  enc = tok("hello world", add_special_tokens=False)["input_ids"]
  assert tokens.index("hell") in enc and tokens.index("Ġw") in enc
  assert tok.decode(enc) == "hello world"
  assert tok.eos_token == "</s>"


@needs_torch
def test_sentencepiece_tokenizer_is_read_too(tmp_path):
  ref = hf_tiny.model("llama", vocab_size=270, num_hidden_layers=1)
  pieces = write_gguf(tmp_path / "s.gguf", ref, tokenizer="llama")
  tok = gguf_tokenizer(str(tmp_path / "s.gguf"))
  enc = tok("hello world", add_special_tokens=False)["input_ids"]
  assert enc == [pieces.index("▁hello"), pieces.index("▁world")]
  assert tok.decode(enc) == "hello world"


def test_without_torch_the_tokenizer_says_what_to_install(tmp_path, monkeypatch):
  import transformers.utils as tu

  (tmp_path / "t.gguf").write_bytes(b"")
  monkeypatch.setattr(tu, "is_torch_available", lambda: False)
  from dpjax.models.llama_cpp import MissingExtra

  with pytest.raises(MissingExtra, match=r"pip install 'dpjax\[llm\]'"):  # the guide's extra
    gguf_tokenizer(str(tmp_path / "t.gguf"))
  assert issubclass(MissingExtra, ImportError)
