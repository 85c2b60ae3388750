"""Per-unit clipped gradient sums: the sensitivity-bounded core of DP-SGD.

`clipped_grad` turns a per-unit loss into a function returning the SUM over
privacy units of each unit's clipped gradient (Abadi et al. 2016, arXiv
1607.00133). Two strategies compute the same sum: `base.ClippedGradFn`
(per-unit gradients by `jax.vmap`, any loss) and `ghost.GhostClippedGradFn`
(ghost norms and book-keeping, arXiv 2110.05679 / 2210.00038).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp  # noqa: F401  (used by the doctest)

from dpjax.core.checks import check_clip_norms, check_positive
from dpjax.core.clipping.base import (
  ADD_REMOVE,
  REPLACE_ONE,
  ClippedGradAux,
  ClippedGradFn,
  GroupMean,
  GroupUnits,
  PyTree,
  group_mean,
)
from dpjax.core.clipping.ghost import GhostClippedGradFn

__all__ = [
  "ADD_REMOVE",
  "REPLACE_ONE",
  "ClippedGradAux",
  "ClippedGradFn",
  "GhostClippedGradFn",
  "GroupMean",
  "GroupUnits",
  "clipped_grad",
  "group_mean",
]


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
  automatic: Optional[float] = None,
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
      backward pass, vmap for every other parameter; L2 only; `dpjax.core.clipping.ghost`).
      Both return the same sum up to float rounding.
    automatic: automatic clipping (Bu et al. 2022, arXiv 2206.07136) with
      stability gamma > 0: each unit's gradient g (each group's, per-layer)
      becomes C g / (||g|| + gamma) instead of being clipped, so every unit
      is normalised and no clip norm needs tuning (C only scales the sum; set
      it to 1 and tune the learning rate). None (the default) clips.

  Returns:
    A `ClippedGradFn`: `grad_fn(params, batch, *args, mask=None)` returns
    `(clipped_sum, ClippedGradAux)`; `grad_fn.sensitivity(relation)` returns
    the bound below.

  Formal guarantees:
    Each unit contributes a vector of norm <= C (flat) or <= C_k on each group
    k (per-layer); with `automatic`, of norm C ||g|| / (||g|| + gamma) < C;
    units with mask 0 or a non-finite value contribute exactly
    zero, and no unit's contribution depends on another unit. So under the
    add/remove-one-unit relation the sum moves by at most `sensitivity()`
    (= C, or ||(C_k)_k||), and under replace-one by twice that. This holds
    only if `loss_fn` treats units independently (no batch norm, no
    cross-unit statistics).
  """
  if (l2_clip_norm is None) == (l1_clip_norm is None):
    raise ValueError(
      "give exactly one of l2_clip_norm, l1_clip_norm, got "
      f"l2_clip_norm={l2_clip_norm!r}, l1_clip_norm={l1_clip_norm!r}"
    )
  clip, ord_, name = (
    (l2_clip_norm, 2, "l2_clip_norm")
    if l2_clip_norm is not None
    else (l1_clip_norm, 1, "l1_clip_norm")
  )
  check_clip_norms(clip, name)
  if microbatch_size is not None and (
    int(microbatch_size) != microbatch_size or microbatch_size < 1
  ):
    raise ValueError(f"microbatch_size must be a positive integer or None, got {microbatch_size!r}")
  clip = jax.tree.map(float, clip)
  if isinstance(loss_fn, GroupMean):
    if loss_fn.has_aux != has_aux:
      raise ValueError(
        f"group_mean(..., has_aux={loss_fn.has_aux}) needs clipped_grad(..., "
        f"has_aux={loss_fn.has_aux}), got has_aux={has_aux}"
      )
    if keep_batch_dim:
      raise ValueError("keep_batch_dim does not apply to a group_mean loss (its unit is [G, ...])")
  if automatic is not None:
    check_positive(automatic, "automatic (the stability gamma)")
    automatic = float(automatic)
  if method not in ("vmap", "ghost"):
    raise ValueError(f"method must be 'vmap' or 'ghost', got {method!r}")
  cls = ClippedGradFn
  if method == "ghost":
    if ord_ != 2:
      raise ValueError("method='ghost' computes L2 norms only; use method='vmap' with l1_clip_norm")
    cls = GhostClippedGradFn
  return cls(
    loss_fn,
    clip_norm=clip,
    norm_ord=ord_,
    has_aux=has_aux,
    keep_batch_dim=keep_batch_dim,
    microbatch_size=microbatch_size,
    nan_safe=nan_safe,
    automatic=automatic,
  )
