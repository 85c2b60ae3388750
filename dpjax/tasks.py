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
  return Task("synthetic", params, {}, _mlp_loss, train, splits, user_ids,
              info={"num_classes": int(t.num_classes)})


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
  per-example privacy analysis is unchanged. With `prefix_tokens > 0` the
  top layers stay frozen and each gets a trainable key/value prefix
  (`prefix_layers`: which of them keep one; the others have none at all).
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
  frozen = {}
  P = t.get("prefix_tokens", 0) or 0
  if P:
    # Prefix-tuning of the top layers: their weights are frozen, each keeps
    # (or, per `prefix_layers`, has removed) a trainable key/value prefix.
    from dpjax.models import adapters
    if full:
      raise ValueError("prefix_tokens needs train_embeddings=False")
    on = list(t.get("prefix_layers") or [True] * t.train_layers)
    if len(on) != t.train_layers:
      raise ValueError(f"prefix_layers has {len(on)} entries for train_layers={t.train_layers}")
    frozen = {k: trainable.pop(k) for k in list(trainable) if k.startswith("layer_")}
    trainable["prefix"] = adapters.init_prefix(
        jax.random.PRNGKey(cfg.seed + 1), num_layers=L, num_tokens=P,
        num_kv_heads=mcfg.num_heads, head_dim=mcfg.hidden_size // mcfg.num_heads,
        layers=[False] * start + on, scale=t.get("prefix_init_scale", 0.02))

  def loss_fn(p, ex, frozen):
    mask = ex["attention_mask"][None]
    prefixes = None
    if "prefix" in p:
      from dpjax.models.adapters import prefix_layers
      prefixes = prefix_layers(p["prefix"])
      p = {**frozen, **{k: v for k, v in p.items() if k != "prefix"}}
    if full:
      h = model.apply({"params": p}, ex["input_ids"][None], mask, method=Encoder.embed)
    else:
      h = ex["hidden"][None]
    h = model.apply({"params": p}, h, mask, start, L, prefixes, method=Encoder.run_layers)
    logits = model.apply({"params": p}, h, mask, method=Encoder.classify)[0]
    loss = -jax.nn.log_softmax(logits)[ex["label"]]
    return loss, {"accuracy": (jnp.argmax(logits) == ex["label"]).astype(jnp.float32)}

  return Task(f"{os.path.basename(model_dir.rstrip('/'))}-rt", trainable, frozen, loss_fn,
              arrays["train"], {"dev": arrays["dev"], "test": arrays["test"]},
              info={"num_classes": 2})


BYTE_PAD, BYTE_BOS, BYTE_OFFSET = 0, 1, 2   # byte b is token b + 2
CONTROL_CODES = ("comedy", "history", "romance", "tragedy")   # Shakespeare genres


def encode_bytes(texts, seq_len: int) -> Dict[str, np.ndarray]:
  """UTF-8 bytes with a BOS token, truncated/right-padded to `seq_len`."""
  ids = np.zeros((len(texts), seq_len), np.int32)
  mask = np.zeros((len(texts), seq_len), np.int32)
  for i, text in enumerate(texts):
    b = np.frombuffer(text.encode("utf-8"), np.uint8)[:seq_len - 1].astype(np.int32)
    ids[i, 0] = BYTE_BOS
    ids[i, 1:1 + len(b)] = b + BYTE_OFFSET
    mask[i, :1 + len(b)] = 1
  return {"input_ids": ids, "attention_mask": mask}


def _held_out_user(user_id: str, fraction: float) -> bool:
  h = int(hashlib.sha1(user_id.encode()).hexdigest()[:8], 16)
  return h % 10_000 < fraction * 10_000


