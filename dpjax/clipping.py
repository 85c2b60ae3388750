"""Per-unit clipped gradient sums: the sensitivity-bounded core of DP-SGD.

`clipped_grad` turns a per-example loss into a function that returns the SUM
over privacy units of each unit's clipped gradient (Abadi et al. 2016,
arXiv 1607.00133). A unit is whatever the leading axis of the batch indexes:
one example, or a group of examples (a user, arXiv 2407.07737) when the batch
is shaped `[units, group, ...]`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

PyTree = Any

ADD_REMOVE = "add_remove"
REPLACE_ONE = "replace_one"


class ClippedGradAux(NamedTuple):
  """Per-unit side outputs of a clipped-gradient call (not privatised).

  Attributes:
    loss: per-unit loss, `[U]` (0 where masked or dropped).
    norms: per-unit pre-clip gradient norm `[U]`; with per-layer clipping, a
      pytree shaped like the clip-norm tree with one `[U]` array per group.
    num_units: number of units that contributed (mask 1 and finite).
    num_dropped: number of unmasked units dropped for a non-finite loss or
      gradient (only with `nan_safe=True`).
    loss_aux: per-unit auxiliary outputs of `loss_fn` when `has_aux=True`.
  """
  loss: chex.Array
  norms: PyTree
  num_units: chex.Array
  num_dropped: chex.Array
  loss_aux: PyTree = None


def _leaf_norms(tree: PyTree, ord_: int) -> chex.Array:
  """Per-unit norm of a pytree whose leaves carry a leading unit axis."""
  leaves = jax.tree.leaves(tree)
  if ord_ == 2:
    sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
             for x in leaves)
    return jnp.sqrt(sq)
  return sum(jnp.sum(jnp.abs(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
             for x in leaves)


def _validate_clip_tree(clip: PyTree, name: str) -> None:
  for c in jax.tree.leaves(clip):
    c = float(c)
    if not (c > 0 and math.isfinite(c)):
      raise ValueError(f"{name} must be finite and > 0 (every leaf), got {c}")


class GroupMean:
  """The loss of a unit of G examples: the weighted mean of a per-example loss.

  Built by `group_mean`; called as `loss(params, unit, *args)` with every
  leaf of `unit` shaped `[G, ...]` and `unit[weight_key]` `[G]` the example
  weights (1 for a real example, 0 for padding), normalised to sum 1 over
  the unit's real examples. Both clipping paths accept it like any unit loss;
  the ghost path also sees its examples, so its layers keep their rule.
  """

  def __init__(self, example_loss: Callable[..., Any], *, weight_key: str, has_aux: bool):
    self.example_loss = example_loss
    self.weight_key = weight_key
    self.has_aux = has_aux

  def split(self, unit):
    """(normalised weights [G], the examples without the weight entry)."""
    unit = dict(unit)
    w = unit.pop(self.weight_key).astype(jnp.float32)
    return w / jnp.maximum(jnp.sum(w), 1.0), unit

  def combine(self, w, out):
    """Per-example outputs `[G, ...]` -> the unit's (loss, aux): weighted sums."""
    mean = lambda v: jnp.tensordot(w, v.astype(jnp.float32), axes=1)
    if self.has_aux:
      loss, aux = out
      return mean(loss), jax.tree.map(mean, aux)
    return mean(out)

  def __call__(self, params, unit, *args):
    w, examples = self.split(unit)
    in_axes = (None, 0) + (None,) * len(args)
    return self.combine(w, jax.vmap(self.example_loss, in_axes=in_axes)(params, examples, *args))


def group_mean(example_loss: Callable[..., Any], *, weight_key: str = "_example_mask",
               has_aux: bool = False) -> GroupMean:
  """A per-example loss -> the loss of a unit of G examples (e.g. one user's).

  Example:
    >>> loss = group_mean(lambda p, ex: jnp.sum(p * ex["x"]))
    >>> unit = {"x": jnp.ones((3, 2)), "_example_mask": jnp.array([1., 1., 0.])}
    >>> float(loss(jnp.ones(2), unit))      # mean over the 2 real examples
    2.0
  """
  return GroupMean(example_loss, weight_key=weight_key, has_aux=has_aux)


