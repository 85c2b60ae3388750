"""Hugging Face checkpoints from a LOCAL directory -> dpjax Flax params.

Reads `config.json` through transformers' config classes and weights from
`*.safetensors` (no torch needed, never the hub). PyTorch `Linear` weights
are `[out, in]`; Flax `Dense` kernels are `[in, out]`, hence the transposes.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.models.encoder import EncoderConfig

_T = lambda w: w.T
_I = lambda w: w


def _require_dir(path: str) -> None:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"model directory not found: {path}")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"no config.json in {path}")


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """All tensors of all `*.safetensors` files in `path`, as numpy arrays."""
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


def convert(weights: Dict[str, np.ndarray], rules: List[Tuple[str, Callable]],
            skip: Tuple[str, ...] = ()) -> dict:
  """Maps checkpoint names to a param tree with (regex, target-template, fn) rules."""
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
  return [(pattern + r"\.weight", target + "/kernel", _T), (pattern + r"\.bias", target + "/bias", _I)]


def _ln(pattern: str, target: str):
  return [(pattern + r"\.weight", target + "/scale", _I), (pattern + r"\.bias", target + "/bias", _I)]


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
    + _lin(r"pooler\.dense", "pooler") + _lin(r"classifier\.dense", "pooler")
    + _lin(r"classifier\.out_proj", "classifier") + _lin(r"classifier", "classifier")
)
_ENCODER_SKIP = (r"embeddings\.position_ids", r"lm_head\..*", r"cls\..*")


def encoder_config(path: str, *, num_labels: int = 2, pooling: str = "cls",
                   dtype: str = "float32") -> EncoderConfig:
  from transformers import AutoConfig
  _require_dir(path)
  hf = AutoConfig.from_pretrained(path, local_files_only=True)
  if hf.model_type not in ("bert", "roberta", "xlm-roberta"):
    raise ValueError(f"{path} holds a {hf.model_type!r} model, not a BERT/RoBERTa encoder")
  roberta = hf.model_type != "bert"
  return EncoderConfig(
      vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
      num_heads=hf.num_attention_heads, intermediate_size=hf.intermediate_size,
      max_position=hf.max_position_embeddings, type_vocab_size=hf.type_vocab_size,
      layer_norm_eps=hf.layer_norm_eps, hidden_act=hf.hidden_act,
      pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
      position_offset=(hf.pad_token_id + 1) if roberta else 0,
      num_labels=num_labels, pooling=pooling, dtype=dtype)


def load_encoder(path: str, *, num_labels: int = 2, pooling: str = "cls",
                 head_key: Optional[jax.Array] = None, dtype: str = "float32"):
  """`(EncoderConfig, params)` from a local HF BERT/RoBERTa directory.

  A checkpoint without a classification head (a bare encoder) gets a fresh
  head drawn from N(0, 0.02^2) with `head_key` (default key 0); with
  `pooling="mean"` the pretrained tanh pooler is not used and not loaded.
  """
  cfg = encoder_config(path, num_labels=num_labels, pooling=pooling, dtype=dtype)
  weights = read_safetensors(path)
  weights = {re.sub(r"^(bert|roberta)\.", "", k): v for k, v in weights.items()}
  params = convert(weights, _ENCODER_RULES, _ENCODER_SKIP)
  if pooling == "mean":
    params.pop("pooler", None)
  key = head_key if head_key is not None else jax.random.PRNGKey(0)
  k1, k2 = jax.random.split(key)
  if pooling == "cls" and "pooler" not in params:
    params["pooler"] = {"kernel": 0.02 * jax.random.normal(k1, (cfg.hidden_size, cfg.hidden_size)),
                        "bias": jnp.zeros(cfg.hidden_size)}
  if "classifier" not in params or params["classifier"]["kernel"].shape[1] != num_labels:
    params["classifier"] = {"kernel": 0.02 * jax.random.normal(k2, (cfg.hidden_size, num_labels)),
                            "bias": jnp.zeros(num_labels)}
  return cfg, params
