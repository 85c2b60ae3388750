"""Per-unit clipped gradient sums: the sensitivity-bounded core of DP-SGD.

`clipped_grad` turns a per-example loss into a function that returns the SUM
over privacy units of each unit's clipped gradient (Abadi et al. 2016,
arXiv 1607.00133). A unit is whatever the leading axis of the batch indexes:
one example, or a group of examples (a user, arXiv 2407.07737) when the batch
is shaped `[units, group, ...]`.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

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
    num_unclipped: number of contributing units whose norm was within the
      bound (in every group): what adaptive quantile clipping counts.
  """

  loss: jax.Array
  norms: PyTree
  num_units: jax.Array
  num_dropped: jax.Array
  loss_aux: PyTree = None
  num_unclipped: jax.Array = None


def _leaf_norms(tree: PyTree, ord_: int) -> jax.Array:
  """Per-unit norm of a pytree whose leaves carry a leading unit axis."""
  leaves = jax.tree.leaves(tree)
  if ord_ == 2:
    sq = sum(
      jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1) for x in leaves
    )
    return jnp.sqrt(sq)
  return sum(
    jnp.sum(jnp.abs(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1) for x in leaves
  )


class GroupUnits(NamedTuple):
  """Units of several examples each (e.g. users): the examples and which are real.

  Attributes:
    examples: the examples, every leaf `[U, G, ...]` (`[G, ...]` for one unit).
    example_mask: `[U, G]` (`[G]`), 1 for a real example, 0 for padding.
  """

  examples: PyTree
  example_mask: jax.Array


class GroupMean:
  """The loss of a unit of G examples: the weighted mean of a per-example loss.

  Built by `group_mean`; called as `loss(params, unit, *args)` with `unit` a
  `GroupUnits` of one unit (leaves `[G, ...]`, mask `[G]`); the mask is
  normalised to sum 1 over the unit's real examples. Both clipping paths
  accept it like any unit loss; the ghost path also sees its examples, so its
  layers keep their rule.
  """

  def __init__(self, example_loss: Callable[..., Any], *, has_aux: bool):
    self.example_loss = example_loss
    self.has_aux = has_aux

  def split(self, unit: GroupUnits):
    """(normalised weights [G], the examples).

    Args:
      unit: one user's `GroupUnits` (examples [G, ...] and their mask [G]).

    Returns:
      (weights summing to 1 over the real examples, the examples).
    """
    if not isinstance(unit, GroupUnits):
      raise TypeError(
        "a group_mean loss takes GroupUnits(examples, example_mask) units, got "
        f"{type(unit).__name__}"
      )
    w = unit.example_mask.astype(jnp.float32)
    return w / jnp.maximum(jnp.sum(w), 1.0), unit.examples

  def combine(self, w, out):
    """Per-example outputs `[G, ...]` -> the unit's (loss, aux): weighted sums.

    Args:
      w: the weights from `split`.
      out: the per-example loss (and aux, with `has_aux`), each `[G, ...]`.

    Returns:
      The unit's loss, or (loss, aux), as the weighted sums.
    """
    mean = lambda v: jnp.tensordot(w, v.astype(jnp.float32), axes=1)
    if self.has_aux:
      loss, aux = out
      return mean(loss), jax.tree.map(mean, aux)
    return mean(out)

  def __call__(self, params, unit, *args):
    w, examples = self.split(unit)
    in_axes = (None, 0) + (None,) * len(args)
    return self.combine(w, jax.vmap(self.example_loss, in_axes=in_axes)(params, examples, *args))


def group_mean(example_loss: Callable[..., Any], *, has_aux: bool = False) -> GroupMean:
  """A per-example loss -> the loss of a unit of G examples (e.g. one user's).

  Example:
    >>> loss = group_mean(lambda p, ex: jnp.sum(p * ex["x"]))
    >>> unit = GroupUnits({"x": jnp.ones((3, 2))}, example_mask=jnp.array([1., 1., 0.]))
    >>> float(loss(jnp.ones(2), unit))      # mean over the 2 real examples
    2.0

  Args:
    example_loss: `example_loss(params, example, *args)`, a scalar (or
      `(scalar, aux)` with `has_aux`).
    has_aux: whether `example_loss` returns aux; the unit's aux is its
      weighted mean.

  Returns:
    A `GroupMean`, the loss of one `GroupUnits` unit: the mean of
    `example_loss` over its real examples. Batches of such units go to
    `clipped_grad` as `GroupUnits(examples [U, G, ...], example_mask [U, G])`.
  """
  return GroupMean(example_loss, has_aux=has_aux)


class ClippedGradFn:
  """Callable returned by `clipped_grad`; see there for the contract.

  The vmap strategy. A strategy (`ghost.GhostClippedGradFn`) overrides
  `clip_chunk`, the clipped sum and aux of one chunk of units, and builds it
  from `unit_loss`, `clip_factors` and `unit_aux` so that masking, dropping of
  non-finite units and the clip factors are the same for every strategy;
  microbatching, padding and the sum over chunks stay here.
  """

  method = "vmap"

  def __init__(
    self,
    loss_fn,
    *,
    clip_norm,
    norm_ord,
    has_aux,
    keep_batch_dim,
    microbatch_size,
    nan_safe,
    automatic=None,
  ):
    self._loss_fn = loss_fn
    self.clip_norm = clip_norm
    self.automatic = automatic  # gamma of automatic clipping, or None to clip
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

    Args:
      relation: `ADD_REMOVE` or `REPLACE_ONE`.

    Returns:
      The L2 (or, with `l1_clip_norm`, L1) sensitivity of the clipped sum.
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

  def unit_loss(self, params, unit, args):
    """(loss, aux) of one unit, as `loss_fn` defines it.

    Args:
      params: the parameters differentiated.
      unit: one unit of the batch (one row of every batch leaf).
      args: the extra non-batch arguments of `loss_fn`.

    Returns:
      (the unit's scalar loss, its aux or None).
    """
    if self.keep_batch_dim:
      unit = jax.tree.map(lambda x: x[None], unit)
    out = self._loss_fn(params, unit, *args)
    if self.has_aux:
      return out
    return out, None

  def _per_unit(self, params, batch, args):
    """Per-unit (loss, loss_aux, grads) for a chunk; grads carry a unit axis."""
    grad_fn = jax.value_and_grad(lambda p, u: self.unit_loss(p, u, args), has_aux=True)
    (loss, aux), grads = jax.vmap(grad_fn, in_axes=(None, 0))(params, batch)
    return loss, aux, grads

  def clip_factors(self, loss, norms, mask):
    """(keep [U], dropped [U], clip factor per group): 0 for masked or dropped units.

    Args:
      loss: the per-unit losses [U].
      norms: the per-unit gradient norms, one [U] array per clip group.
      mask: [U], 1 for a real unit, 0 for padding.

    Returns:
      (keep [U], dropped [U] (non-finite units), the clip factor of each group [U]).
    """
    keep = mask > 0
    dropped = jnp.zeros_like(keep)
    if self.nan_safe:
      total = sum(jax.tree.leaves(norms))
      finite = jnp.isfinite(loss.astype(jnp.float32)) & jnp.isfinite(total)
      dropped = keep & ~finite
      keep = keep & finite
    if self.automatic is None:  # clip: C g / max(||g||, C)
      factor = lambda c, n: jnp.minimum(1.0, c / jnp.maximum(n, 1e-30))
    else:  # automatic clipping (arXiv 2206.07136): C g / (||g|| + gamma), norm < C
      factor = lambda c, n: c / (n + self.automatic)
    factors = jax.tree.map(lambda c, n: jnp.where(keep, factor(c, n), 0.0), self.clip_norm, norms)
    return keep, dropped, factors

  def unit_aux(self, loss, norms, mask, keep, dropped, loss_aux) -> ClippedGradAux:
    """The per-unit side outputs, zero where a unit is masked or dropped.

    Args:
      loss: the per-unit losses [U].
      norms: the per-unit norms, one [U] array per clip group.
      mask: [U], 1 for a real unit.
      keep: [U] from `clip_factors`.
      dropped: [U] from `clip_factors`.
      loss_aux: the per-unit aux of `loss_fn`, or None.

    Returns:
      The chunk's `ClippedGradAux`.
    """
    within = jax.tree.leaves(jax.tree.map(lambda c, n: n <= c, self.clip_norm, norms))
    unclipped = keep & functools.reduce(jnp.logical_and, within)
    return ClippedGradAux(
      loss=jnp.where(keep, loss, 0.0),
      norms=jax.tree.map(lambda x: jnp.where(mask > 0, x, 0.0), norms),
      num_units=jnp.sum(keep.astype(jnp.int32)),
      num_dropped=jnp.sum(dropped.astype(jnp.int32)),
      loss_aux=loss_aux,
      num_unclipped=jnp.sum(unclipped.astype(jnp.int32)),
    )

  def clip_chunk(self, params, batch, mask, args):
    """(sum of the chunk's clipped per-unit gradients, its `ClippedGradAux`).

    Args:
      params: the parameters differentiated.
      batch: one chunk of units (the microbatch, or the whole batch).
      mask: [U], 1 for a real unit, 0 for padding.
      args: the extra non-batch arguments of `loss_fn`.

    Returns:
      (the clipped sum, a pytree like the gradients; the chunk's aux).
    """
    loss, aux, grads = self._per_unit(params, batch, args)
    if self.per_layer:
      norms = jax.tree.map(lambda c, g: _leaf_norms(g, self.norm_ord), self.clip_norm, grads)
    else:
      norms = _leaf_norms(grads, self.norm_ord)
    keep, dropped, factors = self.clip_factors(loss, norms, mask)

    def scale_group(factor, g):
      def leaf(x):
        # where(), not multiply: 0 * NaN would leak a masked unit's NaN.
        safe = jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)
        return jnp.tensordot(factor.astype(jnp.float32), safe.astype(jnp.float32), axes=1).astype(
          x.dtype
        )

      return jax.tree.map(leaf, g)

    if self.per_layer:
      summed = jax.tree.map(scale_group, factors, grads)
    else:
      summed = scale_group(factors, grads)
    return summed, self.unit_aux(loss, norms, mask, keep, dropped, aux)

  def __call__(
    self,
    params: PyTree,
    batch: PyTree,
    *args,
    mask: Optional[jax.Array] = None,
    clip_norm: Optional[jax.Array] = None,
  ):
    """Returns `(sum of clipped per-unit gradients, ClippedGradAux)`.

    `clip_norm` (flat clipping only) replaces the bound for this call, e.g.
    a traced scalar that adaptive quantile clipping moves from step to step;
    the call's sensitivity is then that value, not `sensitivity()`.
    """
    if clip_norm is not None:
      if self.per_layer:
        raise ValueError("a call-time clip_norm needs flat clipping (one l2_clip_norm)")
      at = copy.copy(self)
      at.clip_norm = jnp.asarray(clip_norm, jnp.float32)
      return at(params, batch, *args, mask=mask)
    leaves = jax.tree.leaves(batch)
    if not leaves:
      raise ValueError("batch has no arrays")
    n = leaves[0].shape[0]
    for x in leaves:
      if x.shape[0] != n:
        raise ValueError(
          f"all batch arrays need the same leading (unit) axis, got {x.shape[0]} and {n}"
        )
    if mask is None:
      mask = jnp.ones((n,), jnp.float32)
    elif mask.shape != (n,):
      raise ValueError(f"mask must have shape ({n},), got {mask.shape}")
    mb = self.microbatch_size
    if mb is None or mb >= n:
      return self.clip_chunk(params, batch, mask, args)

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
      g, aux = self.clip_chunk(params, b, m, args)
      return jax.tree.map(jnp.add, acc, g), aux

    summed, aux = jax.lax.scan(body, zero, (batch_c, mask_c))

    def unsplit(x):
      return x.reshape((chunks * mb,) + x.shape[2:])[:n]

    aux = ClippedGradAux(
      loss=unsplit(aux.loss),
      norms=jax.tree.map(unsplit, aux.norms),
      num_units=jnp.sum(aux.num_units),
      num_dropped=jnp.sum(aux.num_dropped),
      loss_aux=jax.tree.map(unsplit, aux.loss_aux),
      num_unclipped=jnp.sum(aux.num_unclipped),
    )
    return summed, aux
