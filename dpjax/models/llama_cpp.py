"""GGUF (llama.cpp) files -> dpjax Flax params, torch-free.

A GGUF file is read with the `gguf` package; its metadata become the
transformers config of the same family (so `hf.from_hf_config` refuses what
dpjax does not implement, as for a Hugging Face directory), its tensors are
renamed to the Hugging Face names (the inverse of the `gguf` package's
`TensorNameMap`), dequantised, and llama.cpp's storage conventions undone:
the q/k row permutation of the Llama architecture, Gemma's norms stored as
1 + w, GPT-2's transposed Conv1D weights. Then `hf.params_from_hf` builds and
checks the tree.
"""

from __future__ import annotations

import os
from typing import Tuple

import numpy as np

from dpjax.models.decoder import DecoderConfig
from dpjax.models.hf import from_hf_config, params_from_hf

# GGUF architecture -> transformers model_type.
ARCHS = {
  "llama": "llama",
  "qwen2": "qwen2",
  "qwen3": "qwen3",
  "phi3": "phi3",
  "gemma": "gemma",
  "gemma2": "gemma2",
  "gemma3": "gemma3_text",
  "gpt2": "gpt2",
}

_LLAMA_NAMES = {
  "token_embd": "model.embed_tokens",
  "output": "lm_head",
  "output_norm": "model.norm",
  "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
  "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
  "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
  "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
  "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
  "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
  "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
  "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
  "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}
_GEMMA2_NAMES = {
  **_LLAMA_NAMES,
  "blk.{i}.ffn_norm": "model.layers.{i}.pre_feedforward_layernorm",
  "blk.{i}.post_attention_norm": "model.layers.{i}.post_attention_layernorm",
  "blk.{i}.post_ffw_norm": "model.layers.{i}.post_feedforward_layernorm",
}
_QK_NORMS = {
  "blk.{i}.attn_q_norm": "model.layers.{i}.self_attn.q_norm",
  "blk.{i}.attn_k_norm": "model.layers.{i}.self_attn.k_norm",
}
# GGUF tensor stem -> Hugging Face tensor stem, per architecture (tests check each pair
# against the gguf package's own HF -> GGUF map).
NAMES = {
  "llama": _LLAMA_NAMES,
  "qwen2": _LLAMA_NAMES,
  "qwen3": {**_LLAMA_NAMES, **_QK_NORMS},
  "gemma": {k: v for k, v in _LLAMA_NAMES.items() if k != "output"},  # always tied
  "gemma2": {k: v for k, v in _GEMMA2_NAMES.items() if k != "output"},  # always tied
  "gemma3": {**_GEMMA2_NAMES, **_QK_NORMS},
  "phi3": {  # fused projections
    **{k: v for k, v in _LLAMA_NAMES.items() if k != "blk.{i}.ffn_gate"},
    "blk.{i}.attn_qkv": "model.layers.{i}.self_attn.qkv_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.gate_up_proj",
  },
  "gpt2": {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
    "blk.{i}.attn_norm": "transformer.h.{i}.ln_1",
    "blk.{i}.attn_qkv": "transformer.h.{i}.attn.c_attn",
    "blk.{i}.attn_output": "transformer.h.{i}.attn.c_proj",
    "blk.{i}.ffn_norm": "transformer.h.{i}.ln_2",
    "blk.{i}.ffn_up": "transformer.h.{i}.mlp.c_fc",
    "blk.{i}.ffn_down": "transformer.h.{i}.mlp.c_proj",
  },
}
# Tensors of llama.cpp features dpjax does not implement, named in the refusal.
_UNSUPPORTED_TENSORS = {
  "rope_freqs": "rope scaling (rope_freqs.weight, llama3-style frequency factors)",
  "rope_factors_long": "longrope scaling (rope_factors_long.weight)",
  "rope_factors_short": "longrope scaling (rope_factors_short.weight)",
}
# Metadata of the architecture that carry nothing the model needs.
_IGNORED_KEYS = ("rope.scaling.finetuned",)


class MissingExtra(ImportError):
  """A feature needs an optional dependency that is not installed (the message names the extra)."""


def hf_name(arch: str, name: str) -> str:
  """The Hugging Face name of a GGUF tensor of `arch`.

  Args:
    arch: the file's `general.architecture`.
    name: the GGUF tensor name, e.g. "blk.3.attn_q.weight".

  Returns:
    E.g. "model.layers.3.self_attn.q_proj.weight"; unknown names raise.
  """
  parts = name.split(".")
  if parts[0] == "blk" and len(parts) == 4:
    stem, i, leaf = f"blk.{{i}}.{parts[2]}", parts[1], parts[3]
  elif len(parts) == 2:
    stem, i, leaf = parts[0], "", parts[1]
  else:
    stem, i, leaf = None, "", ""
  if stem in _UNSUPPORTED_TENSORS:
    raise ValueError(f"{_UNSUPPORTED_TENSORS[stem]} is not implemented for GGUF files")
  table = NAMES[arch]
  if stem not in table:
    raise ValueError(f"GGUF tensor {name!r} has no place in a dpjax {arch} model")
  return table[stem].format(i=i) + "." + leaf


class _Meta:
  """The file's metadata; `take` records what was read so unread keys can be refused."""

  def __init__(self, reader, arch: str):
    self.fields, self.arch, self.read = reader.fields, arch, set()

  def get(self, key: str, default=None):
    f = self.fields.get(key)
    return default if f is None else f.contents()

  def take(self, key: str, default=None):
    self.read.add(f"{self.arch}.{key}")
    return self.get(f"{self.arch}.{key}", default)

  def unread(self):
    return sorted(
      k
      for k in self.fields
      if k.startswith(self.arch + ".")
      and k not in self.read
      and k[len(self.arch) + 1 :] not in _IGNORED_KEYS
    )


def _layer_types(pattern, n: int) -> Tuple[str, ...]:
  """llama.cpp's sliding-window pattern: an int n (every n-th layer full) or a bool per layer."""
  if isinstance(pattern, (list, tuple)):
    swa = [bool(p) for p in pattern]
  else:
    swa = [int(pattern) == 0 or i % int(pattern) < int(pattern) - 1 for i in range(n)]
  return tuple("sliding_attention" if s else "full_attention" for s in swa)


def hf_config(reader, path: str):
  """The transformers config a GGUF file's metadata describe.

  Where the file is silent, llama.cpp's own defaults are used: Gemma 2 alternates
  sliding and full layers, Gemma 3 has one full layer in six and a sliding-layer
  RoPE base of 10000, and Gemma 2/3 scale queries by head_dim^-1/2 except at
  27B (46 / 62 layers), where llama.cpp uses (hidden / heads)^-1/2.

  Args:
    reader: a `gguf.GGUFReader`.
    path: the file, for the messages.

  Returns:
    A transformers `PretrainedConfig`.
  """
  from transformers import AutoConfig

  arch = reader.fields["general.architecture"].contents()
  m = _Meta(reader, arch)
  if arch not in ARCHS:
    raise ValueError(
      f"{path}: GGUF architecture {arch!r} is not supported (only {', '.join(ARCHS)})"
    )
  tok = lambda k: m.get(f"tokenizer.ggml.{k}")
  names = {t.name for t in reader.tensors}
  eos = tok("eos_token_id")
  ids = dict(
    bos_token_id=tok("bos_token_id"),
    eos_token_id=eos,
    pad_token_id=tok("padding_token_id") if tok("padding_token_id") is not None else eos,
  )
  n_layer, D = int(m.take("block_count")), int(m.take("embedding_length"))
  n_head = int(m.take("attention.head_count"))
  vocab = int(m.take("vocab_size", len(tok("tokens") or [])))
  if arch == "gpt2":
    kw = dict(
      n_layer=n_layer,
      n_embd=D,
      n_head=n_head,
      n_inner=int(m.take("feed_forward_length", 4 * D)),
      n_positions=int(m.take("context_length", 1024)),
      layer_norm_epsilon=float(m.take("attention.layer_norm_epsilon", 1e-5)),
      vocab_size=vocab,
    )
  else:
    key_length = m.take("attention.key_length")
    head_dim = int(key_length) if key_length is not None else D // n_head
    value_dim = int(m.take("attention.value_length", head_dim))
    rotary = int(m.take("rope.dimension_count", head_dim))
    if value_dim != head_dim or rotary != head_dim:
      raise ValueError(
        f"{path}: value length {value_dim} / rotary dimensions {rotary} differing from the head"
        f" dimension {head_dim} are not implemented"
      )
    scaling = m.take("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
      raise ValueError(f"{path}: rope scaling {scaling!r} is not implemented (only linear)")
    rope = {"rope_type": "default", "rope_theta": float(m.take("rope.freq_base", 10000.0))}
    if scaling == "linear":
      rope.update(rope_type="linear", factor=float(m.take("rope.scaling.factor")))
    kw = dict(
      num_hidden_layers=n_layer,
      hidden_size=D,
      num_attention_heads=n_head,
      num_key_value_heads=int(m.take("attention.head_count_kv", n_head)),
      head_dim=head_dim if key_length is not None else None,
      intermediate_size=int(m.take("feed_forward_length")),
      max_position_embeddings=int(m.take("context_length", 2048)),
      rms_norm_eps=float(m.take("attention.layer_norm_rms_epsilon", 1e-6)),
      vocab_size=vocab,
      tie_word_embeddings="output.weight" not in names,
      rope_parameters=rope,
    )
    window = m.take("attention.sliding_window")
    if arch in ("phi3", "gemma2", "gemma3"):
      kw["sliding_window"] = int(window) if window is not None else None
    elif window is not None:
      raise ValueError(f"{path}: a sliding window in a {arch} file is not implemented")
    if arch in ("gemma2", "gemma3"):
      pattern = m.take("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
      scale = m.take("attention.scale")
      big = n_layer == (46 if arch == "gemma2" else 62)  # llama.cpp's 27B rule
      kw.update(
        layer_types=list(_layer_types(pattern, n_layer)),
        query_pre_attn_scalar=(
          _scalar(float(scale), path) if scale is not None else (D // n_head if big else head_dim)
        ),
        attn_logit_softcapping=m.take("attn_logit_softcapping"),
        final_logit_softcapping=m.take("final_logit_softcapping"),
      )
    if arch == "gemma3":
      local = {"rope_type": "default", "rope_theta": float(m.take("rope.freq_base_swa", 10000.0))}
      kw["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
  unread = m.unread()
  if unread:
    raise ValueError(f"{path}: GGUF metadata dpjax does not implement: {unread[:6]}")
  return AutoConfig.for_model(ARCHS[arch], **kw, **ids)


def _scalar(scale: float, path: str) -> int:
  """Gemma's query_pre_attn_scalar (an integer in transformers) of an attention scale."""
  value = scale**-2
  if abs(value - round(value)) > 1e-3 * value:
    raise ValueError(f"{path}: attention scale {scale} is not 1 / sqrt of an integer")
  return round(value)


def load_gguf(path: str, *, dtype: str = "float32"):
  """`(DecoderConfig, params)` from a llama.cpp GGUF file: Llama (and Mistral, which
  llama.cpp writes as Llama), Qwen2/2.5, Qwen3, Phi-3, Gemma 1/2/3 (text) or GPT-2.

  Quantised tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantised with the
  `gguf` package, then cast to `dtype`.

  Args:
    path: the `.gguf` file.
    dtype: the parameters' and compute dtype.

  Returns:
    (config, params).
  """
  import gguf

  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  reader = gguf.GGUFReader(path)
  hf = hf_config(reader, path)
  cfg = from_hf_config(hf, path, dtype)
  arch = reader.fields["general.architecture"].contents()
  weights = {}
  for t in reader.tensors:
    name = hf_name(arch, t.name)
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    w = w.reshape([int(d) for d in reversed(t.shape)])  # ggml ne order is innermost first
    weights[name] = _undo_llama_cpp(arch, t.name, w, cfg)
  if arch == "gpt2" and "lm_head.weight" in weights:  # llama.cpp writes the tied head out
    if not np.array_equal(weights.pop("lm_head.weight"), weights["transformer.wte.weight"]):
      raise ValueError(f"{path}: a GPT-2 output matrix apart from the embedding is not supported")
  return cfg, params_from_hf(cfg, weights, path)


def _undo_llama_cpp(arch: str, name: str, w: np.ndarray, cfg: DecoderConfig) -> np.ndarray:
  """A GGUF tensor in the Hugging Face checkpoint's values."""
  if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
    return llama_cpp_unpermute(w, cfg.num_heads)
  if arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
    return llama_cpp_unpermute(w, cfg.kv_heads)
  if arch.startswith("gemma") and name.endswith("norm.weight"):  # llama.cpp stores Gemma's 1 + w
    return w - 1.0
  if arch == "gpt2" and w.ndim == 2 and name.startswith("blk."):  # Conv1D, stored transposed
    return w.T
  return w


def llama_cpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k row permutation (rotary pairs interleaved).

  llama.cpp's converter reorders the rows of the torch `[out, in]` q and k
  weights of the Llama architecture so that rotary pairs are adjacent (its
  kernels rotate pairs (2i, 2i+1)); Hugging Face checkpoints rotate halves
  (i, i + hd/2). This puts the rows back in the Hugging Face order.

  Args:
    w: a q or k weight from GGUF, torch layout [out, in] (or a bias [out]).
    n_head: the heads of that projection.

  Returns:
    The weight in the Hugging Face row order.
  """
  out = w.shape[0]
  if out % (2 * n_head):
    raise ValueError(f"{out} rows do not split into {n_head} heads of even size")
  return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's converter permutation (for writing GGUF files in tests/tools).

  Args:
    w: a q or k weight in the Hugging Face row order.
    n_head: the heads of that projection.

  Returns:
    The weight in llama.cpp's row order.
  """
  out = w.shape[0]
  return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tokenizer(path: str, **kwargs):
  """transformers' tokenizer of a GGUF file (`AutoTokenizer.from_pretrained(..., gguf_file=)`):
  byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) and SentencePiece (Llama 2, Gemma) vocabularies.

  Args:
    path: the `.gguf` file.
    **kwargs: passed to `AutoTokenizer.from_pretrained`.

  Returns:
    A transformers tokenizer.
  """
  from transformers import AutoTokenizer
  from transformers.utils import is_torch_available

  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  if not is_torch_available():
    raise MissingExtra(
      f"{path}: transformers reads a GGUF tokenizer with torch: pip install 'dpjax[llm]' "
      "(the CPU wheel: add --extra-index-url https://download.pytorch.org/whl/cpu)"
    )
  folder, name = os.path.split(os.path.abspath(path))
  return AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True, **kwargs)
