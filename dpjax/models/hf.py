"""Hugging Face checkpoints from a LOCAL directory -> dpjax Flax params.

Reads `config.json` through transformers' config classes and weights from
`*.safetensors` (no torch needed, never the hub). PyTorch `Linear` weights
are `[out, in]`; Flax `Dense` kernels are `[in, out]`, hence the transposes.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.models.decoder import ROPE_TYPES, DecoderConfig, init_params
from dpjax.models.encoder import Encoder, EncoderConfig

_T = lambda w: w.T
_I = lambda w: w


def _require_dir(path: str) -> None:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"model directory not found: {path}")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"no config.json in {path}")


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """All tensors of all `*.safetensors` files in `path`, as numpy arrays.

  Args:
    path: a checkpoint directory.

  Returns:
    {tensor name: array}.
  """
  from safetensors.numpy import load_file

  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors file in {path}")
  out: Dict[str, np.ndarray] = {}
  for f in files:
    out.update(load_file(f))
  return out


def _assign(tree: dict, path: Tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  if path[-1] in tree:
    raise ValueError(f"two checkpoint tensors map to {'/'.join(path)}")
  tree[path[-1]] = value


def convert(
  weights: Dict[str, np.ndarray], rules: List[Tuple[str, Callable]], skip: Tuple[str, ...] = ()
) -> dict:
  """Maps checkpoint names to a param tree with (regex, target-template, fn) rules.

  Args:
    weights: {checkpoint name: array}.
    rules: (regex, target template, transform) triples; the first match wins.
    skip: regexes of names dropped on purpose.

  Returns:
    The nested param tree (raises ValueError naming an unmatched tensor).
  """
  tree: dict = {}
  unused = []
  for name, w in weights.items():
    for pattern, target, fn in rules:
      m = re.fullmatch(pattern, name)
      if m:
        _assign(tree, tuple(m.expand(target).split("/")), jnp.asarray(fn(w)))
        break
    else:
      if not any(re.fullmatch(s, name) for s in skip):
        unused.append(name)
  if unused:
    raise ValueError(f"checkpoint tensors with no place in the model: {unused[:8]}")
  return tree


def _lin(pattern: str, target: str):
  """A torch Linear -> Flax Dense pair of rules."""
  return [
    (pattern + r"\.weight", target + "/kernel", _T),
    (pattern + r"\.bias", target + "/bias", _I),
  ]


def _ln(pattern: str, target: str):
  return [
    (pattern + r"\.weight", target + "/scale", _I),
    (pattern + r"\.bias", target + "/bias", _I),
  ]


_ENCODER_RULES = (
  [(r"embeddings\.(word|position|token_type)_embeddings\.weight", r"\1_embeddings/embedding", _I)]
  + _ln(r"embeddings\.LayerNorm", "embeddings_ln")
  + _lin(r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)", r"layer_\1/attention/\2")
  + _lin(r"encoder\.layer\.(\d+)\.attention\.output\.dense", r"layer_\1/attention/output")
  + _ln(r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm", r"layer_\1/attention_ln")
  + _lin(r"encoder\.layer\.(\d+)\.intermediate\.dense", r"layer_\1/intermediate")
  + _lin(r"encoder\.layer\.(\d+)\.output\.dense", r"layer_\1/output")
  + _ln(r"encoder\.layer\.(\d+)\.output\.LayerNorm", r"layer_\1/output_ln")
  # BERT: pooler + classifier; RoBERTa: classifier.dense (tanh) + out_proj.
  + _lin(r"pooler\.dense", "pooler")
  + _lin(r"classifier\.dense", "pooler")
  + _lin(r"classifier\.out_proj", "classifier")
  + _lin(r"classifier", "classifier")
)
_ENCODER_SKIP = (r"embeddings\.position_ids", r"lm_head\..*", r"cls\..*")


def encoder_config(
  path: str,
  *,
  num_labels: int = 2,
  pooling: str = "cls",
  pool_scale: float = 1.0,
  dtype: str = "float32",
) -> EncoderConfig:
  """`EncoderConfig` from a local HF BERT/RoBERTa directory's config.json.

  Args:
    path: the checkpoint directory.
    num_labels: the classifier's outputs.
    pooling: "cls", "mean" or "mean_l2".
    pool_scale: the scale of "mean_l2" pooling.
    dtype: the compute dtype.

  Returns:
    The config.
  """
  from transformers import AutoConfig

  _require_dir(path)
  hf = AutoConfig.from_pretrained(path, local_files_only=True)
  if hf.model_type not in ("bert", "roberta", "xlm-roberta"):
    raise ValueError(f"{path} holds a {hf.model_type!r} model, not a BERT/RoBERTa encoder")
  roberta = hf.model_type != "bert"
  return EncoderConfig(
    vocab_size=hf.vocab_size,
    hidden_size=hf.hidden_size,
    num_layers=hf.num_hidden_layers,
    num_heads=hf.num_attention_heads,
    intermediate_size=hf.intermediate_size,
    max_position=hf.max_position_embeddings,
    type_vocab_size=hf.type_vocab_size,
    layer_norm_eps=hf.layer_norm_eps,
    hidden_act=hf.hidden_act,
    pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
    position_offset=(hf.pad_token_id + 1) if roberta else 0,
    num_labels=num_labels,
    pooling=pooling,
    pool_scale=pool_scale,
    dtype=dtype,
  )


def load_encoder(
  path: str,
  *,
  num_labels: int = 2,
  pooling: str = "cls",
  pool_scale: float = 1.0,
  head_key: Optional[jax.Array] = None,
  dtype: str = "float32",
):
  """`(EncoderConfig, params)` from a local HF BERT/RoBERTa directory.

  A checkpoint without a classification head (a bare encoder) gets a fresh
  head drawn from N(0, 0.02^2) with `head_key` (default key 0); with
  mean pooling the pretrained tanh pooler is not used and not loaded.

  Args:
    path: the checkpoint directory.
    num_labels: the classifier's outputs.
    pooling: "cls", "mean" or "mean_l2".
    pool_scale: the scale of "mean_l2" pooling.
    head_key: the key of a fresh head.
    dtype: the parameters' and compute dtype.

  Returns:
    (config, params).
  """
  cfg = encoder_config(
    path, num_labels=num_labels, pooling=pooling, pool_scale=pool_scale, dtype=dtype
  )
  weights = read_safetensors(path)
  weights = {re.sub(r"^(bert|roberta)\.", "", k): v for k, v in weights.items()}
  params = convert(weights, _ENCODER_RULES, _ENCODER_SKIP)
  if pooling != "cls":
    params.pop("pooler", None)
  key = head_key if head_key is not None else jax.random.PRNGKey(0)
  k1, k2 = jax.random.split(key)
  if pooling == "cls" and "pooler" not in params:
    params["pooler"] = {
      "kernel": 0.02 * jax.random.normal(k1, (cfg.hidden_size, cfg.hidden_size)),
      "bias": jnp.zeros(cfg.hidden_size),
    }
  if "classifier" not in params or params["classifier"]["kernel"].shape[1] != num_labels:
    params["classifier"] = {
      "kernel": 0.02 * jax.random.normal(k2, (cfg.hidden_size, num_labels)),
      "bias": jnp.zeros(num_labels),
    }
  ids = jnp.zeros((1, 2), jnp.int32)
  model = Encoder(cfg)
  check_tree(
    params, jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, ids))["params"], path
  )
  return cfg, params


# ---------------------------------------------------------------------------
# Decoders: Llama and GPT-2 families.

_LLAMA_RULES = (
  [
    (r"model\.embed_tokens\.weight", "embed/embedding", _I),
    (r"lm_head\.weight", "lm_head/kernel", _T),
    (r"model\.norm\.weight", "final_norm/scale", _I),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layer_\1/attn_norm/scale", _I),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layer_\1/mlp_norm/scale", _I),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight", r"layer_\1/attn/\2_norm/scale", _I),
  ]
  + _lin(r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj", r"layer_\1/attn/\2")
  + _lin(r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj", r"layer_\1/mlp/\2")
)
# Gemma 2/3 norm around both sublayers; first match wins, so these precede Llama's names.
_SANDWICH_RULES = [
  (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layer_\1/post_attn_norm/scale", _I),
  (r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.weight", r"layer_\1/mlp_norm/scale", _I),
  (
    r"model\.layers\.(\d+)\.post_feedforward_layernorm\.weight",
    r"layer_\1/post_mlp_norm/scale",
    _I,
  ),
] + _LLAMA_RULES
_LLAMA_SKIP = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\..*")

# GPT-2 uses Conv1D, whose weight is already [in, out]; c_attn packs q, k, v.
_GPT2_RULES = (
  [
    (r"transformer\.wte\.weight", "embed/embedding", _I),
    (r"transformer\.wpe\.weight", "pos_embed/embedding", _I),
  ]
  + _ln(r"transformer\.ln_f", "final_norm")
  + _ln(r"transformer\.h\.(\d+)\.ln_1", r"layer_\1/attn_norm")
  + _ln(r"transformer\.h\.(\d+)\.ln_2", r"layer_\1/mlp_norm")
  + [
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.weight", r"layer_\1/attn/o/kernel", _I),
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.bias", r"layer_\1/attn/o/bias", _I),
    (r"transformer\.h\.(\d+)\.mlp\.c_fc\.weight", r"layer_\1/mlp/up/kernel", _I),
    (r"transformer\.h\.(\d+)\.mlp\.c_fc\.bias", r"layer_\1/mlp/up/bias", _I),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.weight", r"layer_\1/mlp/down/kernel", _I),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.bias", r"layer_\1/mlp/down/bias", _I),
  ]
)
_GPT2_SKIP = (
  r"lm_head\.weight",
  r"transformer\.h\.\d+\.attn\.c_attn\.(weight|bias)",
  r"transformer\.h\.\d+\.attn\.(masked_)?bias",
)


def decoder_config(path: str, *, dtype: str = "float32") -> DecoderConfig:
  """`DecoderConfig` from a local HF directory's config.json (the families of `load_decoder`).

  Args:
    path: the checkpoint directory.
    dtype: the compute dtype.

  Returns:
    The config.
  """
  from transformers import AutoConfig

  _require_dir(path)
  return from_hf_config(AutoConfig.from_pretrained(path, local_files_only=True), path, dtype)


def from_hf_config(hf, path: str, dtype: str = "float32") -> DecoderConfig:
  """`DecoderConfig` of a transformers config object; what dpjax does not implement is refused.

  Args:
    hf: a transformers `PretrainedConfig` (Llama, Mistral, Qwen2/3, Phi-3, Gemma 1/2/3, GPT-2).
    path: where it came from, for the messages.
    dtype: the compute dtype.

  Returns:
    The config.
  """
  if hf.model_type == "gemma3":
    raise ValueError(
      f"{path}: a multimodal Gemma 3 checkpoint; dpjax loads the text model (gemma3_text)"
    )
  if hf.model_type in GEMMA:
    return _gemma_config(path, hf, dtype)
  if hf.model_type in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
    qwen2 = hf.model_type == "qwen2"
    if hf.model_type.startswith("qwen") and getattr(hf, "use_sliding_window", False):
      raise ValueError(f"{path}: {hf.model_type} use_sliding_window=True is not implemented")
    rp = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    window = getattr(hf, "sliding_window", None) if hf.model_type in ("mistral", "phi3") else None
    partial = rp.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0)
    if partial != 1.0:
      raise ValueError(f"{path}: partial_rotary_factor {partial} is not implemented (only 1.0)")
    return DecoderConfig(
      **_llama_shape(hf),
      **_rope_fields(path, rp, hf),
      sliding_window=window,
      qk_norm=hf.model_type == "qwen3",
      hidden_act=hf.hidden_act,
      tie_embeddings=bool(hf.tie_word_embeddings),
      # Qwen2 always has q/k/v biases and no o bias (its config has no attention_bias).
      attention_bias=True if qwen2 else bool(getattr(hf, "attention_bias", False)),
      output_bias=False if qwen2 else None,
      pad_token_id=_first_id(hf.pad_token_id, hf.eos_token_id),
      bos_token_id=_first_id(hf.bos_token_id, default=None),
      eos_token_id=_first_id(hf.eos_token_id, default=None),
      dtype=dtype,
    )
  if hf.model_type == "gpt2":
    return DecoderConfig(
      family="gpt2",
      vocab_size=hf.vocab_size,
      hidden_size=hf.n_embd,
      num_layers=hf.n_layer,
      num_heads=hf.n_head,
      intermediate_size=hf.n_inner or 4 * hf.n_embd,
      max_position=hf.n_positions,
      norm_eps=hf.layer_norm_epsilon,
      hidden_act=hf.activation_function,
      tie_embeddings=True,
      pad_token_id=_first_id(hf.pad_token_id, hf.eos_token_id),
      bos_token_id=_first_id(hf.bos_token_id, default=None),
      eos_token_id=_first_id(hf.eos_token_id, default=None),
      dtype=dtype,
    )
  raise ValueError(
    f"{path} holds a {hf.model_type!r} model; decoders load "
    "llama, mistral, qwen2, qwen3, phi3, gemma, gemma2, gemma3_text or gpt2"
  )


def _first_id(*ids, default: Optional[int] = 0) -> Optional[int]:
  for i in ids:
    if isinstance(i, (list, tuple)):
      i = i[0] if i else None
    if i is not None:
      return int(i)
  return default


GEMMA = ("gemma", "gemma2", "gemma3_text")


def _llama_shape(hf) -> Dict:
  """The DecoderConfig size fields of a Llama-family transformers config."""
  return dict(
    family="llama",
    vocab_size=hf.vocab_size,
    hidden_size=hf.hidden_size,
    num_layers=hf.num_hidden_layers,
    num_heads=hf.num_attention_heads,
    num_kv_heads=hf.num_key_value_heads,
    head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
    intermediate_size=hf.intermediate_size,
    max_position=hf.max_position_embeddings,
    norm_eps=hf.rms_norm_eps,
  )


def _rope_fields(path: str, rp: Dict, hf) -> Dict:
  """The DecoderConfig RoPE fields of a checkpoint's rope parameters; unimplemented ones refused."""
  rope_type = rp.get("rope_type", rp.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(
      f"{path}: rope type {rope_type!r} is not implemented (only {', '.join(ROPE_TYPES)})"
    )
  if rope_type != "default" and rp.get("attention_factor", 1.0) != 1.0:
    raise ValueError(f"{path}: rope attention_factor {rp['attention_factor']} is not implemented")
  return dict(
    rope_theta=float(rp.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
    rope_type=rope_type,
    rope_factor=float(rp.get("factor", 1.0)),
    rope_low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
    rope_high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
    rope_original_max_position=rp.get("original_max_position_embeddings"),
  )


def _gemma_config(path: str, hf, dtype: str) -> DecoderConfig:
  """Gemma 1/2/3 (text): RMSNorm x (1 + w), sqrt(D)-scaled embeddings; 2 and 3 add
  sandwich norms and alternating sliding windows, 2 soft-capping, 3 q/k norms and a
  RoPE base of their own for sliding layers."""
  rp = dict(getattr(hf, "rope_parameters", None) or {})
  local = None
  if "full_attention" in rp or "sliding_attention" in rp:  # Gemma 3: per layer type
    local = rp.get("sliding_attention") or {}
    rp = rp.get("full_attention") or {}
    if local.get("rope_type", "default") != "default":
      raise ValueError(f"{path}: sliding-layer rope type {local['rope_type']!r} is not implemented")
  gen = hf.model_type != "gemma"
  types = tuple(getattr(hf, "layer_types", None) or ()) or None
  return DecoderConfig(
    **_llama_shape(hf),
    **_rope_fields(path, rp, hf),
    sliding_window=getattr(hf, "sliding_window", None) if gen else None,
    layer_types=types if gen else None,
    rope_local_theta=float(local["rope_theta"]) if local and "rope_theta" in local else None,
    qk_norm=hf.model_type == "gemma3_text",
    norm_offset=1.0,
    embed_scale=True,
    sandwich_norms=gen,
    attn_softcap=getattr(hf, "attn_logit_softcapping", None),
    final_softcap=getattr(hf, "final_logit_softcapping", None),
    query_pre_attn_scalar=getattr(hf, "query_pre_attn_scalar", None),
    hidden_act=getattr(hf, "hidden_activation", None) or hf.hidden_act,
    tie_embeddings=bool(hf.tie_word_embeddings),
    attention_bias=bool(getattr(hf, "attention_bias", False)),
    pad_token_id=_first_id(hf.pad_token_id, hf.eos_token_id),
    bos_token_id=_first_id(hf.bos_token_id, default=None),
    eos_token_id=_first_id(hf.eos_token_id, default=None),
    dtype=dtype,
  )


def _unfuse(weights: Dict[str, np.ndarray], cfg: DecoderConfig) -> Dict[str, np.ndarray]:
  """Phi-3's fused qkv_proj and gate_up_proj as the separate Llama projections."""
  q = cfg.num_heads * cfg.dim_per_head
  kv = cfg.kv_heads * cfg.dim_per_head
  out = {}
  for name, w in weights.items():
    if name.endswith("self_attn.qkv_proj.weight"):
      stem = name[: -len("qkv_proj.weight")]
      if w.shape[0] != q + 2 * kv:
        raise ValueError(f"{name}: {w.shape[0]} rows, expected q {q} + k {kv} + v {kv}")
      out[stem + "q_proj.weight"], out[stem + "k_proj.weight"], out[stem + "v_proj.weight"] = (
        w[:q],
        w[q : q + kv],
        w[q + kv :],
      )
    elif name.endswith("mlp.gate_up_proj.weight"):  # gate first, as transformers' chunk(2)
      stem = name[: -len("gate_up_proj.weight")]
      out[stem + "gate_proj.weight"], out[stem + "up_proj.weight"] = np.split(w, 2, axis=0)
    else:
      out[name] = w
  return out


def load_decoder(path: str, *, dtype: str = "float32"):
  """`(DecoderConfig, params)` from a local HF decoder directory (safetensors): Llama, Mistral,
  Qwen2/3, Phi-3, Gemma 1/2/3 (text) or GPT-2.

  Args:
    path: the checkpoint directory.
    dtype: the parameters' and compute dtype.

  Returns:
    (config, params).
  """
  cfg = decoder_config(path, dtype=dtype)
  return cfg, params_from_hf(cfg, read_safetensors(path), path)


def params_from_hf(cfg: DecoderConfig, weights: Dict[str, np.ndarray], source: str):
  """The parameter tree of `cfg` from Hugging Face tensors, checked against the model's tree.

  Args:
    cfg: the decoder's config (`from_hf_config`).
    weights: {Hugging Face tensor name: array} (fused Phi-3 projections are split here).
    source: the checkpoint, for the messages.

  Returns:
    The tree, cast to `cfg.dtype`.
  """
  weights = _unfuse(weights, cfg)
  if cfg.family == "llama":
    skip = _LLAMA_SKIP + ((r"lm_head\.weight",) if cfg.tie_embeddings else ())
    params = convert(weights, _SANDWICH_RULES if cfg.sandwich_norms else _LLAMA_RULES, skip)
  else:
    weights = {
      (k if k.startswith("transformer.") or k.startswith("lm_head") else "transformer." + k): v
      for k, v in weights.items()
    }
    params = convert(weights, _GPT2_RULES, _GPT2_SKIP)
    D = cfg.hidden_size
    for i in range(cfg.num_layers):
      w = weights[f"transformer.h.{i}.attn.c_attn.weight"]
      b = weights[f"transformer.h.{i}.attn.c_attn.bias"]
      attn = params[f"layer_{i}"].setdefault("attn", {})
      for j, n in enumerate("qkv"):
        attn[n] = {
          "kernel": jnp.asarray(w[:, j * D : (j + 1) * D]),
          "bias": jnp.asarray(b[j * D : (j + 1) * D]),
        }
  check_tree(params, jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0))), source)
  return _cast(params, cfg.dtype)


