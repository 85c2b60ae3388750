"""Pretrained models by asset name or local path (Hugging Face directory or GGUF file)."""

from __future__ import annotations

import glob
import os
from typing import Dict

import numpy as np

from dpjax import assets
from dpjax.models import hf


def resolve(name_or_path: str) -> str:
  """An asset name (fetched on demand) or a local directory.

  Args:
    name_or_path: an asset's name or a path.

  Returns:
    A local path.
  """
  if name_or_path in assets.ASSETS:
    return assets.fetch(name_or_path)
  if not os.path.exists(name_or_path):
    raise FileNotFoundError(
      f"{name_or_path!r} is neither a known asset ({sorted(assets.ASSETS)}) nor a local path"
    )
  return name_or_path


def pretrained_decoder(name_or_path: str):
  """(DecoderConfig, params, encode) of a pretrained decoder.

  `encode(texts, seq_len)` -> BOS + tokens, right-padded.

  Args:
    name_or_path: an asset name (e.g. "smollm2-135m"), a `.gguf` file, a
      directory holding one, or a Hugging Face directory.

  Returns:
    (config, params, encode).
  """
  path = resolve(name_or_path)
  ggufs = sorted(glob.glob(os.path.join(path, "*.gguf"))) if os.path.isdir(path) else []
  if path.endswith(".gguf") or ggufs:
    path = path if path.endswith(".gguf") else ggufs[0]
    mcfg, params = hf.load_gguf(path)
    tok = hf.gguf_tokenizer(path)
  else:
    from transformers import AutoTokenizer

    mcfg, params = hf.load_decoder(path)
    tok = AutoTokenizer.from_pretrained(path)

  def encode(texts, seq_len: int) -> Dict[str, np.ndarray]:
    ids = np.full((len(texts), seq_len), mcfg.pad_token_id, np.int32)
    mask = np.zeros((len(texts), seq_len), np.int32)
    bos = [] if mcfg.bos_token_id is None else [mcfg.bos_token_id]
    for i, text in enumerate(texts):
      row = (bos + tok(text, add_special_tokens=False)["input_ids"])[:seq_len]
      ids[i, : len(row)] = row
      mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}

  return mcfg, params, encode
