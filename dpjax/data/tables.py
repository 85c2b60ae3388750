"""Labelled text from your own files through `datasets`: CSV, TSV, JSONL, parquet, a saved dataset.

`load_labelled_text` reads a table, checks every row (text present, label
in range) with one clear line for the first bad one, and splits it into
train / dev / test: by a split column, by the splits of a `save_to_disk`
`DatasetDict`, or 80 / 10 / 10 by a seeded hash of the text (stable across
runs and machines; the RT loader uses the same hash). A name that is not a
local path is tried as a Hugging Face hub dataset (only when the hub is
reachable).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
from typing import Dict, List, Optional, Sequence

import numpy as np

SPLITS = ("train", "dev", "test")
# Split names accepted in a split column or a saved DatasetDict.
SPLIT_NAMES = {"train": "train", "dev": "dev", "validation": "dev", "valid": "dev", "test": "test"}
FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def hash_split(text: str, seed: int = 0) -> str:
  """80 / 10 / 10 train / dev / test by a hash of `text` (salted by `seed` unless it is 0).

  Example:
    >>> hash_split("a fine film") in SPLITS
    True

  Args:
    text: the example's text.
    seed: 0 for the unsalted hash (the RT split), else another split.

  Returns:
    "train", "dev" or "test".
  """
  key = text if seed == 0 else f"{seed}\0{text}"
  bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 10
  return "test" if bucket == 0 else "dev" if bucket == 1 else "train"


@contextlib.contextmanager
def _quiet():
  """No `datasets` progress bars while a table is read (one line of our own on errors)."""
  import datasets

  was = datasets.is_progress_bar_enabled()
  datasets.disable_progress_bars()
  verbosity = datasets.logging.get_verbosity()
  datasets.logging.set_verbosity(logging.CRITICAL)  # its reader errors: said once, in our line
  try:
    yield
  finally:
    datasets.logging.set_verbosity(verbosity)
    if was:
      datasets.enable_progress_bars()


def read_table(source: str):
  """A `datasets.Dataset` (one table) or `DatasetDict` (saved splits) from `source`.

  Args:
    source: a .csv / .tsv / .json / .jsonl / .parquet file, a `save_to_disk`
      directory, or a hub dataset id (tried only when no such path exists).

  Returns:
    The Dataset or DatasetDict.
  """
  import datasets

  with _quiet():
    return _read(datasets, source)


def _read(datasets, source: str):
  if os.path.isdir(source):
    try:
      return datasets.load_from_disk(source)
    except FileNotFoundError:
      raise ValueError(
        f"task.data={source!r} is a directory but not a saved dataset (save_to_disk)"
      ) from None
  if os.path.isfile(source):
    ext = os.path.splitext(source)[1].lower()
    if ext not in FORMATS:
      raise ValueError(
        f"task.data={source!r}: unknown file type {ext!r}; allowed: {', '.join(sorted(FORMATS))}"
      )
    kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
    if os.path.getsize(source) == 0:
      raise ValueError(f"task.data={source!r} is empty (no header, no records)")
    try:
      table = datasets.load_dataset(FORMATS[ext], data_files=source, split="train", **kwargs)
    except Exception as e:  # the reader's own error (binary, undecodable, malformed): one line
      while e.__cause__ is not None or e.__context__ is not None:  # the reader's, not the wrapper's
        e = e.__cause__ or e.__context__
      first = (str(e).splitlines() or [""])[0][:160]
      if "corresponds to no data" in first:
        raise ValueError(f"task.data={source!r} holds no records") from None
      raise ValueError(
        f"task.data={source!r} cannot be read as {ext[1:]} ({type(e).__name__}: {first}); "
        f"check it is a text {ext[1:]} file in UTF-8"
      ) from None
    if len(table) == 0:
      raise ValueError(f"task.data={source!r} holds no records")
    return table
  looks_like_a_path = os.path.splitext(source)[1].lower() in FORMATS
  if os.path.isabs(source) or source.startswith(".") or looks_like_a_path:
    raise ValueError(f"task.data={source!r}: no such file or directory")  # a path, not a hub id
  try:
    return datasets.load_dataset(source)
  except Exception as e:  # offline, unknown id, gated: one line either way
    raise ValueError(
      f"task.data={source!r} is not a local file or directory, and as a hub dataset id it "
      f"could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    ) from None


def _integer(value) -> Optional[int]:
  """`value` as an int when it is one: 3, 3.0, or the text "3" (a CSV column that one
  non-integer record turned into text holds its integers as text); else None."""
  if isinstance(value, bool):
    return None
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, float) and math.isfinite(value) and value == int(value):
    return int(value)
  if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,18}\s*", value):
    return int(value)
  return None


def _label_index(value, row: int, where: str, num_labels: int, labels) -> int:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    raise ValueError(f"{where} record {row}: the label is missing")
  if labels is not None:
    if value not in labels and _integer(value) in labels:
      value = _integer(value)
    if value not in labels:
      shown = ", ".join(repr(v) for v in list(labels)[:10])
      raise ValueError(f"{where} record {row}: label {value!r} is not one of task.labels [{shown}]")
    return labels[value]
  index = _integer(value)
  if index is None or not 0 <= index < num_labels:
    raise ValueError(
      f"{where} record {row}: label {value!r} is not an integer in [0, {num_labels}) "
      f"(task.num_labels={num_labels}; give task.labels to name string labels)"
    )
  return index


def load_labelled_text(
  source: str,
  *,
  text_column: str = "text",
  label_column: str = "label",
  num_labels: Optional[int] = None,
  labels: Optional[Sequence] = None,
  text_pair_column: Optional[str] = None,
  split_column: Optional[str] = None,
  split_seed: int = 0,
):
  """Labelled text as a `datasets.DatasetDict` with splits train / dev / test.

  Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "my.csv")
    >>> rows = [f"{'good' if i % 2 else 'bad'} film {i},{i % 2}" for i in range(40)]
    >>> _ = open(path, "w").write("review,stars\\n" + "\\n".join(rows) + "\\n")
    >>> d = load_labelled_text(path, text_column="review", label_column="stars", num_labels=2)
    >>> sorted(d), sum(len(d[s]) for s in d), sorted(d["train"].unique("label"))
    (['dev', 'test', 'train'], 40, [0, 1])

  Args:
    source: as in `read_table`.
    text_column: the column holding the text.
    label_column: the column holding the label.
    num_labels: labels are integers in [0, num_labels); or give `labels`.
    labels: the label values in class order (e.g. ["neg", "pos"]); label i
      is the index of its value here.
    text_pair_column: a second text column (sentence pairs), or None.
    split_column: a column naming each row's split (train, dev or
      validation, test); None: the saved splits of a DatasetDict, else the
      seeded hash split of the text.
    split_seed: salt of the hash split (0: the unsalted RT hash).

  Returns:
    The DatasetDict: columns sentence, label (int), and sentence_pair when
    `text_pair_column` is given.
  """
  import datasets

  table = read_table(source)  # a missing or unreadable file is said first
  if labels is not None:
    labels = list(labels)
    if len(set(labels)) != len(labels) or not labels:
      raise ValueError(f"task.labels must be distinct values, got {labels!r}")
    if num_labels is not None and num_labels != len(labels):
      raise ValueError(f"task.num_labels={num_labels} but task.labels has {len(labels)} values")
    index = {v: i for i, v in enumerate(labels)}
  else:
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 2:
      raise ValueError(
        f"task.num_labels must be an integer >= 2 (or give task.labels), got {num_labels!r}"
      )
    index = None
  num = len(labels) if labels is not None else num_labels
  if isinstance(table, datasets.DatasetDict):
    if split_column is None:
      parts = {}
      for name, ds in table.items():
        if name not in SPLIT_NAMES:
          raise ValueError(
            f"task.data={source!r}: split {name!r} is none of {sorted(SPLIT_NAMES)} "
            "(or give task.split_column)"
          )
        parts[SPLIT_NAMES[name]] = ds
      missing = [s for s in SPLITS if s not in parts]
      if missing:
        raise ValueError(
          f"task.data={source!r} has splits {sorted(table)}: no {', '.join(missing)} "
          "(save all three, or one Dataset for the hash split)"
        )
    else:
      parts = {"": datasets.concatenate_datasets(list(table.values()))}
  else:
    parts = {"": table}
  named = {
    "text_column": text_column,
    "label_column": label_column,
    "text_pair_column": text_pair_column,
    "split_column": split_column,
  }
  named = {k: v for k, v in named.items() if v is not None}
  columns = list(named.values())
  rows: Dict[str, Dict[str, List]] = {
    s: {"sentence": [], "label": [], **({"sentence_pair": []} if text_pair_column else {})}
    for s in SPLITS
  }
  where = os.path.basename(source.rstrip("/")) or source
  for given, ds in parts.items():
    for key, name in zip(
      columns, ("text_column", "label_column", "text_pair_column", "split_column")
    ):
      if key not in ds.column_names:
        raise ValueError(
          f"task.{name}={key!r} is not a column of {where} (columns: {', '.join(ds.column_names)})"
        )
    cols = {c: ds[c] for c in columns}
    for i in range(len(ds)):
      row = i + 1
      text = cols[text_column][i]
      if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where} record {row}: {text_column!r} is empty or not text ({text!r})")
      if split_column:
        s = cols[split_column][i]
        if s not in SPLIT_NAMES:
          raise ValueError(
            f"{where} record {row}: {split_column!r} = {s!r}, allowed: {sorted(SPLIT_NAMES)}"
          )
        split = SPLIT_NAMES[s]
      else:
        split = given or hash_split(text, split_seed)
      out = rows[split]
      out["sentence"].append(text)
      out["label"].append(_label_index(cols[label_column][i], row, where, num, index))
      if text_pair_column:
        pair = cols[text_pair_column][i]
        if not isinstance(pair, str):
          raise ValueError(f"{where} record {row}: {text_pair_column!r} is not text ({pair!r})")
        out["sentence_pair"].append(pair)
  empty = [s for s in SPLITS if not rows[s]["sentence"]]
  if empty:
    raise ValueError(
      f"{where}: no examples in the {', '.join(empty)} split"
      + ("" if split_column else " of the 80/10/10 hash split (too few rows?)")
    )
  return datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in rows.items()})
