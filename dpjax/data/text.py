"""Text data from local files: the RT sentences, tokenizers, padded token arrays.

Everything loads from a local path (an asset directory or a test fixture);
nothing is downloaded here.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Optional, Sequence

import numpy as np

from dpjax import assets
from dpjax.data.tables import hash_split

RT_FILE = "movieReviewSnippets_GroundTruth.txt"


def load_rt_polarity(path: Optional[str] = None):
  """Rotten-Tomatoes sentences as a `datasets.DatasetDict` (train/dev/test).

  `path` is a directory holding `movieReviewSnippets_GroundTruth.txt` (lines
  `id<TAB>rating<TAB>sentence`, rating in [-4, 4]) or the file itself; by
  default the fetched `rt-polarity` asset. Label = 1 if rating > 0, 0 if
  rating < 0; zero-rated sentences are dropped.

  Args:
    path: the directory or file, or None for the fetched asset.

  Returns:
    The DatasetDict (columns sentence, label).
  """
  import datasets

  if path is None:
    path = assets.fetch("rt-polarity")
  if os.path.isdir(path):
    path = os.path.join(path, RT_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"RT sentences not found at {path}")
  rows: Dict[str, Dict[str, list]] = {
    s: {"sentence": [], "label": [], "rating": []} for s in ("train", "dev", "test")
  }
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError as e:
        raise ValueError(
          f"{path}:{lineno}: not UTF-8 (byte {e.start}: "
          f"{raw[e.start : e.start + 1]!r}); re-encode the file as UTF-8"
        ) from None
      if not line.strip():
        continue
      parts = line.split("\t")
      if len(parts) < 3:
        raise ValueError(f"{path}:{lineno}: expected id<TAB>rating<TAB>sentence, got {line[:80]!r}")
      try:
        rating = float(parts[1])
      except ValueError:
        rating = math.nan
      if not (math.isfinite(rating) and -4 <= rating <= 4):
        raise ValueError(f"{path}:{lineno}: rating must be a number in [-4, 4], got {parts[1]!r}")
      if rating == 0:
        continue
      sentence = "\t".join(parts[2:]).strip()
      if not sentence:
        raise ValueError(f"{path}:{lineno}: empty sentence")
      split = rows[hash_split(sentence)]  # the table loader's split
      split["sentence"].append(sentence)
      split["label"].append(int(rating > 0))
      split["rating"].append(rating)
  return datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in rows.items()})


def load_tokenizer(path: str):
  """A Hugging Face tokenizer from a local directory (never the hub).

  Args:
    path: a directory with tokenizer files (tokenizer.json, vocab.txt, ...).

  Returns:
    The `transformers` tokenizer.
  """
  from transformers import AutoTokenizer

  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory not found: {path}")
  return AutoTokenizer.from_pretrained(path, local_files_only=True)


def encode(
  tokenizer, texts: Sequence[str], max_length: int, pairs: Optional[Sequence[str]] = None
) -> Dict[str, np.ndarray]:
  """Token ids and attention mask, padded/truncated to `max_length`: `[N, T]` each.

  Args:
    tokenizer: a `transformers` tokenizer.
    texts: the strings.
    max_length: T.
    pairs: second segments (sentence pairs), or None.

  Returns:
    {"input_ids": int32 [N, T], "attention_mask": int32 [N, T]}, and
    "token_type_ids" (0 first segment, 1 second) when `pairs` is given.
  """
  enc = tokenizer(
    list(texts),
    None if pairs is None else list(pairs),
    max_length=max_length,
    truncation=True,
    padding="max_length",
    return_tensors="np",
  )
  ids = enc["input_ids"].astype(np.int32)
  mask = enc["attention_mask"].astype(np.int32)
  if len(texts) and int(mask.sum(1).min()) == 0:
    raise ValueError("tokenizer produced an empty encoding for some text")
  out = {"input_ids": ids, "attention_mask": mask}
  if pairs is not None and "token_type_ids" in enc:
    out["token_type_ids"] = enc["token_type_ids"].astype(np.int32)
  return out