class ClippedGradFn:
  """Callable returned by `clipped_grad`; see there for the contract."""

  method = "vmap"

  def __init__(self, loss_fn, *, clip_norm, norm_ord, has_aux, keep_batch_dim,
               microbatch_size, nan_safe):
    self._loss_fn = loss_fn
    self.clip_norm = clip_norm
    self.norm_ord = norm_ord
    self.has_aux = has_aux
    self.keep_batch_dim = keep_batch_dim
    self.microbatch_size = microbatch_size
    self.nan_safe = nan_safe
    self.per_layer = not jax.tree_util.treedef_is_leaf(jax.tree.structure(clip_norm))

  def sensitivity(self, relation: str = ADD_REMOVE) -> float:
    """Bound on the change of the clipped sum, in this function's norm.

    Add/remove one unit moves the sum by one clipped gradient: C (flat) or
    the norm of the vector of group bounds (per-layer: sqrt(sum C_k^2) in L2,
    sum C_k in L1). Replace-one moves it by at most twice that.
    """
    bounds = [float(c) for c in jax.tree.leaves(self.clip_norm)]
    if self.norm_ord == 2:
      base = math.sqrt(sum(c * c for c in bounds))
    else:
      base = sum(bounds)
    if relation == ADD_REMOVE:
      return base
    if relation == REPLACE_ONE:
      return 2.0 * base
    raise ValueError(f"relation must be '{ADD_REMOVE}' or '{REPLACE_ONE}', got {relation!r}")

  # --- the computation -----------------------------------------------------

  def _unit_loss(self, params, unit, args):
    """(loss, aux) of one unit, as `loss_fn` defines it."""
    if self.keep_batch_dim:
      unit = jax.tree.map(lambda x: x[None], unit)
    out = self._loss_fn(params, unit, *args)
    if self.has_aux:
      return out
    return out, None

  def _per_unit(self, params, batch, args):
    """Per-unit (loss, loss_aux, grads) for a chunk; grads carry a unit axis."""
    grad_fn = jax.value_and_grad(lambda p, u: self._unit_loss(p, u, args), has_aux=True)
    (loss, aux), grads = jax.vmap(grad_fn, in_axes=(None, 0))(params, batch)
    return loss, aux, grads

  def _factors(self, loss, norms, mask):
    """(keep [U], dropped [U], clip factor per group): 0 for masked or dropped units."""
    keep = mask > 0
    dropped = jnp.zeros_like(keep)
    if self.nan_safe:
      total = sum(jax.tree.leaves(norms))
      finite = jnp.isfinite(loss.astype(jnp.float32)) & jnp.isfinite(total)
      dropped = keep & ~finite
      keep = keep & finite
    factors = jax.tree.map(
        lambda c, n: jnp.where(keep, jnp.minimum(1.0, c / jnp.maximum(n, 1e-30)), 0.0),
        self.clip_norm, norms)
    return keep, dropped, factors

  def _aux(self, loss, norms, mask, keep, dropped, loss_aux) -> ClippedGradAux:
    return ClippedGradAux(
        loss=jnp.where(keep, loss, 0.0),
        norms=jax.tree.map(lambda x: jnp.where(mask > 0, x, 0.0), norms),
        num_units=jnp.sum(keep.astype(jnp.int32)),
        num_dropped=jnp.sum(dropped.astype(jnp.int32)), loss_aux=loss_aux)

  def _clip_chunk(self, params, batch, mask, args):
    loss, aux, grads = self._per_unit(params, batch, args)
    if self.per_layer:
      norms = jax.tree.map(lambda c, g: _leaf_norms(g, self.norm_ord), self.clip_norm, grads)
    else:
      norms = _leaf_norms(grads, self.norm_ord)
    keep, dropped, factors = self._factors(loss, norms, mask)

    def scale_group(factor, g):
      def leaf(x):
        # where(), not multiply: 0 * NaN would leak a masked unit's NaN.
        safe = jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)
        return jnp.tensordot(factor.astype(jnp.float32), safe.astype(jnp.float32),
                             axes=1).astype(x.dtype)
      return jax.tree.map(leaf, g)

    if self.per_layer:
      summed = jax.tree.map(scale_group, factors, grads)
    else:
      summed = scale_group(factors, grads)
    return summed, self._aux(loss, norms, mask, keep, dropped, aux)

  def __call__(self, params: PyTree, batch: PyTree, *args,
               mask: Optional[chex.Array] = None):
    """Returns `(sum of clipped per-unit gradients, ClippedGradAux)`."""
    leaves = jax.tree.leaves(batch)
    if not leaves:
      raise ValueError("batch has no arrays")
    n = leaves[0].shape[0]
    for x in leaves:
      if x.shape[0] != n:
        raise ValueError(
            f"all batch arrays need the same leading (unit) axis, got {x.shape[0]} and {n}")
    if mask is None:
      mask = jnp.ones((n,), jnp.float32)
    elif mask.shape != (n,):
      raise ValueError(f"mask must have shape ({n},), got {mask.shape}")
    mb = self.microbatch_size
    if mb is None or mb >= n:
      return self._clip_chunk(params, batch, mask, args)

    chunks = -(-n // mb)
    pad = chunks * mb - n
    def split(x):
      x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
      return x.reshape((chunks, mb) + x.shape[1:])
    batch_c = jax.tree.map(split, batch)
    mask_c = split(mask)

    zero = jax.tree.map(jnp.zeros_like, params)
    def body(acc, xs):
      b, m = xs
      g, aux = self._clip_chunk(params, b, m, args)
      return jax.tree.map(jnp.add, acc, g), aux
    summed, aux = jax.lax.scan(body, zero, (batch_c, mask_c))

    def unsplit(x):
      return x.reshape((chunks * mb,) + x.shape[2:])[:n]
    aux = ClippedGradAux(
        loss=unsplit(aux.loss),
        norms=jax.tree.map(unsplit, aux.norms),
        num_units=jnp.sum(aux.num_units),
        num_dropped=jnp.sum(aux.num_dropped),
        loss_aux=jax.tree.map(unsplit, aux.loss_aux))
    return summed, aux


def clipped_grad(
    loss_fn: Callable[..., Any],
    *,
    l2_clip_norm: Optional[PyTree] = None,
    l1_clip_norm: Optional[PyTree] = None,
    has_aux: bool = False,
    keep_batch_dim: bool = False,
    microbatch_size: Optional[int] = None,
    nan_safe: bool = True,
    method: str = "vmap",
) -> ClippedGradFn:
  """Like `jax.grad`, but returns the sum of per-unit clipped gradients.

  `loss_fn(params, unit, *args)` returns the scalar loss of one privacy unit.
  The returned function is called as `grad_fn(params, batch, *args, mask=m)`
  where every leaf of `batch` has a leading unit axis `[U, ...]`; `args` are
  broadcast to all units. Each unit's gradient is clipped to the bound and the
  clipped gradients are summed. A unit is one example (`batch` leaves `[B, ...]`)
  or a group of examples (`[users, G, ...]`; `loss_fn` then sees `[G, ...]`
  and should average over the group's own valid rows, as user-level DP does).

  Example:
    >>> grad_fn = clipped_grad(lambda p, x: jnp.sum(p * x), l2_clip_norm=1.0)
    >>> g, aux = grad_fn(jnp.zeros(3), jnp.ones((4, 3)), mask=jnp.array([1., 1., 1., 0.]))
    >>> [round(float(v), 3) for v in g]  # three units, each clipped from norm sqrt(3) to 1
    [1.732, 1.732, 1.732]

  Args:
    loss_fn: per-unit loss; returns a scalar, or `(scalar, aux)` with `has_aux`.
    l2_clip_norm: the L2 bound. A float clips the whole gradient (flat); a
      pytree that is a prefix of `params` clips each subtree to its own bound
      (per-layer). Exactly one of `l2_clip_norm`, `l1_clip_norm` is given.
    l1_clip_norm: the L1 bound, same shapes as above (for Laplace-type noise).
    has_aux: whether `loss_fn` returns `(loss, aux)`; per-unit aux is returned
      stacked in `ClippedGradAux.loss_aux`.
    keep_batch_dim: if True, `loss_fn` sees each unit with a leading axis of
      size 1, so model code written for batches runs unchanged.
    microbatch_size: compute per-unit gradients `microbatch_size` units at a
      time under `lax.scan` (less memory, same result). The batch is padded
      with masked units to a multiple of it.
    nan_safe: drop (contribute zero for) any unit whose loss or gradient norm
      is not finite, instead of propagating NaN into the sum.
    method: "vmap" (per-unit gradients by `jax.vmap`, any loss) or "ghost"
      (ghost norms + book-keeping for linen `nn.Dense`/`nn.Embed` layers in one
      backward pass, vmap for every other parameter; L2 only; `dpjax.ghost`).
      Both return the same sum up to float rounding.

  Returns:
    A `ClippedGradFn`: `grad_fn(params, batch, *args, mask=None)` returns
    `(clipped_sum, ClippedGradAux)`; `grad_fn.sensitivity(relation)` returns
    the bound below.

  Formal guarantees:
    Each unit contributes a vector of norm <= C (flat) or <= C_k on each group
    k (per-layer); units with mask 0 or a non-finite value contribute exactly
    zero, and no unit's contribution depends on another unit. So under the
    add/remove-one-unit relation the sum moves by at most `sensitivity()`
    (= C, or ||(C_k)_k||), and under replace-one by twice that. This holds
    only if `loss_fn` treats units independently (no batch norm, no
    cross-unit statistics).
  """
  if (l2_clip_norm is None) == (l1_clip_norm is None):
    raise ValueError("give exactly one of l2_clip_norm, l1_clip_norm, got "
                     f"l2_clip_norm={l2_clip_norm!r}, l1_clip_norm={l1_clip_norm!r}")
  clip, ord_, name = ((l2_clip_norm, 2, "l2_clip_norm") if l2_clip_norm is not None
                      else (l1_clip_norm, 1, "l1_clip_norm"))
  _validate_clip_tree(clip, name)
  if microbatch_size is not None and (int(microbatch_size) != microbatch_size or microbatch_size < 1):
    raise ValueError(f"microbatch_size must be a positive integer or None, got {microbatch_size!r}")
  clip = jax.tree.map(float, clip)
  if isinstance(loss_fn, GroupMean):
    if loss_fn.has_aux != has_aux:
      raise ValueError(f"group_mean(..., has_aux={loss_fn.has_aux}) needs clipped_grad(..., "
                       f"has_aux={loss_fn.has_aux}), got has_aux={has_aux}")
    if keep_batch_dim:
      raise ValueError("keep_batch_dim does not apply to a group_mean loss (its unit is [G, ...])")
  if method not in ("vmap", "ghost"):
    raise ValueError(f"method must be 'vmap' or 'ghost', got {method!r}")
  cls = ClippedGradFn
  if method == "ghost":
    if ord_ != 2:
      raise ValueError("method='ghost' computes L2 norms only; use method='vmap' with l1_clip_norm")
    from dpjax.ghost import GhostClippedGradFn  # ghost builds on this module
    cls = GhostClippedGradFn
  return cls(loss_fn, clip_norm=clip, norm_ord=ord_, has_aux=has_aux,
                       keep_batch_dim=keep_batch_dim, microbatch_size=microbatch_size,
                       nan_safe=nan_safe)