def check_tree(loaded, expected, source: str) -> None:
  """Refuses a converted checkpoint whose tree is not the model's, naming what differs.

  linen ignores parameters its modules do not use, so a tensor loaded into a
  path the model does not have (e.g. a bias the config turned off) would be
  dropped silently; a missing one would fail later and less clearly.

  Args:
    loaded: the converted parameter tree.
    expected: the model's parameter tree (arrays or shape structs).
    source: the checkpoint, for the message.
  """
  flat = lambda t: {
    jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(t)
  }
  got, want = flat(loaded), flat(expected)
  extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
  shapes = [
    f"{k}: {got[k]} vs {want[k]}" for k in sorted(set(got) & set(want)) if got[k] != want[k]
  ]
  if extra or missing or shapes:
    raise ValueError(
      f"{source}: the checkpoint does not fit the model: "
      f"unused tensors {extra[:6]}, missing {missing[:6]}, shapes differ {shapes[:6]}"
    )


def _cast(params, dtype: str):
  return jax.tree.map(lambda x: x.astype(dtype), params)


# ---------------------------------------------------------------------------
# Export: a decoder back to a Hugging Face directory.


def _inverse(rules) -> List[Tuple[str, str, Callable]]:
  """The load rules turned around: (tree-path regex, HF-name template, transform).

  Each group `(...)` of a rule's source regex becomes a reference in the name
  template and each reference of its target a named group; the transforms
  (transpose or identity) are their own inverses. The first match still wins.
  """
  out = []
  for pattern, target, fn in rules:
    count = iter(range(1, 100))
    template = re.sub(r"\([^()]*\)", lambda _: f"\\g<g{next(count)}>", pattern)
    template = template.replace("\\.", ".")
    parts = re.split(r"\\(\d)", target)
    regex = "".join(re.escape(p) if k % 2 == 0 else f"(?P<g{p}>[^/]+)" for k, p in enumerate(parts))
    out.append((regex, template, fn))
  return out


