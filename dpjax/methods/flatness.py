"""DP-Flat (Chen et al. 2024, arXiv 2403.04124) with an end-to-end guarantee.

Three independent, composable pieces:

* **In-layer min-max** (`dp_sam`): the gradient is taken at theta + v and
  applied at theta, with the layer-wise adversarial perturbation of DP-Flat,
  v_k = rho * ||theta_k|| * d_k / ||d_k|| per parameter tensor k. The ascent
  direction d must not read the private data outside the mechanism:
    - mode "free": d is the previous step's PRIVATISED gradient (the noised
      sum the mechanism released). Post-processing: no extra privacy cost.
    - mode "charged": d is a separate privatised ascent gradient (its own
      Poisson batch, clipping and noise) computed at theta; the accountant
      charges one more release of the same mechanism per step where it is
      used (`releases`).
  The public code of the paper takes d from the raw (unclipped, un-noised)
  private gradient; that is not covered by the DP-SGD guarantee and is not
  offered here.
* **Across layers** (`flatness_probe`, `select_layers`): the loss along a
  normalised direction per layer, alpha in [0, alpha_max], measured on
  public data or along a privatised direction; the sharpest layers lose their
  prefix. `dpjax.models.adapters.select_prefix_layers` removes a prefix
  entirely (the layer then attends to its own tokens only).
* **Between weights** (`weight_anchor`): each example's loss gains
  lam * ||P - P_ref||_F before clipping, towards a reference copy P_ref that
  is public (trained on public data) or itself DP (its budget accounted by
  the caller); the reference is a constant of the loss, never trained on the
  private data by this module.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax.core import mechanisms

PyTree = Any
MODES = ("free", "charged")


def _check_rho(rho: float) -> None:
  if not (np.isfinite(rho) and rho >= 0):
    raise ValueError(f"rho must be finite and >= 0, got {rho}")


def perturbation(
  params: PyTree, direction: PyTree, rho: float, *, layerwise: bool = True
) -> PyTree:
  """The adversarial step v for `direction` (any pytree shaped like `params`).

  layerwise=True: v_k = rho * ||theta_k|| * d_k / ||d_k|| for every leaf k (DP-Flat);
  layerwise=False: v = rho * d / ||d|| over the whole tree (SAM). A zero
  direction gives v = 0.

  Args:
    params: the current parameters theta.
    direction: the ascent direction d.
    rho: the radius.
    layerwise: scale per leaf by ||theta_k|| (DP-Flat) instead of one global ball.

  Returns:
    v, shaped like `params`.
  """
  _check_rho(rho)
  tiny = jnp.finfo(jnp.float32).tiny
  if layerwise:

    def leaf(p, d):
      d = d.astype(jnp.float32)
      dn = jnp.sqrt(jnp.sum(d * d))
      pn = jnp.sqrt(jnp.sum(jnp.square(p.astype(jnp.float32))))
      return (rho * pn * d / jnp.maximum(dn, tiny)).astype(p.dtype)

    return jax.tree.map(leaf, params, direction)
  dn = optax.global_norm(direction)
  return jax.tree.map(
    lambda p, d: (rho * d / jnp.maximum(dn, tiny)).astype(p.dtype), params, direction
  )


class SAMState(NamedTuple):
  direction: PyTree  # the last privatised gradient seen (free mode)
  count: jax.Array  # steps seen


class DPSAM(NamedTuple):
  """An optax transform (`init`, `update`) plus `perturb(params, state, direction=None)`.

  Chain it AFTER the noise mechanism: `update` records the privatised
  gradient it is given (free mode) and passes it on unchanged.
  """

  init: Callable
  update: Callable
  perturb: Callable
  rho: float
  mode: str
  active_steps: Optional[int]

  @property
  def charged(self) -> bool:
    """Whether each ascent is a release of its own (charged), not the last update (free)."""
    return self.mode == "charged"


def dp_sam(
  rho: float, *, mode: str = "free", layerwise: bool = True, active_steps: Optional[int] = None
) -> DPSAM:
  """Private sharpness-aware minimisation (DP-Flat's in-layer min-max).

  Usage (free mode)::

      sam = dpjax.flatness.dp_sam(rho=1e-4)
      tx = optax.chain(dpjax.mechanisms.gaussian(...), sam, dpjax.normalize(B), optax.adam(lr))
      at = sam.perturb(params, opt_state[1])        # theta + v, from released values only
      grads, aux = grad_fn(at, batch)                # clipped at the perturbed point
      updates, opt_state = tx.update(grads, opt_state, params)   # applied at theta

  In "charged" mode pass the privatised ascent gradient:
  `sam.perturb(params, state, direction=noisy_ascent_grad)`; charge it with
  `releases(steps, ...)`. The perturbation is zero at the first step of free
  mode (nothing released yet) and from `active_steps` on (DP-Flat perturbs
  during the first half of training). rho = 0 gives theta exactly.

  Relation to `optax.contrib.sam`: there the adversarial step is an inner
  optimizer applied to ordinary gradients (fed by the loop on alternate
  steps in transparent mode, or computed by the transform's own gradient
  call in opaque mode); privatising those would cost a release per ascent
  step. Here the ascent direction is an explicit input (the last
  released gradient, or a privatised one you pass), so what it reads is
  visible at the call site; `rho` plays the role of that transform's ascent
  step size, with DP-Flat's layer-wise ||theta_k|| scaling.

  Args:
    rho: the perturbation radius (relative to ||theta_k|| with `layerwise`),
      finite and >= 0.
    mode: "free" (the direction is the last released gradient: no privacy
      cost) or "charged" (a fresh privatised ascent gradient is passed).
    layerwise: scale each parameter tensor's step by its own norm.
    active_steps: perturb only during the first `active_steps` updates.

  Returns:
    A `DPSAM`: an optax transform (place it after the noise) with
    `perturb(params, state, direction=None)`.

  Formal guarantees:
    Free mode reads only released (noised) gradients and theta, so it is
    post-processing: no extra epsilon. Charged mode releases one more
    privatised gradient per active step; `releases` counts them and the
    plan charges them.
  """
  _check_rho(rho)
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if active_steps is not None and active_steps < 0:
    raise ValueError(f"active_steps must be >= 0, got {active_steps}")

  def init_fn(params):
    return SAMState(jax.tree.map(jnp.zeros_like, params), jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    direction = updates if mode == "free" else state.direction
    return updates, SAMState(direction, state.count + 1)

  def perturb(params, state: SAMState, direction: Optional[PyTree] = None):
    if mode == "charged":
      if direction is None:
        raise ValueError(
          "dp_sam(mode='charged') needs the privatised ascent gradient: "
          "perturb(params, state, direction=...)"
        )
    else:
      if direction is not None:
        raise ValueError(
          "dp_sam(mode='free') uses the last released gradient; do not pass "
          "a direction (use mode='charged' for a fresh privatised one)"
        )
      direction = state.direction
    if rho == 0:
      return params
    v = perturbation(params, direction, rho, layerwise=layerwise)
    on = jnp.asarray(True) if active_steps is None else state.count < active_steps
    return jax.tree.map(lambda p, dv: p + jnp.where(on, dv, jnp.zeros_like(dv)), params, v)

  return DPSAM(init_fn, update_fn, perturb, float(rho), mode, active_steps)


def releases(steps: int, *, mode: Optional[str], active_steps: Optional[int] = None) -> int:
  """How many privatised gradients `steps` training steps release (for the accountant).

  One per step; "charged" SAM adds one per step where it is active.

  Args:
    steps: the training steps.
    mode: the SAM mode ("free", "charged") or None.
    active_steps: the steps where SAM acts (None: all).

  Returns:
    The number of privatised gradients released.
  """
  if steps < 0:
    raise ValueError(f"steps must be >= 0, got {steps}")
  if mode is None or mode == "free":
    return steps
  if mode != "charged":
    raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
  return steps + (steps if active_steps is None else min(steps, active_steps))


def find_state(opt_state: PyTree) -> SAMState:
  """The (single) SAMState inside a chained optimizer state.

  Args:
    opt_state: the optimizer state (tuples, chains, named chains).

  Returns:
    The SAMState (raises ValueError when there is none or more than one).
  """
  return mechanisms.find_state(opt_state, SAMState)


# --- across layers -----------------------------------------------------------


def flatness_probe(
  loss: Callable[[PyTree], jax.Array],
  params: PyTree,
  direction: PyTree,
  groups: Sequence[Callable[[str], bool]],
  alphas: Sequence[float],
) -> np.ndarray:
  """Loss along a normalised direction, one parameter group at a time.

  For group g (a predicate on '/'-joined parameter paths) and alpha a, the
  loss at theta + a * ||theta_g|| * d_g / ||d_g|| with only group g moved.
  `loss` must be a function of public data or of already-privatised values
  (the caller's choice decides the privacy cost; this function adds none).
  Returns [len(groups), len(alphas)]: row minus loss(params) is the
  increase, small = flat. `loss` is called as given (jit it yourself, with
  its data as arguments rather than closed-over constants).

  Args:
    loss: params -> scalar loss.
    params: theta.
    direction: d, shaped like `params`.
    groups: one predicate per parameter group.
    alphas: the step sizes a.

  Returns:
    [len(groups), len(alphas)] losses.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  dflat = jax.tree.leaves(direction)
  if len(dflat) != len(flat):
    raise ValueError("direction must have the structure of params")
  names = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) for path, _ in flat]
  out = np.zeros((len(groups), len(alphas)))
  for gi, in_group in enumerate(groups):
    sel = [in_group(n) for n in names]
    if not any(sel):
      raise ValueError(f"parameter group {gi} matches no parameter")
    leaves = [p for (_, p) in flat]
    pn = jnp.sqrt(sum(jnp.sum(jnp.square(p)) for p, s in zip(leaves, sel) if s))
    dn = jnp.sqrt(sum(jnp.sum(jnp.square(d)) for d, s in zip(dflat, sel) if s))
    unit = [d / jnp.maximum(dn, 1e-30) if s else jnp.zeros_like(d) for d, s in zip(dflat, sel)]
    for ai, a in enumerate(alphas):
      moved = [p + a * pn * u for p, u in zip(leaves, unit)]
      out[gi, ai] = float(loss(jax.tree_util.tree_unflatten(treedef, moved)))
  return out


