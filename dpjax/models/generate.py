"""Batched text generation from a `Decoder`: greedy, temperature, top-k, top-p.

Everything runs under one `jax.jit` with fixed shapes: the prompt batch is
left-padded, the KV cache holds prompt + new tokens, and the new tokens come
from a `lax.scan`. `use_cache=False` recomputes the whole prefix every step
(quadratic; kept as the reference the cached path is tested against).
Sampling is a pure function of the key, so a run is reproducible.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from dpjax.models.decoder import Decoder, DecoderConfig, init_cache


def sample_logits(logits, key, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """One token per row from logits `[B, V]`.

  temperature 0 is greedy (argmax). top_k > 0 keeps the k largest logits;
  top_p < 1 keeps the smallest set of most likely tokens whose probability
  reaches top_p (nucleus sampling, arXiv 1904.09751); the most likely token is
  always kept.

  Args:
    logits: [B, V].
    key: the PRNG key.
    temperature: the softmax temperature (0: greedy).
    top_k: keep the k largest logits (0: all).
    top_p: the nucleus mass (1: all).

  Returns:
    int32 tokens [B].
  """
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0, got {top_k}")
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep_sorted = before < top_p
    keep = (
      jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    )
    logits = jnp.where(keep, logits, neg)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(
  jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p", "use_cache")
)
def generate(
  cfg: DecoderConfig,
  params,
  prompt_ids,
  prompt_mask,
  key,
  *,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  use_cache: bool = True,
  prefixes=None,
):
  """New tokens `[B, max_new_tokens]` after left-padded prompts `[B, P]`.

  After a row emits `cfg.eos_token_id`, its later tokens are `cfg.pad_token_id`.
  Returns (tokens, done) where done[b] says whether row b emitted EOS.

  Args:
    cfg: the decoder's config.
    params: its parameters.
    prompt_ids: left-padded prompts [B, P].
    prompt_mask: [B, P], 1 for a real token.
    key: the sampling key.
    max_new_tokens: the tokens generated per row.
    temperature: see `sample_logits`.
    top_k: see `sample_logits`.
    top_p: see `sample_logits`.
    use_cache: decode with a key/value cache (False recomputes the prefix each step).
    prefixes: {layer index: (key, value)} prefixes, or None.

  Returns:
    (tokens [B, max_new_tokens], done [B]).
  """
  model = Decoder(cfg)
  B, P = prompt_ids.shape
  N = max_new_tokens
  eos = -1 if cfg.eos_token_id is None else cfg.eos_token_id
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
  keys = jax.random.split(key, N)
  prompt_mask = prompt_mask.astype(jnp.int32)

  def finish(tok, done):
    tok = jnp.where(done, cfg.pad_token_id, tok)
    return tok, done | (tok == eos)

  if use_cache:
    cache = init_cache(cfg, B, P + N)
    logits, cache = model.apply(
      {"params": params}, prompt_ids, prompt_mask, cache=cache, prefixes=prefixes
    )
    first, done = finish(sample(logits[:, -1], keys[0]), jnp.zeros(B, bool))

    def step(carry, k):
      tok, cache, done = carry
      logits, cache = model.apply(
        {"params": params},
        tok[:, None],
        jnp.ones((B, 1), jnp.int32),
        cache=cache,
        prefixes=prefixes,
      )
      nxt, done = finish(sample(logits[:, -1], k), done)
      return (nxt, cache, done), tok

    (last, _, done), toks = jax.lax.scan(step, (first, cache, done), keys[1:])
    return jnp.concatenate([toks.T, last[:, None]], axis=1), done

  ids = jnp.concatenate([prompt_ids, jnp.full((B, N), cfg.pad_token_id, prompt_ids.dtype)], 1)
  mask = jnp.concatenate([prompt_mask, jnp.zeros((B, N), jnp.int32)], 1)

  def step_nc(carry, ik):
    i, k = ik
    ids, mask, done = carry
    logits, _ = model.apply({"params": params}, ids, mask, prefixes=prefixes)
    tok, done = finish(sample(logits[:, P - 1 + i], k), done)
    ids = ids.at[:, P + i].set(tok)
    mask = mask.at[:, P + i].set(1)
    return (ids, mask, done), tok

  (_, _, done), toks = jax.lax.scan(step_nc, (ids, mask, jnp.zeros(B, bool)), (jnp.arange(N), keys))
  return toks.T, done


def left_pad(sequences, pad_id: int, length: Optional[int] = None):
  """Lists of token ids -> (ids [B, P], mask [B, P]) left-padded numpy arrays.

  Args:
    sequences: lists of token ids.
    pad_id: the padding id.
    length: P (default: the longest sequence).

  Returns:
    (ids int32 [B, P], mask int32 [B, P]).
  """
  import numpy as np

  if not sequences or any(len(s) == 0 for s in sequences):
    raise ValueError("every prompt must have at least one token")
  P = length or max(len(s) for s in sequences)
  if max(len(s) for s in sequences) > P:
    raise ValueError(f"a prompt is longer than length={P}")
  ids = np.full((len(sequences), P), pad_id, np.int32)
  mask = np.zeros((len(sequences), P), np.int32)
  for i, s in enumerate(sequences):
    ids[i, P - len(s) :] = s
    mask[i, P - len(s) :] = 1
  return ids, mask