def to_hf_weights(cfg: DecoderConfig, params) -> Dict[str, np.ndarray]:
  """The Hugging Face tensors (names, torch layouts) of a decoder's tree, any family.

  Phi-3 trees are written in the Llama layout (separate q/k/v and gate/up
  projections), which transformers' Mistral/Llama classes load as the same model.

  Args:
    cfg: the decoder's config.
    params: its parameter tree (LoRA merged beforehand).

  Returns:
    {name: float32 array}; `params_from_hf(cfg, out, ...)` gives `params` back.
  """
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v, np.float32)
    for path, v in jax.tree_util.tree_leaves_with_path(params)
  }
  out: Dict[str, np.ndarray] = {}
  if cfg.family == "gpt2":
    rules = _inverse(_GPT2_RULES)
    for i in range(cfg.num_layers):
      qkv = [f"layer_{i}/attn/{n}/" for n in "qkv"]
      out[f"transformer.h.{i}.attn.c_attn.weight"] = np.concatenate(
        [flat.pop(q + "kernel") for q in qkv], 1
      )
      out[f"transformer.h.{i}.attn.c_attn.bias"] = np.concatenate(
        [flat.pop(q + "bias") for q in qkv]
      )
  else:
    rules = _inverse(_SANDWICH_RULES if cfg.sandwich_norms else _LLAMA_RULES)
  for path, w in flat.items():
    for regex, template, fn in rules:
      m = re.fullmatch(regex, path)
      if m:
        out[m.expand(template)] = fn(w)
        break
    else:
      raise ValueError(f"parameter {path} has no Hugging Face name (a dpjax-only part?)")
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def export_type(cfg: DecoderConfig) -> str:
  """The transformers model_type a decoder is exported as.

  Args:
    cfg: the decoder's config.

  Returns:
    gpt2, gemma3_text, gemma2, gemma, qwen3, qwen2, mistral (a sliding window,
    Phi-3 included) or llama.
  """
  if cfg.family == "gpt2":
    return "gpt2"
  if cfg.sandwich_norms:
    return "gemma3_text" if cfg.qk_norm else "gemma2"
  if cfg.norm_offset or cfg.embed_scale:
    return "gemma"
  if cfg.qk_norm:
    return "qwen3"
  if cfg.bias and not cfg.o_bias:
    return "qwen2"
  return "mistral" if cfg.sliding_window is not None else "llama"