def select_layers(curves: np.ndarray, keep: int) -> list:
  """Keep the `keep` flattest groups (smallest mean loss increase along the probe).

  `curves`: `flatness_probe`'s output with alphas[0] == 0. Returns a boolean
  mask (True = keep the layer's prefix).

  Args:
    curves: [groups, alphas] losses, alphas[0] == 0.
    keep: how many groups to keep.

  Returns:
    A list of booleans, one per group.
  """
  curves = np.asarray(curves, np.float64)
  if curves.ndim != 2 or curves.shape[1] < 2:
    raise ValueError(f"curves must be [groups, alphas >= 2], got shape {curves.shape}")
  if not 0 <= keep <= curves.shape[0]:
    raise ValueError(f"keep must be in [0, {curves.shape[0]}], got {keep}")
  sharpness = np.mean(curves[:, 1:] - curves[:, :1], axis=1)
  order = np.argsort(sharpness, kind="stable")
  mask = np.zeros(curves.shape[0], bool)
  mask[order[:keep]] = True
  return mask.tolist()


# --- between weights ---------------------------------------------------------


def weight_anchor(
  loss_fn: Callable,
  reference: PyTree,
  lam: float,
  *,
  select: Optional[Callable[[PyTree], PyTree]] = None,
) -> Callable:
  """`loss_fn(params, example, *rest)` + lam * ||select(params) - reference||_F.

  The term is added to EACH example's loss, so it is clipped with it (its
  gradient is part of every per-example gradient; the sensitivity analysis
  is unchanged). `reference` is a constant (public, or DP with its own
  budget); `select` picks the compared sub-tree (default: all params).
  Works with `has_aux` losses (a (loss, aux) pair).

  Args:
    loss_fn: the per-example loss.
    reference: the parameters to pull towards (a constant, no gradient).
    lam: the weight of the Frobenius-norm term, finite and >= 0.
    select: the sub-tree of the params compared with `reference`.

  Returns:
    The per-example loss with the term added (same signature as `loss_fn`).

  Formal guarantees:
    None needed beyond clipping's: the term is part of each example's loss,
    so each example's clipped gradient includes it; a `reference` computed
    from the private data must be accounted by whoever computed it.
  """
  if not (np.isfinite(lam) and lam >= 0):
    raise ValueError(f"lam must be finite and >= 0, got {lam}")
  reference = jax.tree.map(jax.lax.stop_gradient, reference)
  pick = select or (lambda p: p)

  def reg(params):
    diff = jax.tree.map(lambda a, b: (a - b).astype(jnp.float32), pick(params), reference)
    sq = sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(diff))
    # sqrt with a safe gradient at 0 (P == P_ref): d||x||/dx := 0 there.
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)

  def wrapped(params, example, *rest):
    out = loss_fn(params, example, *rest)
    if isinstance(out, tuple):
      return (out[0] + lam * reg(params),) + tuple(out[1:])
    return out + lam * reg(params)

  return wrapped