def _pretrain_public(mcfg, texts, seq_len: int, steps: int, batch_size: int, seed: int):
  """Non-private pretraining on PUBLIC text (no privacy cost), cached by its inputs."""
  import optax
  from tqdm.auto import tqdm
  from dpjax import assets
  from dpjax.models.decoder import Decoder, causal_lm_loss, init_params

  params = init_params(mcfg, jax.random.PRNGKey(seed), seq_len)
  if steps == 0:
    return params
  enc = encode_bytes(texts, seq_len)
  key = hashlib.sha1(repr((mcfg, seq_len, steps, batch_size, seed,
                           enc["input_ids"].tobytes())).encode()).hexdigest()[:16]
  path = os.path.join(assets.home(), "cache", f"pretrain-{key}.npz")
  leaves, treedef = jax.tree.flatten(params)
  if os.path.exists(path):
    with np.load(path) as z:
      return jax.tree.unflatten(treedef, [jnp.asarray(z[f"a{i}"]) for i in range(len(leaves))])
  model = Decoder(mcfg)
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 3e-3, steps // 20, steps, 3e-4))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, ids, mask):
    def loss(p):
      logits, _ = model.apply({"params": p}, ids, mask)
      tot, cnt = causal_lm_loss(logits, ids, mask, reduction="sum")
      return jnp.sum(tot) / jnp.maximum(jnp.sum(cnt), 1.0)
    l, g = jax.value_and_grad(loss)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, l

  rng = np.random.default_rng(seed)
  bar = tqdm(range(steps), desc="public pretraining", dynamic_ncols=True)
  for _ in bar:
    idx = rng.integers(0, len(texts), batch_size)
    params, opt, l = step(params, opt, enc["input_ids"][idx], enc["attention_mask"][idx])
    bar.set_postfix(loss=f"{float(l):.3f}")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path + ".tmp.npz", **{f"a{i}": np.asarray(x)
                                 for i, x in enumerate(jax.tree.leaves(params))})
  os.replace(path + ".tmp.npz", path)
  return params


def pretrained_decoder(name_or_path: str):
  """(DecoderConfig, params, encode) of a pretrained decoder: an asset name
  (e.g. "smollm2-135m"), a `.gguf` file, a directory holding one, or a Hugging
  Face directory. `encode(texts, seq_len)` -> BOS + tokens, right-padded."""
  import glob

  from dpjax.models import hf
  path = _resolve(name_or_path)
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
      ids[i, :len(row)] = row
      mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}

  return mcfg, params, encode


def byte_decoder_config(model: Dict, seq_len: int):
  """The Llama-family byte-level decoder config (`model`: width, layers, heads, MLP)."""
  from dpjax.models.decoder import DecoderConfig
  return DecoderConfig(family="llama", vocab_size=256 + BYTE_OFFSET, pad_token_id=BYTE_PAD,
                       bos_token_id=BYTE_BOS, max_position=max(128, seq_len),
                       tie_embeddings=True, **dict(model))