def to_hf_config(cfg: DecoderConfig):
  """The transformers config of a decoder; refused when it would not mean the same model.

  Args:
    cfg: the decoder's config.

  Returns:
    A transformers `PretrainedConfig` whose `from_hf_config` is `cfg`.
  """
  from transformers import AutoConfig

  kind = export_type(cfg)
  ids = dict(pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id)
  ids["eos_token_id"] = cfg.eos_token_id
  if kind == "gpt2":
    kw = dict(
      vocab_size=cfg.vocab_size,
      n_embd=cfg.hidden_size,
      n_layer=cfg.num_layers,
      n_head=cfg.num_heads,
      n_inner=cfg.intermediate_size,
      n_positions=cfg.max_position,
      layer_norm_epsilon=cfg.norm_eps,
      activation_function=cfg.act,
    )
  else:
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type != "default":
      rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
      rope.update(
        low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor,
        original_max_position_embeddings=cfg.rope_original_max_position,
      )
    kw = dict(
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.kv_heads,
      max_position_embeddings=cfg.max_position,
      rms_norm_eps=cfg.norm_eps,
      rope_parameters=rope,
      tie_word_embeddings=cfg.tie_embeddings,
    )
    kw["head_dim"] = cfg.dim_per_head  # Gemma's default is 256, not hidden / heads
    kw["hidden_activation" if kind.startswith("gemma") else "hidden_act"] = cfg.act
    if kind != "qwen2":
      kw["attention_bias"] = cfg.bias
    if kind in ("mistral", "gemma2", "gemma3_text"):
      kw["sliding_window"] = cfg.sliding_window
    if kind in ("gemma2", "gemma3_text"):
      windowed = "sliding_attention" if cfg.sliding_window is not None else "full_attention"
      kw.update(
        layer_types=list(cfg.layer_types or [windowed] * cfg.num_layers),
        query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.dim_per_head,
        attn_logit_softcapping=cfg.attn_softcap,
        final_logit_softcapping=cfg.final_softcap,
      )
    if kind == "gemma3_text":
      local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
      kw["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
  hf = AutoConfig.for_model(kind, **kw, **ids)
  back = from_hf_config(hf, f"the {kind} export", cfg.dtype)
  differ = [
    f.name
    for f in dataclasses.fields(cfg)
    if getattr(_plain(back), f.name) != getattr(_plain(cfg), f.name)
  ]
  if differ:
    raise ValueError(f"a transformers {kind} config cannot express this decoder's {differ}")
  return hf


def _plain(cfg: DecoderConfig) -> DecoderConfig:
  """`cfg` with its defaults written out and the fields that do not change the model cleared."""
  windows = tuple(
    "sliding_attention" if cfg.window(i) else "full_attention" for i in range(cfg.num_layers)
  )
  rope = dict(rope_factor=1.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)
  return dataclasses.replace(
    cfg,
    remat=False,
    hidden_act=cfg.act,
    num_kv_heads=cfg.kv_heads,
    head_dim=cfg.dim_per_head,
    attention_bias=cfg.bias,
    output_bias=cfg.o_bias,
    layer_types=windows if cfg.sliding_window is not None else None,
    query_pre_attn_scalar=cfg.query_pre_attn_scalar
    or (cfg.dim_per_head if cfg.sandwich_norms else None),
    rope_local_theta=cfg.rope_local_theta if cfg.rope_local_theta != cfg.rope_theta else None,
    **(rope if cfg.rope_type == "default" else {}),
    rope_original_max_position=cfg.rope_original_max_position
    if cfg.rope_type == "llama3"
    else None,
  )


def export_decoder(cfg: DecoderConfig, params, out_dir: str, tokenizer=None) -> str:
  """Writes `model.safetensors` + `config.json` (+ the tokenizer) that transformers loads.

  Every family dpjax loads is written (`export_type` names the transformers
  class); `decoder_config(out_dir)` gives `cfg` back.

  Args:
    cfg: the decoder's config.
    params: the parameter tree (LoRA merged).
    out_dir: the directory to write (created; an existing model there is refused).
    tokenizer: a transformers tokenizer to save beside, or None.

  Returns:
    `out_dir`.
  """
  from safetensors.numpy import save_file

  if os.path.exists(os.path.join(out_dir, "model.safetensors")):
    raise FileExistsError(f"{out_dir} already holds a model.safetensors; choose a new directory")
  hf_cfg = to_hf_config(cfg)
  weights = to_hf_weights(cfg, params)
  os.makedirs(out_dir, exist_ok=True)
  tmp = os.path.join(out_dir, "model.safetensors.tmp")
  save_file(weights, tmp, metadata={"format": "pt"})
  hf_cfg.save_pretrained(out_dir)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  os.replace(tmp, os.path.join(out_dir, "model.safetensors"))  # the model last: complete or absent
  return out_dir
