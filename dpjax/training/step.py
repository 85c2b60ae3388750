"""The pure private step: accumulate clipped sums, perturb (DP-SAM), apply noise and the optimizer.

One logical step of DP-SGD (arXiv 1607.00133), as three pure functions of
arrays and a `dpjax.training.plan.PrivacyPlan`:

    gsum = sum over physical batches of accumulate(...)   clipped sums, fixed shapes
    at   = perturb(params, opt_state, ascent_sum, step)    DP-SAM's point (theta if none)
    state <- apply(state, gsum)                            noise once -> normalize -> optimizer

`accumulate` and `perturb` are jitted here with the plan (and the loss) as
static arguments; the driver (`dpjax.training.loop`) compiles the step ahead
of time for the state's placement, with the state and the gradient sum
donated. Nothing here reads the sampler, the clock or a file.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from dpjax.methods import flatness

PyTree = Any


class TrainState(NamedTuple):
  params: PyTree
  opt_state: PyTree
  step: jax.Array  # int32 scalar: logical steps taken


def _plain_grad(loss_fn: Callable, params, frozen, batch, mask):
  def total(p):
    loss, metrics = jax.vmap(loss_fn, in_axes=(None, 0, None))(p, batch, frozen)
    return jnp.sum(jnp.where(mask > 0, loss, 0.0)), (loss, metrics)

  g, (loss, metrics) = jax.grad(total, has_aux=True)(params)
  dropped = jnp.sum(jnp.where(mask > 0, ~jnp.isfinite(loss), False))
  return g, loss, metrics, dropped


@functools.partial(jax.jit, static_argnames=("plan", "loss_fn"))
def accumulate(
  gsum: PyTree,
  params: PyTree,
  frozen: PyTree,
  batch: PyTree,
  mask: jax.Array,
  clip_norm: Optional[jax.Array] = None,
  *,
  plan,
  loss_fn: Callable,
) -> Tuple[PyTree, Dict[str, jax.Array]]:
  """`gsum` + the (clipped, when private) gradient sum of one physical batch, and its stats.

  Private plans clip each unit with `plan.grad_fn` (units with a non-finite
  loss or gradient contribute zero and are counted in `dropped_units`); a
  non-private plan sums plain per-example gradients. Stats are masked sums
  over the batch's units (not privatised: monitoring only).

  Args:
    gsum: the running sum.
    params: the trainable parameters (where the gradient is taken).
    frozen: the frozen parameters.
    batch: one physical batch of units.
    mask: [P], 1 for a real unit.
    clip_norm: this step's adaptive clip norm (`PrivacyPlan.clip_norm_now`), or
      None for the plan's fixed bound.
    plan: the PrivacyPlan.
    loss_fn: the task's per-example loss.

  Returns:
    (the new sum, {"loss", the task's metrics, "dropped_units", and for a
    private plan "unclipped_units"}: masked sums).
  """
  unclipped = None
  if plan.grad_fn is not None:
    g, aux = plan.grad_fn(params, batch, frozen, mask=mask, clip_norm=clip_norm)
    loss, metrics, dropped = aux.loss, aux.loss_aux, aux.num_dropped
    unclipped = aux.num_unclipped
  else:
    g, loss, metrics, dropped = _plain_grad(loss_fn, params, frozen, batch, mask)
  stats = {
    k: jnp.sum(jnp.where((mask > 0) & jnp.isfinite(v), v, 0.0))
    for k, v in dict(metrics, loss=loss).items()
  }
  stats["dropped_units"] = dropped.astype(jnp.float32)
  if unclipped is not None:
    stats["unclipped_units"] = unclipped.astype(jnp.float32)
  return jax.tree.map(jnp.add, gsum, g), stats


@functools.partial(jax.jit, static_argnames=("plan",))
def perturb(
  params: PyTree, opt_state: PyTree, ascent_sum: Optional[PyTree], step: jax.Array, *, plan
) -> PyTree:
  """Where this step's gradient is taken: theta, or DP-SAM's theta + v.

  DP-SAM's state (inside `opt_state`) holds the last released gradient for
  the free mode; in the charged mode `ascent_sum` is the clipped sum of an
  independent batch, privatised here with the plan's mechanism and a key of
  its own stream (`plan.secret.ascent_key(plan.stream)` folded with the step), and the
  plan charges it (`PrivacyPlan.ascent_releases`). The caller passes
  `ascent_sum` exactly when the plan charges an ascent release this step.

  Args:
    params: theta.
    opt_state: the optimizer state.
    ascent_sum: the charged ascent batch's clipped sum, or None.
    step: the step (for the ascent key).
    plan: the PrivacyPlan.

  Returns:
    The parameters to take this step's gradient at.
  """
  sam = plan.sam
  if sam is None:
    return params
  state = flatness.find_state(opt_state)
  if ascent_sum is None:
    if sam.charged:  # past active_steps: no ascent, no perturbation
      return params
    return sam.perturb(params, state)
  noise = plan.noise_transform(jax.random.fold_in(plan.secret.ascent_key(plan.stream), step))
  direction, _ = noise.update(ascent_sum, noise.init(ascent_sum))
  return sam.perturb(params, state, direction=direction)


def apply_update(
  state: TrainState, gsum: PyTree, tx: optax.GradientTransformation, **extra_args
) -> TrainState:
  """Noise once on the global sum, then normalise and the optimizer (all inside `tx`).

  Args:
    state: the TrainState.
    gsum: the global (clipped) gradient sum of the logical batch.
    tx: the plan's transform (`PrivacyPlan.transform`).
    **extra_args: passed to `tx.update` (adaptive clipping's `quantile_count`, and
      DP-AdamBC's `noise_variance` with it).

  Returns:
    The next TrainState.
  """
  updates, opt_state = tx.update(gsum, state.opt_state, state.params, **extra_args)
  return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
