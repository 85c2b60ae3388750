"""Pretrained models by asset name or local path (Hugging Face directory or GGUF file)."""

from __future__ import annotations

import glob
import os
from typing import Any, Callable, Dict, NamedTuple

import numpy as np

from dpjax import assets
from dpjax.models import hf, llama_cpp
from dpjax.models.hf import HUB_ID
from dpjax.training.task import task_section

COMPUTE_DTYPES = ("float32", "bfloat16")


# The optional task keys of every task on a pretrained model.
PRETRAINED_DEFAULTS = {"dtype": None, "remat": False}


def compute_dtype(t, default: str = "float32") -> str:
  """`task.dtype`: the model's compute dtype; weights, clipping norms and noise stay float32.

  Args:
    t: the task section (`PRETRAINED_DEFAULTS` filled: dtype None without the key).
    default: the dtype without the key.

  Returns:
    "float32" or "bfloat16".
  """
  dtype = t.dtype or default
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(
      f"task.dtype must be 'float32' or 'bfloat16' (the compute dtype; weights, "
      f"clipping norms and noise stay float32), got {dtype!r}"
    )
  return dtype


def remat_blocks(cfg) -> bool:
  """`task.remat`: each block's activations recomputed in the backward pass instead of kept.

  Less activation memory for about one more forward pass of compute; the
  parameters, the gradients and the guarantee are the same. Refused with
  ghost clipping, which must see each layer's inputs in the forward pass.

  Args:
    cfg: the validated train spec.

  Returns:
    Whether the model's blocks are rematerialised.
  """
  remat = task_section(cfg.task, PRETRAINED_DEFAULTS).remat
  if not isinstance(remat, bool):
    raise ValueError(f"task.remat must be True or False, got {remat!r}")
  if remat and cfg.clipping_method == "ghost":
    raise ValueError(
      "task.remat=True hides each block's layers from ghost clipping (they would fall back "
      "to per-example gradients); use clipping_method='vmap' with it, or task.remat=False"
    )
  return remat


# What a snapshot downloads: the config, safetensors weights and the tokenizer's files (never
# code: nothing is run from the hub; never pickled .bin weights, nor every GGUF quantisation).
HUB_FILES = ("*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.tiktoken")


def resolve(name_or_path: str) -> str:
  """An asset name (fetched on demand), a local path, or a Hugging Face model id.

  In that order: a name of `dpjax.assets`, then an existing path, then
  "org/name" or "org/name@revision" downloaded with
  `huggingface_hub.snapshot_download` (its cache, its token, `HF_HUB_OFFLINE`
  respected: offline, only a cached snapshot is used).

  Args:
    name_or_path: an asset's name, a path, or a hub model id.

  Returns:
    A local path (raises FileNotFoundError, one line, for none of those).
  """
  if name_or_path in assets.ASSETS:
    return assets.fetch(name_or_path)
  if os.path.exists(name_or_path):
    return name_or_path
  if HUB_ID.match(name_or_path):
    return hub_snapshot(name_or_path)
  raise FileNotFoundError(
    f"{name_or_path!r} is neither a known asset ({sorted(assets.ASSETS)}), a local path, "
    "nor a Hugging Face model id (org/name or org/name@revision)"
  )


def hub_snapshot(model_id: str) -> str:
  """The local directory of a Hugging Face model id's snapshot (downloaded if not cached).

  Args:
    model_id: "org/name" or "org/name@revision".

  Returns:
    The snapshot's directory (raises FileNotFoundError, one line, when the hub
    cannot give it: offline without a cached copy, an unknown or gated repo, no network).
  """
  repo, _, revision = model_id.partition("@")
  from huggingface_hub import snapshot_download

  try:
    return snapshot_download(repo, revision=revision or None, allow_patterns=list(HUB_FILES))
  except Exception as e:  # the hub's errors: offline, not found, gated, HTTP, network
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise FileNotFoundError(
      f"{model_id!r} is not a local path, and the Hugging Face hub gave no snapshot of it "
      f"({type(e).__name__}: {why})"
      + ("; HF_HUB_OFFLINE is set: only a cached snapshot can be used" if offline else "")
    ) from None


class Pretrained(NamedTuple):
  """A pretrained decoder with its tokenizer's encode and decode."""

  config: Any  # DecoderConfig
  params: Any
  encode: Callable  # (texts, seq_len, completions=None) -> arrays
  decode: Callable  # token ids -> text (special tokens dropped)
  path: str  # the checkpoint loaded (HF directory or .gguf file)
  tokenizer: Any  # the transformers tokenizer


def load_pretrained(name_or_path: str) -> Pretrained:
  """A pretrained decoder and its tokenizer.

  `encode(texts, seq_len)` -> BOS + tokens, right-padded, as "input_ids" and
  "attention_mask"; with `completions`, each row is BOS + text + completion
  + EOS and "loss_mask" marks the completion and EOS tokens (the targets a
  prompt/completion loss counts).

  Args:
    name_or_path: an asset name (e.g. "smollm2-135m"), a `.gguf` file, a
      directory holding one, or a Hugging Face directory.

  Returns:
    The `Pretrained`.
  """
  path = resolve(name_or_path)
  ggufs = sorted(glob.glob(os.path.join(path, "*.gguf"))) if os.path.isdir(path) else []
  if path.endswith(".gguf") or ggufs:
    path = path if path.endswith(".gguf") else ggufs[0]
    mcfg, params = llama_cpp.load_gguf(path)
    tok = llama_cpp.gguf_tokenizer(path)
  else:
    from transformers import AutoTokenizer

    mcfg, params = hf.load_decoder(path)
    tok = AutoTokenizer.from_pretrained(path)

  def encode(texts, seq_len: int, completions=None) -> Dict[str, np.ndarray]:
    ids = np.full((len(texts), seq_len), mcfg.pad_token_id, np.int32)
    mask = np.zeros((len(texts), seq_len), np.int32)
    loss = np.zeros((len(texts), seq_len), np.int32)
    bos = [] if mcfg.bos_token_id is None else [mcfg.bos_token_id]
    eos = [] if mcfg.eos_token_id is None else [mcfg.eos_token_id]
    for i, text in enumerate(texts):
      head = bos + tok(text, add_special_tokens=False)["input_ids"]
      tail = []
      if completions is not None:
        tail = tok(completions[i], add_special_tokens=False)["input_ids"] + eos
      row = (head + tail)[:seq_len]
      ids[i, : len(row)] = row
      mask[i, : len(row)] = 1
      loss[i, len(head) if completions is not None else 0 : len(row)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if completions is not None:
      out["loss_mask"] = loss
    return out

  def decode(token_ids) -> str:
    return tok.decode([int(t) for t in token_ids], skip_special_tokens=True)

  return Pretrained(mcfg, params, encode, decode, path, tok)


def pretrained_decoder(name_or_path: str):
  """(DecoderConfig, params, encode) of a pretrained decoder (`load_pretrained`).

  Args:
    name_or_path: an asset name, a `.gguf` file, a directory holding one, or
      a Hugging Face directory.

  Returns:
    (config, params, encode).
  """
  p = load_pretrained(name_or_path)
  return p.config, p.params, p.encode
