"""The compiled step: the state in its placement, and one logical step compiled once for it.

`Placement.of(task, tx, mesh)` says where the train state lives (its abstract
shapes with shardings); `init_or_restore` makes it there, or reads a
checkpoint straight onto its devices; `compile_step` lowers and compiles the
step's pieces ahead of time for that placement, with the state donated, and
returns the `CompiledStep` whose `run(state, i)` is step i: DP-SAM's point,
the clipped sum over the sampled physical batches, then the update (noise
-> normalize -> optimizer). Nothing in it reads the devices.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dpjax.core.accounting.ledger import Ledger
from dpjax.core.clipping import GroupUnits
from dpjax.training import rundir
from dpjax.training import sharding as shard_lib
from dpjax.training.privacy_plan import PrivacyPlan
from dpjax.training.step import TrainState, accumulate, apply_update, perturb
from dpjax.training.task import Task, make_eval_fn, take

PyTree = Any


class Sums(NamedTuple):
  """One logical step's clipped sum and stats, still on the devices."""

  gsum: PyTree
  stats: Dict[str, jax.Array]  # summed over the step's physical batches
  units: float  # sampled units (host: from the sampler's masks)
  examples: int  # examples in them


@jax.jit
def add_trees(a: PyTree, b: PyTree) -> PyTree:
  """`a + b` leaf by leaf (jitted: one dispatch for a tree of device arrays).

  Args:
    a: a tree of arrays.
    b: a tree of the same structure.

  Returns:
    Their sum.
  """
  return jax.tree.map(jnp.add, a, b)


class Placement(NamedTuple):
  """Where the state lives: its abstract shapes with shardings, and how to make it there."""

  init: Callable  # params -> a fresh TrainState
  target: PyTree  # TrainState of ShapeDtypeStructs with shardings
  shardings: PyTree  # TrainState of shardings
  scalar: jax.sharding.Sharding  # a replicated scalar's

  @staticmethod
  def of(task: Task, tx, mesh: Optional[Mesh]) -> Placement:
    """The placement of `task`'s state under `tx` on `mesh`.

    Args:
      task: the task (its parameters' shapes).
      tx: the private optimizer (its state's shapes).
      mesh: the device mesh, or None (one device).

    Returns:
      The Placement (parameters split over the mesh's "model" axis, if any).
    """

    def init(params):
      params = jax.tree.map(jnp.copy, params)  # buffers of its own: the step donates them
      return TrainState(params, tx.init(params), jnp.zeros([], jnp.int32))

    abstract = jax.eval_shape(init, task.params)
    if mesh is not None:
      shardings = shard_lib.param_sharding(abstract, mesh)  # replicated on a data-only mesh
      scalar = shard_lib.replicated(mesh)
    else:
      scalar = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree.map(lambda _: scalar, abstract)
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return Placement(init, target, shardings, scalar)


def init_or_restore(
  plan: PrivacyPlan,
  task: Task,
  place: Placement,
  ckpt: Optional[rundir.Checkpoints],
  meta,
  end: int,
) -> TrainState:
  """The state to start from, made or read straight into its placement.

  A fresh run's state is saved at once with the secret (before anything is
  released); a resumed one is rekeyed to this segment's stream (a new segment
  draws its own noise: the restored key is the old segment's).

  Args:
    plan: the privacy plan.
    task: the task (its initial parameters).
    place: the placement.
    ckpt: the run's checkpoints, or None.
    meta: the checkpoint's metadata to resume from, or None.
    end: the step the run stops after (recorded with the first save).

  Returns:
    The TrainState.
  """
  if meta is not None:  # every array read straight onto its devices
    state = ckpt.restore(place.target)
    return state._replace(opt_state=plan.rekey(state.opt_state, meta["stream"]))
  state = jax.jit(place.init, out_shardings=place.shardings)(task.params)
  if ckpt is not None:  # the secret is kept before anything is released
    ckpt.save(state, Ledger(), plan.secret, stream=plan.stream, end=end, wait=True)
  return state


