"""Task builders: a config's `task` section -> a `dpjax.train.Task`.

A task bundles the initial parameters, the per-example loss and the data
splits. Builders are looked up by `cfg.task.name` in `TASKS`.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.train import Task

TASKS: Dict[str, Callable] = {}


def register(name: str):
  def deco(fn):
    TASKS[name] = fn
    return fn
  return deco


def build_task(cfg) -> Task:
  name = cfg.task.name
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
  return TASKS[name](cfg)


def _mlp_loss(params, ex, frozen):
  del frozen
  h = jnp.tanh(ex["x"] @ params["hidden"]["w"] + params["hidden"]["b"])
  logits = h @ params["head"]["w"] + params["head"]["b"]
  loss = -jax.nn.log_softmax(logits)[ex["label"]]
  return loss, {"accuracy": (jnp.argmax(logits) == ex["label"]).astype(jnp.float32)}


@register("synthetic")
def synthetic(cfg) -> Task:
  """A Gaussian-mixture classification problem with an MLP: for tests and smoke runs.

  Generated from `cfg.task.data_seed`; classes are separable at a margin the
  private run can find, so accuracy says whether training works.
  """
  t = cfg.task
  rng = np.random.default_rng(t.data_seed)
  centers = rng.normal(size=(t.num_classes, t.dim)) * 0.4

  def split(n):
    y = rng.integers(0, t.num_classes, n)
    x = centers[y] + rng.normal(size=(n, t.dim))
    return {"x": x.astype(np.float32), "label": y.astype(np.int32)}

  train = split(t.num_train)
  splits = {"dev": split(t.num_eval), "test": split(t.num_eval)}
  k1, k2 = jax.random.split(jax.random.PRNGKey(t.data_seed))
  params = {
      "hidden": {"w": jax.random.normal(k1, (t.dim, t.hidden)) / np.sqrt(t.dim),
                 "b": jnp.zeros(t.hidden)},
      "head": {"w": jax.random.normal(k2, (t.hidden, t.num_classes)) / np.sqrt(t.hidden),
               "b": jnp.zeros(t.num_classes)},
  }
  user_ids = None
  if t.get("num_users"):
    # Skewed user sizes (Zipf-like), as real user data is: a few users hold many examples.
    weights = 1.0 / np.arange(1, t.num_users + 1)
    user_ids = rng.choice(t.num_users, size=t.num_train, p=weights / weights.sum())
  return Task("synthetic", params, {}, _mlp_loss, train, splits, user_ids)


def _resolve(name_or_path: str) -> str:
  """An asset name (fetched on demand) or a local directory."""
  from dpjax import assets
  if name_or_path in assets.ASSETS:
    return assets.fetch(name_or_path)
  if not os.path.exists(name_or_path):
    raise FileNotFoundError(f"{name_or_path!r} is neither a known asset "
                            f"({sorted(assets.ASSETS)}) nor a local path")
  return name_or_path


def _frozen_features(model, params, enc, start: int, batch_size: int, desc: str):
  """Hidden states entering layer `start` (the frozen bottom, run once): `[N, T, D]`."""
  from tqdm.auto import tqdm

  from dpjax.models.encoder import Encoder

  @jax.jit
  def bottom(ids, mask):
    h = model.apply({"params": params}, ids, mask, method=Encoder.embed)
    return model.apply({"params": params}, h, mask, 0, start, method=Encoder.run_layers)

  n = len(enc["input_ids"])
  out = np.zeros(enc["input_ids"].shape + (model.cfg.hidden_size,), np.float32)
  for i in tqdm(range(0, n, batch_size), desc=desc, dynamic_ncols=True):
    ids, mask = enc["input_ids"][i:i + batch_size], enc["attention_mask"][i:i + batch_size]
    pad = batch_size - len(ids)  # fixed shapes: one compile
    h = bottom(np.pad(ids, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0))))
    out[i:i + len(ids)] = np.asarray(h)[:len(ids)]
  return out


@register("text_classification")
def text_classification(cfg) -> Task:
  """Fine-tune the top `train_layers` layers + head of a pretrained encoder.

  The frozen bottom (embeddings and the first L - train_layers layers) is
  run once over every split and cached under `$DPJAX_HOME/cache`; training
  then clips, noises and updates only the top layers and the head. With
  `train_layers == L` the whole network (embeddings included) is trained.
  Frozen features are computed from public weights, per example: the
  per-example privacy analysis is unchanged.
  """
  from dpjax import assets
  from dpjax.data.text import encode, load_rt_polarity, load_tokenizer
  from dpjax.models.encoder import Encoder
  from dpjax.models.hf import load_encoder

  t = cfg.task
  if t.data != "rt-polarity" and not os.path.exists(t.data):
    raise ValueError(f"task.data must be 'rt-polarity' or a local path, got {t.data!r}")
  data = load_rt_polarity(None if t.data == "rt-polarity" else t.data)
  model_dir = _resolve(t.model)
  mcfg, params = load_encoder(model_dir, num_labels=2, pooling=t.pooling,
                              pool_scale=t.get("pool_scale", 1.0),
                              head_key=jax.random.PRNGKey(cfg.seed))
  model = Encoder(mcfg)
  L = mcfg.num_layers
  if not (0 <= t.train_layers <= L):
    raise ValueError(f"task.train_layers must be in [0, {L}], got {t.train_layers}")
  start = L - t.train_layers
  full = t.get("train_embeddings", False)
  if full and start != 0:
    raise ValueError("train_embeddings=True needs train_layers == num_layers")
  tok = load_tokenizer(model_dir)

  arrays = {}
  for split in data:
    enc = encode(tok, data[split]["sentence"], t.max_length)
    ex = {"attention_mask": enc["attention_mask"],
          "label": np.asarray(data[split]["label"], np.int32)}
    if full:
      ex["input_ids"] = enc["input_ids"]
    else:
      key = hashlib.sha1(repr((os.path.abspath(model_dir), t.max_length, start, split,
                               enc["input_ids"].tobytes())).encode()).hexdigest()[:16]
      path = os.path.join(assets.home(), "cache", f"features-{key}.npy")
      if os.path.exists(path):
        ex["hidden"] = np.load(path)
      else:
        ex["hidden"] = _frozen_features(model, params, enc, start, 128,
                                        f"frozen layers 0..{start} on {split}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(path + ".tmp.npy", ex["hidden"])
        os.replace(path + ".tmp.npy", path)
    arrays[split] = ex

  trainable_names = [f"layer_{i}" for i in range(start, L)] + ["classifier"]
  if t.pooling == "cls":
    trainable_names.append("pooler")
  if full:
    trainable_names += ["word_embeddings", "position_embeddings", "token_type_embeddings",
                        "embeddings_ln"]
  trainable = {k: params[k] for k in trainable_names}

  def loss_fn(p, ex, frozen):
    del frozen
    mask = ex["attention_mask"][None]
    if full:
      h = model.apply({"params": p}, ex["input_ids"][None], mask, method=Encoder.embed)
    else:
      h = ex["hidden"][None]
    h = model.apply({"params": p}, h, mask, start, L, method=Encoder.run_layers)
    logits = model.apply({"params": p}, h, mask, method=Encoder.classify)[0]
    loss = -jax.nn.log_softmax(logits)[ex["label"]]
    return loss, {"accuracy": (jnp.argmax(logits) == ex["label"]).astype(jnp.float32)}

  return Task(f"{os.path.basename(model_dir.rstrip('/'))}-rt", trainable, {}, loss_fn,
              arrays["train"], {"dev": arrays["dev"], "test": arrays["test"]})
