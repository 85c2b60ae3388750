"""Hugging Face checkpoints from a LOCAL directory -> dpjax Flax params.

Reads `config.json` through transformers' config classes and weights from
`*.safetensors` (no torch needed, never the hub). PyTorch `Linear` weights
are `[out, in]`; Flax `Dense` kernels are `[in, out]`, hence the transposes.
The way back (a trained decoder as a Hugging Face directory) is
`dpjax.models.hf_export`, from the same rules turned around.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.models.decoder import ROPE_TYPES, DecoderConfig, init_params
from dpjax.models.encoder import Encoder, EncoderConfig

# A Hugging Face model id, optionally pinned to a revision (a branch, tag or commit):
# "org/name" or "org/name@revision".
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")

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

LLAMA_RULES = (
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
SANDWICH_RULES = [
  (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layer_\1/post_attn_norm/scale", _I),
  (r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.weight", r"layer_\1/mlp_norm/scale", _I),
  (
    r"model\.layers\.(\d+)\.post_feedforward_layernorm\.weight",
    r"layer_\1/post_mlp_norm/scale",
    _I,
  ),
] + LLAMA_RULES
_LLAMA_SKIP = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\..*")

# GPT-2 uses Conv1D, whose weight is already [in, out]; c_attn packs q, k, v.
GPT2_RULES = (
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
    params = convert(weights, SANDWICH_RULES if cfg.sandwich_norms else LLAMA_RULES, skip)
  else:
    weights = {
      (k if k.startswith("transformer.") or k.startswith("lm_head") else "transformer." + k): v
      for k, v in weights.items()
    }
    params = convert(weights, GPT2_RULES, _GPT2_SKIP)
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
