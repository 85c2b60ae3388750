"""BERT/RoBERTa-family encoders (arXiv 1810.04805, 1907.11692) as Flax linen modules.

One module covers both families; their differences are config: RoBERTa
offsets position ids past the padding id and has a single token type.
Post-LayerNorm blocks, GELU feed-forward, absolute learned positions.

There is no dropout: per-example private training needs a key per example
for it, and fine-tuning results here do not depend on it. The module exposes
`embed`, `run_layers` and `classify` so a caller can run the frozen bottom
of the network once and train only the top.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.models.activations import activation


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  pad_token_id: int = 0
  position_offset: int = 0  # RoBERTa: pad_token_id + 1; BERT: 0
  num_labels: int = 2
  pooling: str = "cls"  # "cls" (first token, then tanh pooler), "mean" or "mean_l2"
  pool_scale: float = 1.0  # "mean_l2": the unit-norm embedding is scaled by this
  dtype: str = "float32"
  remat: bool = False  # recompute each layer's activations in the backward pass

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
      )
    if self.pooling not in ("cls", "mean", "mean_l2"):
      raise ValueError(f"pooling must be 'cls', 'mean' or 'mean_l2', got {self.pooling!r}")
    if not self.pool_scale > 0:
      raise ValueError(f"pool_scale must be > 0, got {self.pool_scale}")


class SelfAttention(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, h, bias, prefix=None):  # h: [B, T, D]; bias: [B, 1, 1, T]
    c = self.cfg
    hd = c.hidden_size // c.num_heads
    dense = lambda name: nn.Dense(c.hidden_size, name=name, dtype=c.dtype)
    split = lambda x: x.reshape(x.shape[:2] + (c.num_heads, hd))
    q, k, v = (split(dense(n)(h)) for n in ("query", "key", "value"))
    if prefix is not None:  # (key, value), each [P, H, hd]: seen by every query
      B, P = h.shape[0], prefix[0].shape[0]
      k = jnp.concatenate(
        [jnp.broadcast_to(prefix[0].astype(k.dtype), (B,) + prefix[0].shape), k], 1
      )
      v = jnp.concatenate(
        [jnp.broadcast_to(prefix[1].astype(v.dtype), (B,) + prefix[1].shape), v], 1
      )
      bias = jnp.concatenate([jnp.zeros(bias.shape[:3] + (P,), bias.dtype), bias], -1)
    # XLA's attention on the CPU, cuDNN's fused kernel where the GPU has one
    out = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), scale=hd**-0.5)
    return dense("output")(out.reshape(h.shape))


class Layer(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, h, bias, prefix=None):
    c = self.cfg
    ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, name=name, dtype=c.dtype)
    h = ln("attention_ln")(h + SelfAttention(c, name="attention")(h, bias, prefix))
    ff = activation(c.hidden_act)(
      nn.Dense(c.intermediate_size, name="intermediate", dtype=c.dtype)(h)
    )
    return ln("output_ln")(h + nn.Dense(c.hidden_size, name="output", dtype=c.dtype)(ff))


class Encoder(nn.Module):
  """Token ids -> hidden states, plus a sequence-classification head."""

  cfg: EncoderConfig

  def setup(self):
    c = self.cfg
    self.word = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")
    self.position = nn.Embed(c.max_position, c.hidden_size, name="position_embeddings")
    self.token_type = nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")
    self.embed_ln = nn.LayerNorm(epsilon=c.layer_norm_eps, name="embeddings_ln")
    layer = nn.remat(Layer) if c.remat else Layer  # the same parameters either way
    self.layers = [layer(c, name=f"layer_{i}") for i in range(c.num_layers)]
    self.pooler = nn.Dense(c.hidden_size, name="pooler")
    self.classifier = nn.Dense(c.num_labels, name="classifier")

  def embed(self, input_ids, attention_mask, token_type_ids=None):
    """Word + position + token-type embeddings, layer-normed: `[B, T, D]`.

    Args:
      input_ids: [B, T].
      attention_mask: [B, T] (RoBERTa numbers positions from it).
      token_type_ids: [B, T], or None for all zeros.

    Returns:
      The embeddings, in the model's dtype.
    """
    c = self.cfg
    if c.position_offset:
      # RoBERTa numbers real tokens from pad_id + 1 and gives padding pad_id.
      pos = jnp.cumsum(attention_mask, axis=1) * attention_mask + c.pad_token_id
    else:
      pos = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    h = self.word(input_ids) + self.position(pos) + self.token_type(token_type_ids)
    return self.embed_ln(h).astype(c.dtype)

  def run_layers(
    self,
    h,
    attention_mask,
    start: int = 0,
    end: Optional[int] = None,
    prefixes: Optional[Dict[int, Tuple[jax.Array, jax.Array]]] = None,
  ):
    """Layers start..end-1; `prefixes` maps a layer index to its (key, value) prefix.

    Args:
      h: hidden states [B, T, D].
      attention_mask: [B, T].
      start: the first layer run.
      end: one past the last layer run (None: all).
      prefixes: {layer index: (key, value)}, or None.

    Returns:
      The hidden states after layer end - 1.
    """
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min).astype(
      jnp.float32
    )
    prefixes = prefixes or {}
    for i, layer in enumerate(self.layers[start:end], start):
      h = layer(h, bias, prefixes.get(i))
    return h

  def pool(self, h, attention_mask):
    """The sentence vector `[B, D]`: the tanh pooler on [CLS], the mean, or the scaled unit mean.

    Args:
      h: the last hidden states [B, T, D].
      attention_mask: [B, T].

    Returns:
      The pooled vectors.
    """
    if self.cfg.pooling in ("mean", "mean_l2"):
      m = attention_mask[..., None].astype(h.dtype)
      pooled = jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
      if self.cfg.pooling == "mean":
        return pooled
      # The sentence-transformers embedding (mean, then unit norm); with a
      # scaled linear head on top this is a cosine classifier.
      pooled = pooled.astype(jnp.float32)
      norm = jnp.sqrt(jnp.sum(pooled * pooled, axis=-1, keepdims=True) + 1e-12)
      return self.cfg.pool_scale * pooled / norm
    return jnp.tanh(self.pooler(h[:, 0]))

  def classify(self, h, attention_mask):
    """Class logits `[B, num_labels]` (float32) from the last hidden states.

    Args:
      h: the last hidden states [B, T, D].
      attention_mask: [B, T].

    Returns:
      The logits.
    """
    return self.classifier(self.pool(h, attention_mask).astype(jnp.float32))

  def __call__(self, input_ids, attention_mask, token_type_ids=None, prefixes=None):
    """Classification logits `[B, num_labels]`."""
    h = self.hidden_states(input_ids, attention_mask, token_type_ids, prefixes)
    return self.classify(h, attention_mask)

  def hidden_states(self, input_ids, attention_mask, token_type_ids=None, prefixes=None):
    """Last hidden states `[B, T, D]` (what `transformers`' BertModel returns).

    Args:
      input_ids: [B, T].
      attention_mask: [B, T].
      token_type_ids: [B, T], or None.
      prefixes: {layer index: (key, value)}, or None.

    Returns:
      The hidden states.
    """
    return self.run_layers(
      self.embed(input_ids, attention_mask, token_type_ids), attention_mask, prefixes=prefixes
    )


def init_params(cfg: EncoderConfig, key: jax.Array, seq_len: int = 8):
  """Fresh parameters of an `Encoder(cfg)`.

  Args:
    cfg: the encoder's config.
    key: the PRNG key.
    seq_len: the length of the dummy input traced.

  Returns:
    The parameter tree.
  """
  ids = jnp.zeros((1, seq_len), jnp.int32)
  variables = Encoder(cfg).init(key, ids, jnp.ones_like(ids))
  return variables["params"]
