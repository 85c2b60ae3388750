"""Placing fixed-shape batches on a device `Mesh` (one host or many).

The private step is jitted once with `NamedSharding`s: the batch's leading
(privacy-unit) axis is split over the mesh's "data" axis; parameters and
optimizer state are replicated, or, on a 2-D `("data", "model")` mesh, split
over "model" FSDP-style (`shard_params`). `clipped_grad` sums over units, so
XLA inserts the cross-device reduction; the noise transform then draws ONE
noise vector from its (replicated) key for the global sum. JAX's random bits
do not depend on how the output is sharded, so every device computes its
slice of the same vector a single device would draw: never noise per device.

Multi-host: call `jax.distributed.initialize()` first; every process samples
the same global index batch (samplers are pure in (seed, step)) and feeds only
its slice, which `shard_batch` assembles with
`jax.make_array_from_process_local_data`.

The vmap sharp edge: inside `loss_fn` under `jax.vmap`, arrays have no unit
axis (batch 1 per call), so a `with_sharding_constraint` on the batch axis
there is meaningless. dpjax never constrains inside the per-unit loss: the
sharding is declared once on the batch entering the jitted step.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any


MODEL_AXIS = "model"


def make_mesh(
  devices: Optional[Sequence[jax.Device]] = None, axis: str = "data", model: int = 1
) -> Mesh:
  """A data-parallel mesh over `devices` (default: all).

  Built by `jax.make_mesh` (which orders the devices by the physical
  topology). With `model` > 1 the mesh is 2-D, `(axis, "model")` of shape
  `(n // model, model)`: batches split over `axis`, parameters and optimizer
  state split over "model" (`shard_params`, FSDP-style).

  Args:
    devices: the devices (default: `jax.devices()`).
    axis: the batch axis's name.
    model: the size of the "model" axis.

  Returns:
    The Mesh.
  """
  devs = list(devices) if devices is not None else jax.devices()
  if model < 1 or len(devs) % model:
    raise ValueError(f"model={model} must be >= 1 and divide the {len(devs)} devices")
  if model == 1:
    shape, names = (len(devs),), (axis,)
  else:
    shape, names = (len(devs) // model, model), (axis, MODEL_AXIS)
  # Auto axes: shardings are declared on the step's inputs and outputs, not in the types.
  auto = (jax.sharding.AxisType.Auto,) * len(names)
  return jax.make_mesh(shape, names, axis_types=auto, devices=devs)


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
  """A sharding splitting the leading (batch) dimension over `axis`.

  Args:
    mesh: the mesh.
    axis: the batch axis.

  Returns:
    The NamedSharding.
  """
  return NamedSharding(mesh, PartitionSpec(axis))


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding holding a full copy on every device of `mesh`.

  Args:
    mesh: the mesh.

  Returns:
    The NamedSharding.
  """
  return NamedSharding(mesh, PartitionSpec())


def _process_slice(n: int) -> slice:
  per = n // jax.process_count()
  i = jax.process_index()
  return slice(i * per, (i + 1) * per)


def shard_batch(batch: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
  """The GLOBAL host batch (same on every process) -> arrays split over `axis`.

  The leading dimension must divide by the number of devices on `axis`.

  Args:
    batch: a pytree of host arrays [B, ...].
    mesh: the mesh.
    axis: the batch axis.

  Returns:
    The batch as global jax Arrays.
  """
  n_dev = mesh.shape[axis]
  sharding = batch_sharding(mesh, axis)

  def put(x):
    x = np.asarray(x)
    if x.shape[0] % n_dev:
      raise ValueError(
        f"batch leading dimension {x.shape[0]} is not divisible by the "
        f"{n_dev} devices of mesh axis {axis!r}; pick a physical batch size "
        f"that is a multiple of {n_dev}"
      )
    local = x[_process_slice(x.shape[0])]
    return jax.make_array_from_process_local_data(sharding, local, x.shape)

  return jax.tree.map(put, batch)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places `tree` on every device of `mesh`.

  Args:
    tree: a pytree of arrays.
    mesh: the mesh.

  Returns:
    The replicated tree.
  """
  return jax.device_put(tree, replicated(mesh))


def param_sharding(tree: PyTree, mesh: Mesh, axis: str = MODEL_AXIS) -> PyTree:
  """FSDP-style shardings: each array split over `axis` along its largest divisible dim.

  Arrays with no dimension divisible by the axis size (scalars, odd shapes)
  are replicated. A 1-D mesh (no `axis`) replicates everything.

  Args:
    tree: a pytree of arrays.
    mesh: the mesh.
    axis: the parameter axis.

  Returns:
    A tree of NamedShardings.
  """
  if axis not in mesh.axis_names:
    return jax.tree.map(lambda _: replicated(mesh), tree)
  n = mesh.shape[axis]

  def one(x):
    shape = np.shape(x)
    dims = [d for d in np.argsort(shape)[::-1] if shape[d] % n == 0 and shape[d] >= n]
    if not dims:
      return replicated(mesh)
    spec = [None] * len(shape)
    spec[int(dims[0])] = axis
    return NamedSharding(mesh, PartitionSpec(*spec))

  return jax.tree.map(one, tree)


def shard_params(tree: PyTree, mesh: Mesh, axis: str = MODEL_AXIS) -> PyTree:
  """Places `tree` (parameters, optimizer state) with `param_sharding`.

  Args:
    tree: a pytree of arrays.
    mesh: the mesh.
    axis: the parameter axis.

  Returns:
    The placed tree.
  """
  return jax.device_put(tree, param_sharding(tree, mesh, axis))