class CompiledStep:
  """One logical step, compiled once (ahead of time) for the state's placement.

  `run(state, i)` is step i: DP-SAM's point (charged mode: from an
  independent draw of its own), the clipped sum over the sampled physical
  batches, then the update (noise -> normalize -> optimizer). Nothing is read
  from the devices.
  """

  def __init__(self, spec, plan: PrivacyPlan, task: Task, zeros, acc, update, at_fn, host_batch):
    self.spec, self.plan, self.task = spec, plan, task
    self.zeros, self.acc, self.update, self.at_fn = zeros, acc, update, at_fn
    self.host_batch = host_batch
    # charged DP-SAM's independent draw: jitted (not AOT), its clipped sum at the plan's bound
    self.ascent_fn = functools.partial(accumulate, plan=plan, loss_fn=task.loss_fn)
    self.eval_fn = make_eval_fn(task) if task.splits else None  # compiled once, at first use
    self.compile_s = 0.0

  def summed(self, params, batches, clip_norm=None, fn=None) -> Sums:
    """The gradient sum over a step's physical batches, and their stats, on the devices.

    Args:
      params: the parameters the gradients are taken at.
      batches: the sampler's physical batches of the step.
      clip_norm: adaptive clipping's current clip norm, or None.
      fn: the accumulation to use (default: the compiled one).

    Returns:
      The `Sums`.
    """
    gsum, stats, units, examples = self.zeros(params), None, 0.0, 0
    for pb in batches:
      gsum, s = (fn or self.acc)(gsum, params, self.task.frozen, *self.host_batch(pb), clip_norm)
      stats = s if stats is None else add_trees(stats, s)
      units += float(pb.mask.sum())
      examples += int(pb.example_mask.sum() if self.plan.per_user else pb.mask.sum())
    return Sums(gsum, stats, units, examples)

  def run(self, state: TrainState, i: int) -> Tuple[TrainState, Sums]:
    """Step i from `state` (donated).

    Args:
      state: the state after i steps.
      i: the step's index.

    Returns:
      (the state after step i, the step's sums).
    """
    plan, at = self.plan, state.params
    if self.at_fn is not None:
      ascent = None
      if plan.ascent_releases(i, i + 1):  # charged DP-SAM: an independent draw
        ascent = self.summed(state.params, plan.sampler.batches(i, draw=1), fn=self.ascent_fn).gsum
      at = self.at_fn(state.params, state.opt_state, ascent, state.step)
    clip_norm = plan.clip_norm_now(state.opt_state)
    sums = self.summed(at, plan.sampler.batches(i), clip_norm)
    extra = {}
    if clip_norm is not None:  # sum_i (1[||g_i|| <= C] - 1/2) over the kept units, noised in tx
      kept = sums.units - sums.stats["dropped_units"]
      extra["quantile_count"] = (sums.stats["unclipped_units"] - 0.5 * kept).astype(jnp.float32)
      if self.spec.optimizer == "adam_bc":  # this step's (sigma_g C_t / B)^2, for DP-AdamBC
        extra["noise_variance"] = plan.noise_variance(clip_norm).astype(jnp.float32)
    return self.update(state, sums.gsum, **extra), sums


def compile_step(
  spec, plan: PrivacyPlan, task: Task, tx, place: Placement, mesh, state: TrainState, start: int
) -> CompiledStep:
  """The step's pieces, lowered and compiled for the state's placement (the state donated).

  Args:
    spec: the validated spec.
    plan: the privacy plan.
    task: the task.
    tx: the private optimizer (`plan.transform`).
    place: the state's placement.
    mesh: the device mesh, or None.
    state: the state (for the current clip norm of adaptive clipping).
    start: the first step (its batches give the shapes).

  Returns:
    The `CompiledStep`, with the seconds compiling took.
  """
  t = time.perf_counter()

  def host_batch(pb):
    """A sampler's physical batch -> (device batch, unit mask)."""
    batch = take(task.train, pb.indices)  # [P, ...] or [P, G, ...]
    if plan.per_user:  # [P, G, ...] examples of P users and which of them are real
      batch = GroupUnits(batch, jax.device_put(pb.example_mask))
    mask = jax.device_put(pb.mask)
    if mesh is not None:
      batch, mask = shard_lib.shard_batch(batch, mesh), shard_lib.shard_batch(mask, mesh)
    return batch, mask

  target, shardings, scalar = place.target, place.shardings, place.scalar
  zeros = (
    jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p), out_shardings=shardings.params)
    .lower(target.params)
    .compile()
  )
  clip_now = plan.clip_norm_now(state.opt_state)
  first = host_batch(plan.sampler.batches(start)[0])
  acc = (
    jax.jit(
      functools.partial(accumulate, plan=plan, loss_fn=task.loss_fn),
      out_shardings=(shardings.params, scalar),
      donate_argnums=0,
    )
    .lower(target.params, target.params, task.frozen, *first, clip_now)
    .compile()
  )
  extra = {}
  if clip_now is not None:
    extra["quantile_count"] = jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar)
    if spec.optimizer == "adam_bc":
      extra["noise_variance"] = extra["quantile_count"]
  update = (
    jax.jit(functools.partial(apply_update, tx=tx), out_shardings=shardings, donate_argnums=0)
    .lower(target, target.params, **extra)
    .compile()
  )
  at_fn = None
  if plan.sam is not None:
    at_fn = jax.jit(functools.partial(perturb, plan=plan), out_shardings=shardings.params)
  step = CompiledStep(spec, plan, task, zeros, acc, update, at_fn, host_batch)
  step.compile_s = time.perf_counter() - t
  return step
