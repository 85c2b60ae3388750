"""Parameter-efficient adapters and trainable-parameter masks.

- **Trainable masks** (`trainable_mask`, `partition`, `combine`): split a param
  tree into the part that is trained and the frozen rest. The private core
  only ever sees the trainable part, so only it is clipped, noised and
  updated; the frozen part is an ordinary argument of the loss.
- **LoRA** (Hu et al. 2021, arXiv 2106.09685): `y = x W + b + (alpha / r) x A B`
  on the `nn.Dense` layers whose path matches a pattern. It is injected with
  `flax.linen.intercept_methods`, so any linen model works unchanged and the
  low-rank path is computed as `(x A) B`: per-example gradients of A and B
  never materialise a `[d_in, d_out]` matrix.
- **Prefix-tuning** (Li & Liang 2021, arXiv 2101.00190): per-layer key/value
  prefixes that every query attends to. Layers switched off in the layer mask
  have no prefix parameters at all, so they attend to nothing extra (a zeroed
  key would still take softmax mass).

Example:

```python
lora = adapters.init_lora(params, key, rank=8, targets=r".*attn/(q|v)")
def loss(lora, ex, base):
  with adapters.lora(lora, alpha=16):
    logits, _ = model.apply({"params": base}, ex["ids"][None])
  ...
grads, aux = dpjax.clipped_grad(loss, l2_clip_norm=1.0)(lora, batch, base)
```
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any
Pattern = Union[str, Sequence[str], Callable[[str], bool]]


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _matcher(pattern: Pattern) -> Callable[[str], bool]:
  if callable(pattern):
    return pattern
  pats = [pattern] if isinstance(pattern, str) else list(pattern)
  compiled = [re.compile(p) for p in pats]
  return lambda s: any(c.fullmatch(s) for c in compiled)


def trainable_mask(params: PyTree, pattern: Pattern) -> PyTree:
  """Booleans shaped like `params`: True where the leaf's path ("a/b/kernel") matches.

  `pattern` is a regex (full match), a list of them, or a predicate on the path.

  Args:
    params: the parameter tree.
    pattern: the regex(es) or predicate selecting trainable leaves.

  Returns:
    The boolean mask tree.
  """
  match = _matcher(pattern)
  mask = jax.tree_util.tree_map_with_path(lambda p, _: bool(match(_path_str(p))), params)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(
      f"pattern {pattern!r} matches no parameter; paths look like "
      f"{[_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)][:4]}"
    )
  return mask


def partition(params: PyTree, mask: PyTree) -> Tuple[PyTree, PyTree]:
  """(trainable, frozen): each shaped like `params` with None where the other holds the leaf.

  Args:
    params: the parameter tree.
    mask: the boolean tree from `trainable_mask`.

  Returns:
    (trainable, frozen).
  """
  trainable = jax.tree.map(lambda m, p: p if m else None, mask, params)
  frozen = jax.tree.map(lambda m, p: None if m else p, mask, params)
  return trainable, frozen


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
  """Inverse of `partition`.

  Args:
    trainable: the first tree of `partition`.
    frozen: the second tree of `partition`.

  Returns:
    The full parameter tree.
  """
  return jax.tree.map(
    lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
  )


def count(params: PyTree) -> int:
  """The number of scalars in `params` (None leaves count 0).

  Args:
    params: a pytree of arrays.

  Returns:
    The total size.
  """
  return int(sum(x.size for x in jax.tree.leaves(params)))


# ---------------------------------------------------------------------------
# LoRA


def _dense_paths(params: PyTree) -> Iterator[Tuple[str, ...]]:
  """Paths of sub-trees that look like an nn.Dense (a 2-D "kernel")."""

  def walk(tree, path):
    if isinstance(tree, dict):
      k = tree.get("kernel")
      if k is not None and getattr(k, "ndim", 0) == 2:
        yield path
      for name, sub in tree.items():
        if isinstance(sub, dict):
          yield from walk(sub, path + (name,))

  yield from walk(params, ())


def init_lora(
  params: PyTree, key: jax.Array, *, rank: int, targets: Pattern, dtype=jnp.float32
) -> Dict[str, Any]:
  """LoRA factors for each Dense layer of `params` whose path matches `targets`.

  A is drawn from N(0, 1/d_in) and B is zero, so the adapted model starts equal
  to the base model. Returns a nested dict mirroring the module paths, with
  leaves {"a": [d_in, r], "b": [r, d_out]}.

  Args:
    params: the base model's parameters.
    key: the PRNG key of the A factors.
    rank: r.
    targets: the regex(es) or predicate on module paths choosing the Dense layers.
    dtype: the factors' dtype.

  Returns:
    The factors tree (raises ValueError when no Dense layer matches).
  """
  if rank < 1:
    raise ValueError(f"rank must be >= 1, got {rank}")
  match = _matcher(targets)
  paths = [p for p in _dense_paths(params) if match("/".join(p))]
  if not paths:
    raise ValueError(
      f"targets {targets!r} match no Dense layer; layers look like "
      f"{['/'.join(p) for p in list(_dense_paths(params))[:4]]}"
    )
  out: Dict[str, Any] = {}
  for i, path in enumerate(paths):
    node = params
    for p in path:
      node = node[p]
    d_in, d_out = node["kernel"].shape
    k = jax.random.fold_in(key, i)
    leaf = {
      "a": (jax.random.normal(k, (d_in, rank)) / jnp.sqrt(d_in)).astype(dtype),
      "b": jnp.zeros((rank, d_out), dtype),
    }
    tree = out
    for p in path[:-1]:
      tree = tree.setdefault(p, {})
    tree[path[-1]] = leaf
  return out


def _lookup(tree: Dict[str, Any], path: Tuple[str, ...]) -> Optional[Dict[str, Any]]:
  for p in path:
    if not isinstance(tree, dict) or p not in tree:
      return None
    tree = tree[p]
  return tree if isinstance(tree, dict) and "a" in tree and "b" in tree else None


@contextlib.contextmanager
def lora(factors: Dict[str, Any], *, alpha: Optional[float] = None):
  """Within this context, linen `nn.Dense` layers with factors get the LoRA path.

  `alpha` scales the update by alpha / rank (default alpha = rank: scale 1).
  Paths are module paths from the root module passed to `apply`.

  Args:
    factors: the tree from `init_lora` (the trained factors).
    alpha: the LoRA alpha (default: the rank).

  Returns:
    A context manager; inside it, `model.apply` uses the adapted layers.
  """

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__" or not isinstance(context.module, nn.Dense):
      return out
    ab = _lookup(factors, tuple(context.module.path))
    if ab is None:
      return out
    x = args[0] if args else kwargs["inputs"]
    r = ab["a"].shape[1]
    scale = (alpha if alpha is not None else r) / r
    # x A B through two bias-free linen Dense calls, so that ghost clipping
    # sees the factors as layers (their own ghost / book-keeping rule).
    down = nn.Dense(r, use_bias=False).apply(
      {"params": {"kernel": ab["a"]}}, x.astype(ab["a"].dtype)
    )
    delta = nn.Dense(ab["b"].shape[1], use_bias=False).apply({"params": {"kernel": ab["b"]}}, down)
    return out + (scale * delta).astype(out.dtype)

  with nn.intercept_methods(interceptor):
    yield


def merge_lora(params: PyTree, factors: Dict[str, Any], *, alpha: Optional[float] = None):
  """Params with each adapted kernel replaced by W + (alpha / r) A B (for export/inference).

  Args:
    params: the base parameters.
    factors: the LoRA factors.
    alpha: the LoRA alpha (default: the rank).

  Returns:
    The merged parameter tree, shaped like `params`.
  """

  def walk(p, f):
    if not isinstance(p, dict):
      return p
    if isinstance(f, dict) and "a" in f and "b" in f and "kernel" in p:
      r = f["a"].shape[1]
      scale = (alpha if alpha is not None else r) / r
      return dict(p, kernel=p["kernel"] + scale * (f["a"] @ f["b"]).astype(p["kernel"].dtype))
    return {k: walk(v, f.get(k) if isinstance(f, dict) else None) for k, v in p.items()}

  return walk(params, factors)


# ---------------------------------------------------------------------------
# Prefix-tuning


def init_prefix(
  key: jax.Array,
  *,
  num_layers: int,
  num_tokens: int,
  num_kv_heads: int,
  head_dim: int,
  layers: Optional[Sequence[bool]] = None,
  scale: float = 0.02,
  dtype=jnp.float32,
) -> Dict[str, Dict[str, jax.Array]]:
  """Key/value prefixes `[num_tokens, num_kv_heads, head_dim]` for the layers switched on.

  `layers` is the per-layer on/off mask (default: all on). Layers that are off
  get no entry at all.

  Args:
    key: the PRNG key.
    num_layers: the model's layers.
    num_tokens: prefix tokens per layer.
    num_kv_heads: key/value heads.
    head_dim: the dimension per head.
    layers: which layers get a prefix.
    scale: the std of the N(0, scale^2) initialisation.
    dtype: the prefixes' dtype.

  Returns:
    {"layer_i": {"key": ..., "value": ...}} for each layer switched on.
  """
  if num_tokens < 1:
    raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
  layers = [True] * num_layers if layers is None else list(layers)
  if len(layers) != num_layers:
    raise ValueError(f"layer mask has {len(layers)} entries for {num_layers} layers")
  out = {}
  for i, on in enumerate(layers):
    if on:
      kk, kv = jax.random.split(jax.random.fold_in(key, i))
      shape = (num_tokens, num_kv_heads, head_dim)
      out[f"layer_{i}"] = {
        "key": (scale * jax.random.normal(kk, shape)).astype(dtype),
        "value": (scale * jax.random.normal(kv, shape)).astype(dtype),
      }
  return out


def prefix_layers(
  prefix: Dict[str, Dict[str, jax.Array]],
) -> Dict[int, Tuple[jax.Array, jax.Array]]:
  """Prefix params -> the `{layer index: (key, value)}` mapping the models take.

  Args:
    prefix: the tree from `init_prefix`.

  Returns:
    {layer index: (key, value)}.
  """
  out = {}
  for name, kv in prefix.items():
    m = re.fullmatch(r"layer_(\d+)", name)
    if m is None:
      raise ValueError(f"prefix entry {name!r} is not named layer_<index>")
    out[int(m.group(1))] = (kv["key"], kv["value"])
  return out


def select_prefix_layers(prefix: Dict[str, Dict[str, jax.Array]], layers: Sequence[bool]):
  """The prefixes of the layers kept by the mask; the others are removed.

  Args:
    prefix: the tree from `init_prefix`.
    layers: the per-layer keep mask.

  Returns:
    The prefixes of the kept layers.
  """
  return {k: v for k, v in prefix.items() if layers[int(k.split("_")[1])]}