@register("shakespeare_lm")
def shakespeare_lm(cfg) -> Task:
  """Byte-level language modelling of Shakespeare speeches; each character is a user.

  Characters (users) are split: a `heldout_fraction` of them (by a hash of
  the user id) form the dev/test splits, so evaluation is on UNSEEN users;
  the rest are the private training data, with `user_ids`. Each example is
  one speech (its first `seq_len - 1` bytes). The model is a small
  Llama-family decoder (`task.model`), first pretrained non-privately on
  PUBLIC text (the Rotten Tomatoes sentences, another domain) for
  `task.pretrain_steps` steps, then fine-tuned under DP here. Metrics per
  example: `nll_sum` and `tokens`, so perplexity = exp(sum nll / sum tokens).
  """
  from dpjax.data.shakespeare import load_shakespeare
  from dpjax.data.text import load_rt_polarity
  from dpjax.models.decoder import Decoder, causal_lm_loss

  t = cfg.task
  ds = load_shakespeare(None if t.data == "shakespeare" else t.data)
  rows = [r for split in ds for r in ds[split]]
  held = np.array([_held_out_user(r["user_id"], t.heldout_fraction) for r in rows])
  if isinstance(t.model, str):     # a pretrained decoder: asset name, .gguf file or HF dir
    mcfg, params, encode = pretrained_decoder(t.model)
  else:
    mcfg, encode = byte_decoder_config(t.model, t.seq_len), encode_bytes
  if t.get("control_code"):   # DistilDP: "<genre>\t" before each speech
    texts = [f"{r['genre']}\t{r['line']}" for r in rows]
  else:
    texts = [r["line"] for r in rows]
  users = np.array([r["user_id"] for r in rows])
  enc = encode(texts, t.seq_len)
  enc["control"] = np.array([CONTROL_CODES.index(r["genre"]) if r["genre"] in CONTROL_CODES
                             else len(CONTROL_CODES) for r in rows], np.int32)
  train = {k: v[~held] for k, v in enc.items()}
  test_idx = np.flatnonzero(held)
  order = np.random.default_rng(0).permutation(len(test_idx))
  dev_idx, test_idx = test_idx[order[:len(order) // 2]], test_idx[order[len(order) // 2:]]
  if t.get("max_eval"):
    dev_idx, test_idx = dev_idx[:t.max_eval], test_idx[:t.max_eval]
  splits = {"dev": {k: v[dev_idx] for k, v in enc.items()},
            "test": {k: v[test_idx] for k, v in enc.items()}}
  if not isinstance(t.model, str):
    if t.pretrain_steps:
      rt = load_rt_polarity()
      public = [s for split in rt for s in rt[split]["sentence"]]
    else:
      public = []
    params = _pretrain_public(mcfg, public, t.seq_len, t.pretrain_steps, 64,
                              t.get("init_seed", 0))
  model = Decoder(mcfg)

  def loss_fn(p, ex, frozen):
    del frozen
    ids, mask = ex["input_ids"][None], ex["attention_mask"][None]
    logits, _ = model.apply({"params": p}, ids, mask)
    total, count = causal_lm_loss(logits, ids, mask, reduction="sum")
    return total[0] / jnp.maximum(count[0], 1.0), {"nll_sum": total[0], "tokens": count[0]}

  name = "shakespeare-bytes" if not isinstance(t.model, str) else "shakespeare-lm"
  return Task(name, params, {}, loss_fn, train, splits, users[~held],
              info={"decoder": mcfg, "encode": encode})


@register("user_mean")
def user_mean(cfg) -> Task:
  """Private mean estimation over users (the toy of arXiv 2407.07737), in seconds on CPU.

  `num_users` users each hold `examples_per_user` vectors in R^dim around
  their own mean mu_u = mu + user_spread * z_u; with `diverse` their examples
  scatter around mu_u (unit spread), otherwise all of a user's examples are
  identical. Loss 0.5 ||theta - x||^2; the "test" split holds mu itself, so
  its `loss` is 0.5 ||theta - mu||^2, the estimation error.
  """
  t = cfg.task
  rng = np.random.default_rng(t.data_seed)
  mu = rng.normal(size=t.dim)
  mu *= t.mean_norm / np.linalg.norm(mu)
  user_means = mu + t.user_spread * rng.normal(size=(t.num_users, t.dim)) / np.sqrt(t.dim)
  x = np.repeat(user_means, t.examples_per_user, axis=0)
  if t.diverse:
    x = x + rng.normal(size=x.shape) / np.sqrt(t.dim)
  user_ids = np.repeat(np.arange(t.num_users), t.examples_per_user)

  def loss_fn(p, ex, frozen):
    del frozen
    loss = 0.5 * jnp.sum((p["theta"] - ex["x"]) ** 2)
    return loss, {}

  return Task("user-mean", {"theta": jnp.zeros(t.dim)}, {}, loss_fn,
              {"x": x.astype(np.float32)}, {"test": {"x": mu[None].astype(np.float32)}},
              user_ids)
