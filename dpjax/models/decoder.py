"""Causal decoders: the Llama family (arXiv 2302.13971) and GPT-2 (Radford et al. 2019).

One linen module covers both; the family differences are config:

- Llama: RMSNorm, rotary positions (RoPE, arXiv 2104.09864, the "rotate half"
  layout of Hugging Face checkpoints), SwiGLU feed-forward, grouped-query
  attention (arXiv 2305.13245), no biases, optionally untied LM head.
- GPT-2: LayerNorm, learned absolute positions, GELU (tanh) feed-forward,
  biases everywhere, LM head tied to the token embedding.
- Within the Llama family, as config: Mistral's and Phi-3's sliding window,
  Qwen2's q/k/v biases, Qwen3's per-head q/k norms, linear and Llama-3.1
  RoPE scaling, and Gemma 1/2/3 (RMSNorm x (1 + w), sqrt(D)-scaled
  embeddings, norms after attention and around the MLP, soft-capped scores
  and logits, per-layer sliding windows with their own RoPE base). What a
  checkpoint asks for and this module does not implement is refused at load
  time (`dpjax.models.hf`), never ignored.

Pre-norm blocks. The KV cache is explicit and functional (a `Cache` pytree in,
a `Cache` out) so generation runs under `jax.jit` and `lax.scan` with fixed
shapes. Prefix-tuning (arXiv 2101.00190) enters as per-layer key/value
prefixes; a layer without a prefix has none, so nothing of it receives
attention mass.

Positions count real tokens only: with left padding, the first real token of
every row has position 0 whatever its slot, so batched and single-row runs
give the same logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpjax.models.activations import activation

_NEG = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  family: str  # "llama" or "gpt2"
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  num_kv_heads: Optional[int] = None  # None: = num_heads (no GQA)
  head_dim: Optional[int] = None  # None: hidden_size // num_heads
  max_position: int = 2048
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_type: str = "default"  # "default", "linear" (positions / factor) or "llama3"
  rope_factor: float = 1.0  # linear, llama3: the context extension factor
  rope_low_freq_factor: float = 1.0  # llama3
  rope_high_freq_factor: float = 4.0  # llama3
  rope_original_max_position: Optional[int] = None  # llama3: the pre-extension context
  sliding_window: Optional[int] = None  # Mistral: a token sees the last W slots (itself included)
  qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm of each head's query and key before RoPE
  norm_offset: float = 0.0  # Gemma: RMSNorm multiplies by (offset + scale)
  embed_scale: bool = False  # Gemma: token embeddings times sqrt(hidden_size)
  sandwich_norms: bool = False  # Gemma 2/3: norms after attention and before/after the MLP
  attn_softcap: Optional[float] = None  # Gemma 2: scores -> cap tanh(scores / cap)
  final_softcap: Optional[float] = None  # Gemma 2: logits -> cap tanh(logits / cap)
  query_pre_attn_scalar: Optional[float] = None  # Gemma 2/3: scores scaled by its ^-1/2
  layer_types: Optional[Tuple[str, ...]] = None  # per layer "full_attention"/"sliding_attention"
  rope_local_theta: Optional[float] = None  # Gemma 3: the RoPE base of sliding layers
  hidden_act: Optional[str] = None  # None: family default (silu / gelu_new)
  tie_embeddings: bool = False
  attention_bias: Optional[bool] = None  # q/k/v (and o) biases; None: family default
  output_bias: Optional[bool] = None  # the o projection's; None: as attention_bias (Qwen2: False)
  pad_token_id: int = 0
  bos_token_id: Optional[int] = None
  eos_token_id: Optional[int] = None
  dtype: str = "float32"
  remat: bool = False  # recompute each block's activations in the backward pass

  def __post_init__(self):
    if self.family not in ("llama", "gpt2"):
      raise ValueError(f"family must be 'llama' or 'gpt2', got {self.family!r}")
    if self.num_heads % self.kv_heads:
      raise ValueError(
        f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.kv_heads}"
      )
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
    if self.rope_type == "llama3" and not self.rope_original_max_position:
      raise ValueError("rope_type 'llama3' needs rope_original_max_position")
    if self.layer_types is not None and (
      len(self.layer_types) != self.num_layers
      or set(self.layer_types) - {"full_attention", "sliding_attention"}
    ):
      raise ValueError(
        f"layer_types must give full_attention or sliding_attention for each of the "
        f"{self.num_layers} layers, got {self.layer_types}"
      )
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
      )

  def window(self, layer: int) -> Optional[int]:
    """The sliding window of `layer`.

    Args:
      layer: the layer's index.

    Returns:
      Its window in slots, or None (it attends to every earlier slot).
    """
    if self.layer_types is not None and self.layer_types[layer] == "full_attention":
      return None
    return self.sliding_window

  def layer_rope(self, layer: int) -> DecoderConfig:
    """The config whose RoPE `layer` uses (Gemma 3's sliding layers: their own base, unscaled).

    Args:
      layer: the layer's index.

    Returns:
      This config, or a copy with the sliding layers' RoPE fields.
    """
    if self.rope_local_theta is None or self.window(layer) is None:
      return self
    return dataclasses.replace(self, rope_theta=self.rope_local_theta, rope_type="default")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def act(self) -> str:
    return self.hidden_act or ("silu" if self.family == "llama" else "gelu_new")

  @property
  def bias(self) -> bool:
    if self.attention_bias is not None:
      return self.attention_bias
    return self.family == "gpt2"

  @property
  def o_bias(self) -> bool:
    return self.bias if self.output_bias is None else self.output_bias


class Cache(NamedTuple):
  """Keys/values of every layer at fixed size S, and which slots hold tokens."""

  k: jax.Array  # [L, B, S, KVH, hd]
  v: jax.Array  # [L, B, S, KVH, hd]
  mask: jax.Array  # [B, S] int32, 1 where a slot holds a real token
  index: jax.Array  # [] int32, the next slot to write


def init_cache(cfg: DecoderConfig, batch_size: int, size: int) -> Cache:
  """An empty key/value cache for decoding.

  Args:
    cfg: the decoder's config.
    batch_size: B.
    size: the most positions the cache holds (prompt + new tokens).

  Returns:
    A `Cache` of zeros, `[layers, B, size, kv_heads, head_dim]` for keys and values.
  """
  shape = (cfg.num_layers, batch_size, size, cfg.kv_heads, cfg.dim_per_head)
  return Cache(
    jnp.zeros(shape, cfg.dtype),
    jnp.zeros(shape, cfg.dtype),
    jnp.zeros((batch_size, size), jnp.int32),
    jnp.zeros((), jnp.int32),
  )


class RMSNorm(nn.Module):
  eps: float
  dtype: Any = jnp.float32
  offset: float = 0.0  # Gemma: x * (1 + scale), its scale initialised at 0

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param("scale", init, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * (self.offset + scale.astype(jnp.float32))).astype(self.dtype)


def _norm(cfg: DecoderConfig, name: str):
  if cfg.family == "llama":
    return RMSNorm(cfg.norm_eps, cfg.dtype, cfg.norm_offset, name=name)
  return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, name=name)


ROPE_TYPES = ("default", "linear", "llama3")


def rope_frequencies(cfg: DecoderConfig) -> np.ndarray:
  """The inverse frequencies of the config's RoPE, scaling applied: `[head_dim / 2]`.

  "linear" divides every frequency by the factor (positions / factor);
  "llama3" (Llama 3.1) divides the low frequencies (wavelength above
  original / low_freq_factor) by the factor, keeps the high ones (below
  original / high_freq_factor) and interpolates smoothly between, as
  transformers' `_compute_llama3_parameters` does.

  Args:
    cfg: the decoder's config.

  Returns:
    The inverse frequencies, float64.
  """
  hd = cfg.dim_per_head
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
  if cfg.rope_type == "linear":
    return inv / cfg.rope_factor
  if cfg.rope_type == "llama3":
    old, lo, hi = (
      cfg.rope_original_max_position,
      cfg.rope_low_freq_factor,
      cfg.rope_high_freq_factor,
    )
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old / lo, inv / cfg.rope_factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    mixed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return np.where(medium, mixed, scaled)
  return inv


def rope(x, positions, theta: float, inv_freq=None):
  """Rotary embedding, "rotate half" layout. x: [B, T, H, hd]; positions: [B, T].

  Args:
    x: queries or keys [B, T, H, hd].
    positions: the position of each token [B, T].
    theta: the RoPE base.
    inv_freq: `[hd / 2]` inverse frequencies (`rope_frequencies`, scaling
      applied); None: theta^(-2i / hd).

  Returns:
    The rotated x, in x's dtype.
  """
  hd = x.shape[-1]
  if inv_freq is None:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
  cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  rot = jnp.concatenate([-x32[..., hd // 2 :], x32[..., : hd // 2]], -1)
  return (x32 * cos + rot * sin).astype(x.dtype)


class Attention(nn.Module):
  cfg: DecoderConfig
  layer: int = 0

  @nn.compact
  def __call__(
    self, h, positions, q_slots, k_slots, key_mask, layer_cache=None, cache_index=None, prefix=None
  ):
    """h: [B, T, D]; q_slots: [T]; k_slots: [S]; key_mask: [B, S].

    Returns (out [B, T, D], (k, v) to store or None).
    """
    c = self.cfg
    H, KVH, hd = c.num_heads, c.kv_heads, c.dim_per_head
    dense = lambda n, f, bias=c.bias: nn.Dense(f, use_bias=bias, dtype=c.dtype, name=n)
    B, T, _ = h.shape
    q = dense("q", H * hd)(h).reshape(B, T, H, hd)
    k = dense("k", KVH * hd)(h).reshape(B, T, KVH, hd)
    v = dense("v", KVH * hd)(h).reshape(B, T, KVH, hd)
    if c.qk_norm:
      q = RMSNorm(c.norm_eps, c.dtype, c.norm_offset, name="q_norm")(q)
      k = RMSNorm(c.norm_eps, c.dtype, c.norm_offset, name="k_norm")(k)
    if c.family == "llama":
      rc = c.layer_rope(self.layer)
      freqs = rope_frequencies(rc)
      q, k = rope(q, positions, rc.rope_theta, freqs), rope(k, positions, rc.rope_theta, freqs)
    new_kv = None
    if layer_cache is not None:
      ck, cv = layer_cache
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
      new_kv = (k, v)
    allowed = (k_slots[None, :] <= q_slots[:, None])[None] & (key_mask[:, None, :] > 0)  # [B,T,S]
    window = c.window(self.layer)
    if window is not None:  # slots, as transformers' sliding-window mask counts them
      allowed = allowed & (q_slots[:, None] - k_slots[None, :] < window)[None]
    if prefix is not None:
      pk, pv = prefix  # [P, KVH, hd] each
      P = pk.shape[0]
      k = jnp.concatenate([jnp.broadcast_to(pk.astype(k.dtype), (B, P, KVH, hd)), k], 1)
      v = jnp.concatenate([jnp.broadcast_to(pv.astype(v.dtype), (B, P, KVH, hd)), v], 1)
      allowed = jnp.concatenate([jnp.ones((B, T, P), bool), allowed], -1)
    scale = (c.query_pre_attn_scalar or hd) ** -0.5
    if c.attn_softcap is None:  # XLA's attention on the CPU, cuDNN's where the GPU has one
      out = jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), mask=allowed[:, None], scale=scale
      )
      return dense("o", c.hidden_size, c.o_bias)(out.reshape(B, T, H * hd)), new_kv
    g = H // KVH  # Gemma 2's soft-capped scores: by hand
    qg = q.reshape(B, T, KVH, g, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32) * scale
    scores = c.attn_softcap * jnp.tanh(scores / c.attn_softcap)
    scores = jnp.where(allowed[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, H * hd)
    return dense("o", c.hidden_size, c.o_bias)(out), new_kv


class MLP(nn.Module):
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, h):
    c = self.cfg
    act = activation(c.act)
    dense = lambda n, f: nn.Dense(f, use_bias=c.family == "gpt2", dtype=c.dtype, name=n)
    if c.family == "llama":
      return dense("down", c.hidden_size)(
        act(dense("gate", c.intermediate_size)(h)) * dense("up", c.intermediate_size)(h)
      )
    return dense("down", c.hidden_size)(act(dense("up", c.intermediate_size)(h)))


class Block(nn.Module):
  cfg: DecoderConfig
  layer: int = 0

  @nn.compact
  def __call__(
    self, h, positions, q_slots, k_slots, key_mask, layer_cache=None, cache_index=None, prefix=None
  ):
    sandwich = self.cfg.sandwich_norms
    a, new_kv = Attention(self.cfg, self.layer, name="attn")(
      _norm(self.cfg, "attn_norm")(h),
      positions,
      q_slots,
      k_slots,
      key_mask,
      layer_cache,
      cache_index,
      prefix,
    )
    h = h + (_norm(self.cfg, "post_attn_norm")(a) if sandwich else a)
    m = MLP(self.cfg, name="mlp")(_norm(self.cfg, "mlp_norm")(h))
    h = h + (_norm(self.cfg, "post_mlp_norm")(m) if sandwich else m)
    return h, new_kv


class Decoder(nn.Module):
  """Token ids -> next-token logits, with an optional KV cache and prefixes."""

  cfg: DecoderConfig

  def setup(self):
    c = self.cfg
    self.embed = nn.Embed(c.vocab_size, c.hidden_size, name="embed")
    if c.family == "gpt2":
      self.pos_embed = nn.Embed(c.max_position, c.hidden_size, name="pos_embed")
    block = nn.remat(Block) if c.remat else Block  # the same parameters either way
    self.layers = [block(c, i, name=f"layer_{i}") for i in range(c.num_layers)]
    self.final_norm = _norm(c, "final_norm")
    if not c.tie_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False, name="lm_head")

  def __call__(
    self,
    input_ids,
    attention_mask=None,
    *,
    cache: Optional[Cache] = None,
    prefixes: Optional[Dict[int, Tuple[jax.Array, jax.Array]]] = None,
    position_offset=0,
    return_hidden: bool = False,
  ):
    """Logits `[B, T, V]` (f32) and the updated cache (None without one).

    input_ids, attention_mask: [B, T]. With a cache, the T tokens go to slots
    `cache.index ...` and attend to every earlier real slot. `prefixes` maps a
    layer index to its (key, value) prefix, each `[P, KVH, hd]`;
    `position_offset` (int or [B, 1]) shifts the positions of real tokens, e.g.
    to continue after a prefix taken from a real context. With
    `return_hidden`, also the hidden states after each block and the final
    norm (a tuple of L + 1 arrays `[B, T, D]`).
    """
    c = self.cfg
    B, T = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((B, T), jnp.int32)
    attention_mask = attention_mask.astype(jnp.int32)
    seen = 0 if cache is None else jnp.sum(cache.mask, axis=1, keepdims=True)  # [B, 1]
    positions = jnp.maximum(seen + jnp.cumsum(attention_mask, axis=1) - 1, 0) + position_offset
    h = self.embed(input_ids).astype(c.dtype)
    if c.embed_scale:  # Gemma: the normaliser in the compute dtype, as transformers rounds it
      h = h * jnp.asarray(c.hidden_size**0.5, c.dtype)
    if c.family == "gpt2":
      h = h + self.pos_embed(positions).astype(c.dtype)
    if cache is None:
      q_slots = k_slots = jnp.arange(T)
      key_mask, index = attention_mask, None
    else:
      index = cache.index
      q_slots = index + jnp.arange(T)
      k_slots = jnp.arange(cache.mask.shape[1])
      key_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, index))
    prefixes = prefixes or {}
    ks, vs, hidden = [], [], []
    for i, layer in enumerate(self.layers):
      lc = None if cache is None else (cache.k[i], cache.v[i])
      h, kv = layer(h, positions, q_slots, k_slots, key_mask, lc, index, prefixes.get(i))
      hidden.append(h)
      if kv is not None:
        ks.append(kv[0])
        vs.append(kv[1])
    h = self.final_norm(h)
    hidden.append(h)
    if c.tie_embeddings:
      logits = self.embed.attend(h.astype(jnp.float32))
    else:
      logits = self.lm_head(h.astype(jnp.float32))
    logits = logits.astype(jnp.float32)
    if c.final_softcap is not None:
      logits = c.final_softcap * jnp.tanh(logits / c.final_softcap)
    new_cache = None
    if cache is not None:
      new_cache = Cache(jnp.stack(ks), jnp.stack(vs), key_mask, index + T)
    if return_hidden:
      return logits, new_cache, tuple(hidden)
    return logits, new_cache


def causal_lm_loss(logits, input_ids, attention_mask, *, reduction: str = "mean"):
  """Next-token cross-entropy over real tokens only.

  logits: [..., T, V] (position t predicts token t + 1); input_ids, attention_mask:
  [..., T]. A target counts when both it and its context token are real, so
  padding (left or right) never enters the loss. `reduction="mean"`: mean over
  counted targets of each sequence (zero for a sequence with none); `"sum"`:
  (sum of losses, number of targets) for token-level averaging by the caller.

  Args:
    logits: [..., T, V].
    input_ids: [..., T].
    attention_mask: [..., T], 1 for a real token.
    reduction: "mean" or "sum".

  Returns:
    The loss per sequence [...], or (the summed loss [...], the target count [...]).
  """
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
  logp = jax.nn.log_softmax(logits[..., :-1, :].astype(jnp.float32), axis=-1)
  tgt = input_ids[..., 1:]
  nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
  w = (attention_mask[..., 1:] * attention_mask[..., :-1]).astype(jnp.float32)
  total, count = jnp.sum(nll * w, axis=-1), jnp.sum(w, axis=-1)
  if reduction == "sum":
    return total, count
  return total / jnp.maximum(count, 1.0)


def init_params(cfg: DecoderConfig, key: jax.Array, seq_len: int = 8):
  """Fresh parameters of a `Decoder(cfg)`.

  Args:
    cfg: the decoder's config.
    key: the PRNG key.
    seq_len: the length of the dummy input traced.

  Returns:
    The parameter tree.
  """
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return Decoder(cfg).init(key, ids)["params"]
