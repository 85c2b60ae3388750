"""Sentence (or sentence-pair) classification with a pretrained encoder: RT polarity or your table.

`task.data` is "rt-polarity" (the asset), an RT-format file or directory
(`id<TAB>rating<TAB>sentence`, binary labels from the rating's sign), or a
table of your own: a CSV / TSV / JSONL / parquet file or a `save_to_disk`
directory (`dpjax.data.tables.load_labelled_text`, with `task.text_column`,
`task.label_column`, `task.num_labels` or `task.labels`, and optionally
`task.text_pair_column` and `task.split_column`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dpjax import assets
from dpjax.data.tables import load_labelled_text
from dpjax.data.text import RT_FILE, encode, load_rt_polarity, load_tokenizer
from dpjax.models import adapters
from dpjax.models.adapters import prefix_layers
from dpjax.models.encoder import Encoder
from dpjax.models.hf import load_encoder
from dpjax.tasks.pretrained import PRETRAINED_DEFAULTS, compute_dtype, remat_blocks, resolve
from dpjax.training.plan import check_sizes
from dpjax.training.spec import Spec
from dpjax.training.task import Task, derived_dir, task_section


def _frozen_features(model, params, enc, start: int, batch_size: int, desc: str):
  """Hidden states entering layer `start` (the frozen bottom, run once): `[N, T, D]`."""

  @jax.jit
  def bottom(ids, mask, types):
    h = model.apply({"params": params}, ids, mask, types, method=Encoder.embed)
    return model.apply({"params": params}, h, mask, 0, start, method=Encoder.run_layers)

  n = len(enc["input_ids"])
  types = enc.get("token_type_ids", np.zeros_like(enc["input_ids"]))
  out = np.zeros(enc["input_ids"].shape + (model.cfg.hidden_size,), np.float32)
  for i in tqdm(range(0, n, batch_size), desc=desc, dynamic_ncols=True):
    ids, mask = enc["input_ids"][i : i + batch_size], enc["attention_mask"][i : i + batch_size]
    pad = batch_size - len(ids)  # fixed shapes: one compile
    h = bottom(*(np.pad(a, ((0, pad), (0, 0))) for a in (ids, mask, types[i : i + batch_size])))
    out[i : i + len(ids)] = np.asarray(h)[: len(ids)]
  return out


DEFAULTS = {  # the task section's optional keys
  **PRETRAINED_DEFAULTS,
  "labels": None,
  "text_column": "text",
  "label_column": "label",
  "num_labels": None,
  "text_pair_column": None,
  "split_column": None,
  "split_seed": 0,
  "pool_scale": 1.0,
  "train_embeddings": False,
  "prefix_tokens": 0,
  "prefix_layers": None,
  "prefix_init_scale": 0.02,
}


def _is_rt(data: str) -> bool:
  if data == "rt-polarity":
    return True
  if os.path.isdir(data):
    return os.path.isfile(os.path.join(data, RT_FILE))
  return os.path.basename(data) == RT_FILE or data.endswith(".txt")


def _data(t):
  """The task section's data as (DatasetDict with sentence[, sentence_pair], label; num_labels)."""
  if _is_rt(t.data):
    return load_rt_polarity(None if t.data == "rt-polarity" else t.data), 2
  labels = t.labels
  data = load_labelled_text(
    t.data,
    text_column=t.text_column,
    label_column=t.label_column,
    num_labels=t.num_labels,
    labels=None if labels is None else list(labels),
    text_pair_column=t.text_pair_column,
    split_column=t.split_column,
    split_seed=t.split_seed,
  )
  return data, len(labels) if labels is not None else t.num_labels


