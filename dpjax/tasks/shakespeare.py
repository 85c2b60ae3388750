"""Byte-level language modelling of Shakespeare speeches, one user per character."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from dpjax import assets
from dpjax.data.shakespeare import load_shakespeare
from dpjax.data.text import load_rt_polarity
from dpjax.models.decoder import Decoder, DecoderConfig, causal_lm_loss, init_params
from dpjax.tasks.pretrained import (
  PRETRAINED_DEFAULTS,
  compute_dtype,
  pretrained_decoder,
  remat_blocks,
)
from dpjax.training.task import Task, task_section

BYTE_PAD, BYTE_BOS, BYTE_OFFSET = 0, 1, 2  # byte b is token b + 2
CONTROL_CODES = ("comedy", "history", "romance", "tragedy")  # Shakespeare genres


def encode_bytes(texts, seq_len: int) -> Dict[str, np.ndarray]:
  """UTF-8 bytes with a BOS token, truncated/right-padded to `seq_len`.

  Args:
    texts: the strings.
    seq_len: T.

  Returns:
    {"input_ids": [N, T], "attention_mask": [N, T]}.
  """
  ids = np.zeros((len(texts), seq_len), np.int32)
  mask = np.zeros((len(texts), seq_len), np.int32)
  for i, text in enumerate(texts):
    b = np.frombuffer(text.encode("utf-8"), np.uint8)[: seq_len - 1].astype(np.int32)
    ids[i, 0] = BYTE_BOS
    ids[i, 1 : 1 + len(b)] = b + BYTE_OFFSET
    mask[i, : 1 + len(b)] = 1
  return {"input_ids": ids, "attention_mask": mask}


def _held_out_user(user_id: str, fraction: float) -> bool:
  h = int(hashlib.sha1(user_id.encode()).hexdigest()[:8], 16)
  return h % 10_000 < fraction * 10_000


def pretrain_public(mcfg, texts, seq_len: int, steps: int, batch_size: int, seed: int):
  """Non-private pretraining on PUBLIC text (no privacy cost), cached by its inputs.

  Args:
    mcfg: the decoder's config.
    texts: the public training texts.
    seq_len: T.
    steps: the training steps.
    batch_size: the batch size.
    seed: the seed of the initialisation and batches.

  Returns:
    The pretrained parameters.
  """
  params = init_params(mcfg, jax.random.PRNGKey(seed), seq_len)
  if steps == 0:
    return params
  enc = encode_bytes(texts, seq_len)
  key = hashlib.sha1(
    repr((mcfg, seq_len, steps, batch_size, seed, enc["input_ids"].tobytes())).encode()
  ).hexdigest()[:16]
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
  np.savez(
    path + ".tmp.npz", **{f"a{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))}
  )
  os.replace(path + ".tmp.npz", path)
  return params


DEFAULTS = {**PRETRAINED_DEFAULTS, "control_code": False, "max_eval": None, "init_seed": 0}


def byte_decoder_config(model: Dict, seq_len: int):
  """The Llama-family byte-level decoder config (`model`: width, layers, heads, MLP).

  Args:
    model: the `task.model` section.
    seq_len: the longest sequence.

  Returns:
    The DecoderConfig (vocabulary: 256 bytes after the PAD and BOS tokens).
  """
  return DecoderConfig(
    family="llama",
    vocab_size=256 + BYTE_OFFSET,
    pad_token_id=BYTE_PAD,
    bos_token_id=BYTE_BOS,
    max_position=max(128, seq_len),
    tie_embeddings=True,
    **dict(model),
  )


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

  Args:
    cfg: a train config whose task section names "shakespeare_lm".

  Returns:
    The Task.
  """

  t = task_section(cfg.task, DEFAULTS)
  remat = remat_blocks(cfg)
  ds = load_shakespeare(None if t.data == "shakespeare" else t.data)
  rows = [r for split in ds for r in ds[split]]
  held = np.array([_held_out_user(r["user_id"], t.heldout_fraction) for r in rows])
  if isinstance(t.model, str):  # a pretrained decoder: asset name, .gguf file or HF dir
    mcfg, params, encode = pretrained_decoder(t.model)
  else:
    mcfg, encode = byte_decoder_config(t.model, t.seq_len), encode_bytes
  if t.control_code:  # DistilDP: "<genre>\t" before each speech
    texts = [f"{r['genre']}\t{r['line']}" for r in rows]
  else:
    texts = [r["line"] for r in rows]
  users = np.array([r["user_id"] for r in rows])
  enc = encode(texts, t.seq_len)
  enc["control"] = np.array(
    [
      CONTROL_CODES.index(r["genre"]) if r["genre"] in CONTROL_CODES else len(CONTROL_CODES)
      for r in rows
    ],
    np.int32,
  )
  train = {k: v[~held] for k, v in enc.items()}
  test_idx = np.flatnonzero(held)
  order = np.random.default_rng(0).permutation(len(test_idx))
  dev_idx, test_idx = test_idx[order[: len(order) // 2]], test_idx[order[len(order) // 2 :]]
  if t.max_eval:
    dev_idx, test_idx = dev_idx[: t.max_eval], test_idx[: t.max_eval]
  splits = {
    "dev": {k: v[dev_idx] for k, v in enc.items()},
    "test": {k: v[test_idx] for k, v in enc.items()},
  }
  if not isinstance(t.model, str):
    if t.pretrain_steps:
      rt = load_rt_polarity()
      public = [s for split in rt for s in rt[split]["sentence"]]
    else:
      public = []
    params = pretrain_public(mcfg, public, t.seq_len, t.pretrain_steps, 64, t.init_seed)
  model = Decoder(dataclasses.replace(mcfg, dtype=compute_dtype(t, mcfg.dtype), remat=remat))

  def loss_fn(p, ex, frozen):
    del frozen
    ids, mask = ex["input_ids"][None], ex["attention_mask"][None]
    logits, _ = model.apply({"params": p}, ids, mask)
    total, count = causal_lm_loss(logits, ids, mask, reduction="sum")
    return total[0] / jnp.maximum(count[0], 1.0), {"nll_sum": total[0], "tokens": count[0]}

  name = "shakespeare-bytes" if not isinstance(t.model, str) else "shakespeare-lm"
  return Task(
    name,
    params,
    {},
    loss_fn,
    train,
    splits,
    users[~held],
    info={"decoder": mcfg, "encode": encode, "control_codes": CONTROL_CODES},
  )
