"""Placing fixed-shape batches on a device `Mesh` (one host or many).

The private step is jitted once with `NamedSharding`s: the batch's leading
(privacy-unit) axis is split over the mesh's "data" axis, parameters and
optimizer state are replicated. `clipped_grad` sums over units, so XLA
inserts the cross-device reduction; the noise transform then draws ONE noise
vector from its (replicated) key for the global sum, identical on every
device and host, never per device.

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


def make_mesh(devices: Optional[Sequence[jax.Device]] = None, axis: str = "data") -> Mesh:
  """A 1-D data-parallel mesh over `devices` (default: all)."""
  devs = np.asarray(list(devices) if devices is not None else jax.devices())
  return Mesh(devs, (axis,))


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(axis))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _process_slice(n: int) -> slice:
  per = n // jax.process_count()
  i = jax.process_index()
  return slice(i * per, (i + 1) * per)


def shard_batch(batch: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
  """The GLOBAL host batch (same on every process) -> arrays split over `axis`.

  The leading dimension must divide by the number of devices on `axis`.
  """
  n_dev = mesh.shape[axis]
  sharding = batch_sharding(mesh, axis)

  def put(x):
    x = np.asarray(x)
    if x.shape[0] % n_dev:
      raise ValueError(f"batch leading dimension {x.shape[0]} is not divisible by the "
                       f"{n_dev} devices of mesh axis {axis!r}; pick a physical batch size "
                       f"that is a multiple of {n_dev}")
    local = x[_process_slice(x.shape[0])]
    return jax.make_array_from_process_local_data(sharding, local, x.shape)

  return jax.tree.map(put, batch)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  return jax.device_put(tree, replicated(mesh))