def text_classification(cfg) -> Task:
  """Fine-tune the top `train_layers` layers + head of a pretrained encoder.

  The frozen bottom (embeddings and the first L - train_layers layers) is
  run once over every split and cached (the public RT asset's under
  `$DPJAX_HOME/cache`, shared by runs; your own data's in the run directory,
  `derived_data_dir`, or in memory only); training
  then clips, noises and updates only the top layers and the head. With
  `train_layers == L` the whole network (embeddings included) is trained.
  Frozen features are computed from public weights, per example: the
  per-example privacy analysis is unchanged. With `prefix_tokens > 0` the
  top layers stay frozen and each gets a trainable key/value prefix
  (`prefix_layers`: which of them keep one; the others have none at all).

  Args:
    cfg: a train config whose task section names "text_classification".

  Returns:
    The Task.
  """

  t = task_section(cfg.task, DEFAULTS)
  remat = remat_blocks(cfg)
  data, num_labels = _data(t)
  if isinstance(cfg, Spec):  # the data's size against the batch, before any feature is computed
    check_sizes(cfg, len(data["train"]))
  model_dir = resolve(t.model)
  mcfg, params = load_encoder(
    model_dir,
    num_labels=num_labels,
    pooling=t.pooling,
    pool_scale=t.pool_scale,
    head_key=jax.random.PRNGKey(cfg.seed),
  )
  mcfg = dataclasses.replace(mcfg, dtype=compute_dtype(t), remat=remat)  # float32 weights
  model = Encoder(mcfg)
  L = mcfg.num_layers
  if not (0 <= t.train_layers <= L):
    raise ValueError(f"task.train_layers must be in [0, {L}], got {t.train_layers}")
  start = L - t.train_layers
  full = t.train_embeddings
  if full and start != 0:
    raise ValueError("train_embeddings=True needs train_layers == num_layers")
  tok = load_tokenizer(model_dir)

  arrays = {}
  # The shipped RT asset is public: its features are shared by every run ($DPJAX_HOME/cache).
  # Features of your own data stay with the run (`derived_data_dir`), or in memory only.
  cache = os.path.join(assets.home(), "cache") if t.data == "rt-polarity" else derived_dir()
  pairs = "sentence_pair" in data["train"].column_names
  for split in data:
    second = data[split]["sentence_pair"] if pairs else None
    enc = encode(tok, data[split]["sentence"], t.max_length, second)
    ex = {
      "attention_mask": enc["attention_mask"],
      "label": np.asarray(data[split]["label"], np.int32),
    }
    if full:
      ex["input_ids"] = enc["input_ids"]
      if "token_type_ids" in enc:
        ex["token_type_ids"] = enc["token_type_ids"]
    else:
      key = hashlib.sha1(
        repr(
          (
            os.path.abspath(model_dir),
            t.max_length,
            start,
            mcfg.dtype,
            split,
            enc["input_ids"].tobytes(),
            enc["token_type_ids"].tobytes() if "token_type_ids" in enc else None,
          )
        ).encode()
      ).hexdigest()[:16]
      path = os.path.join(cache, f"features-{key}.npy") if cache else None
      if path and os.path.exists(path):
        ex["hidden"] = np.load(path)
      else:
        ex["hidden"] = _frozen_features(
          model, params, enc, start, 128, f"frozen layers 0..{start} on {split}"
        )
        if path:  # owner-only: features of private data are private data
          os.makedirs(cache, mode=0o700, exist_ok=True)
          os.chmod(cache, 0o700)
          tmp = os.open(path + ".tmp.npy", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
          with os.fdopen(tmp, "wb") as f:
            np.save(f, ex["hidden"])
          os.replace(path + ".tmp.npy", path)
    arrays[split] = ex

  trainable_names = [f"layer_{i}" for i in range(start, L)] + ["classifier"]
  if t.pooling == "cls":
    trainable_names.append("pooler")
  if full:
    trainable_names += [
      "word_embeddings",
      "position_embeddings",
      "token_type_embeddings",
      "embeddings_ln",
    ]
  trainable = {k: params[k] for k in trainable_names}
  frozen = {}
  P = t.prefix_tokens or 0
  if P:
    # Prefix-tuning of the top layers: their weights are frozen, each keeps
    # (or, per `prefix_layers`, has removed) a trainable key/value prefix.
    if full:
      raise ValueError("prefix_tokens needs train_embeddings=False")
    on = list(t.prefix_layers or [True] * t.train_layers)
    if len(on) != t.train_layers:
      raise ValueError(f"prefix_layers has {len(on)} entries for train_layers={t.train_layers}")
    frozen = {k: trainable.pop(k) for k in list(trainable) if k.startswith("layer_")}
    trainable["prefix"] = adapters.init_prefix(
      jax.random.PRNGKey(cfg.seed + 1),
      num_layers=L,
      num_tokens=P,
      num_kv_heads=mcfg.num_heads,
      head_dim=mcfg.hidden_size // mcfg.num_heads,
      layers=[False] * start + on,
      scale=t.prefix_init_scale,
    )

  def loss_fn(p, ex, frozen):
    mask = ex["attention_mask"][None]
    prefixes = None
    if "prefix" in p:
      prefixes = prefix_layers(p["prefix"])
      p = {**frozen, **{k: v for k, v in p.items() if k != "prefix"}}
    if full:
      types = ex["token_type_ids"][None] if "token_type_ids" in ex else None
      h = model.apply({"params": p}, ex["input_ids"][None], mask, types, method=Encoder.embed)
    else:
      h = ex["hidden"][None]
    h = model.apply({"params": p}, h, mask, start, L, prefixes, method=Encoder.run_layers)
    logits = model.apply({"params": p}, h, mask, method=Encoder.classify)[0]
    loss = -jax.nn.log_softmax(logits)[ex["label"]]
    return loss, {"accuracy": (jnp.argmax(logits) == ex["label"]).astype(jnp.float32)}

  data_name = "rt" if t.data == "rt-polarity" else os.path.basename(str(t.data).rstrip("/"))
  return Task(
    f"{os.path.basename(model_dir.rstrip('/'))}-{data_name}",
    trainable,
    frozen,
    loss_fn,
    arrays["train"],
    {"dev": arrays["dev"], "test": arrays["test"]},
    info={"num_classes": num_labels},
  )