def save_reference(params: PyTree, path: str) -> None:
  """Write a reference copy (public or DP-trained) for `weight_anchor` to `.npz`.

  Args:
    params: the reference parameters.
    path: the `.npz` file written.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})


def load_reference(path: str, like: PyTree) -> PyTree:
  """Read `save_reference`'s file into the structure of `like` (shapes checked).

  Args:
    path: the `.npz` file.
    like: a tree with the expected structure and shapes.

  Returns:
    The reference, structured like `like`.
  """
  import os

  if not os.path.exists(path):
    raise FileNotFoundError(f"weight-distillation reference not found: {path}")
  flat, treedef = jax.tree_util.tree_flatten_with_path(like)
  with np.load(path) as z:
    names = [jax.tree_util.keystr(k) for k, _ in flat]
    missing = [n for n in names if n not in z.files]
    if missing or len(z.files) != len(names):
      raise ValueError(
        f"reference {path} does not match the trainable parameters "
        f"(missing {missing[:3]}, {len(z.files)} arrays for {len(names)})"
      )
    leaves = []
    for n, (_, v) in zip(names, flat):
      if z[n].shape != v.shape:
        raise ValueError(f"reference {path}: {n} has shape {z[n].shape}, expected {v.shape}")
      leaves.append(jnp.asarray(z[n], v.dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)
