"""What the loop trains (`Task`), how it is evaluated, and the checks of a task before a run.

A `Task` is a per-example loss over trainable parameters and data; the
checks here refuse what would train silently wrong (non-finite data, labels
out of range, empty splits) or could not fit the machine (per-example
gradients larger than the devices' memory), before anything is written.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Dict, Iterator, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpjax.core.sampling import eval_batches
from dpjax.methods import flatness
from dpjax.training.spec import SpecError

PyTree = Any


class Task(NamedTuple):
  """What the loop trains: a per-example loss over trainable params and data.

  Attributes:
    name: a short name for logs.
    params: the initial trainable parameters (the only ones clipped, noised
      and updated).
    frozen: parameters passed to the loss but never trained.
    loss_fn: `(params, example, frozen) -> (loss, metrics)` for ONE example
      (no batch axis); `metrics` is a dict of scalars (e.g. accuracy).
    train: the private training split, a dict of `[N, ...]` arrays.
    splits: held-out splits by name (e.g. "dev", "test"), same layout.
    user_ids: `[N]` user of each training example (user-level DP only).
    info: task facts other stages need (e.g. a language model's "decoder"
      config and its "encode(texts, seq_len)" function), or None.
  """

  name: str
  params: PyTree
  frozen: PyTree
  loss_fn: Callable
  train: Dict[str, np.ndarray]
  splits: Dict[str, Dict[str, np.ndarray]]
  user_ids: Optional[np.ndarray] = None
  info: Optional[Dict[str, Any]] = None


def take(data: Dict[str, np.ndarray], idx: np.ndarray) -> Dict[str, jax.Array]:
  """Rows `idx` of every array of a split, on the default device.

  Args:
    data: a split ({field: [N, ...] array}).
    idx: the row indices.

  Returns:
    {field: the rows, as a device array}.
  """
  return {k: jax.device_put(np.asarray(v)[idx]) for k, v in data.items()}


def num_rows(data: Dict[str, np.ndarray]) -> int:
  """The rows of a split.

  Args:
    data: a split ({field: [N, ...] array}).

  Returns:
    N, the length of its first array.
  """
  return len(next(iter(data.values())))


def make_eval_fn(task: Task) -> Callable:
  """Jitted `(params, batch, mask) -> summed metrics` over a masked batch.

  Args:
    task: the task whose loss and metrics are evaluated.

  Returns:
    The jitted function (metrics include "loss").
  """

  def per_example(params, ex):
    loss, metrics = task.loss_fn(params, ex, task.frozen)
    return dict(metrics, loss=loss)

  @jax.jit
  def eval_fn(params, batch, mask):
    out = jax.vmap(per_example, in_axes=(None, 0))(params, batch)
    return {k: jnp.sum(jnp.where(mask > 0, v, 0.0)) for k, v in out.items()}

  return eval_fn


def evaluate(
  task: Task, params: PyTree, split: str, batch_size: int, eval_fn: Optional[Callable] = None
) -> Dict[str, float]:
  """Mean metrics of `params` over one held-out split.

  Args:
    task: the task.
    params: the trainable parameters.
    split: the split's name in `task.splits`.
    batch_size: the eval batch size.
    eval_fn: a `make_eval_fn(task)` to reuse (compiled once), or None.

  Returns:
    {metric: mean over the split's units}.
  """
  data = task.splits[split]
  eval_fn = eval_fn or make_eval_fn(task)
  n = num_rows(data)
  totals: Dict[str, float] = {}
  for pb in eval_batches(n, batch_size):
    out = eval_fn(params, take(data, pb.indices), jnp.asarray(pb.mask))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return {k: v / n for k, v in totals.items()}


def check_task_data(task: Task) -> None:
  """Refuses data that would train silently wrong: non-finite values, labels out of range, empty.

  Labels are checked when `task.info["num_classes"]` says how many there are.

  Args:
    task: the task whose data is checked (raises ValueError naming the split,
      the field and the first bad row).
  """
  classes = (task.info or {}).get("num_classes")
  for name, data in {"train": task.train, **task.splits}.items():
    if not data or num_rows(data) == 0:
      raise SpecError(f"task {task.name!r}: the {name} split is empty")
    for key, arr in data.items():
      rows = np.asarray(arr).reshape(len(arr), -1)
      if rows.dtype.kind == "f":
        for lo in range(0, len(rows), 4096):  # chunks: no full-size boolean copy
          bad = ~np.isfinite(rows[lo : lo + 4096])
          if bad.any():
            i = int(np.argmax(bad.any(axis=1)))
            raise SpecError(
              f"task {task.name!r}: {name} row {lo + i}, {key!r} holds "
              f"{rows[lo + i][bad[i]][0]} (values must be finite)"
            )
      if key == "label" and classes is not None:
        bad = np.flatnonzero((rows < 0).any(axis=1) | (rows >= classes).any(axis=1))
        if len(bad):
          raise SpecError(
            f"task {task.name!r}: {name} row {int(bad[0])} has label "
            f"{rows[bad[0]][0]}, outside [0, {classes - 1}] ({classes} classes)"
          )


def available_memory() -> Optional[int]:
  """Bytes the local devices can hold: their allocators' limits, or the host's available memory
  for CPU devices (None when neither says)."""
  limits = [(d.memory_stats() or {}).get("bytes_limit") for d in jax.local_devices()]
  if all(limits):
    return int(sum(limits))
  try:
    with open("/proc/meminfo") as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
  except (OSError, StopIteration, ValueError):
    return None


def check_fits(spec, task: Task) -> None:
  """Refuses a private step whose per-example gradients alone exceed the devices' memory.

  The vmap path holds one gradient per example of a microbatch (the physical
  batch unless `microbatch_size`) at once: that many float32 copies of the
  trained parameters. A step that needs more than the local devices hold
  (all of them together: the check never refuses a step a mesh could shard)
  would fail at its first allocation, after the task was built and files were
  written; it is refused here in one line. Ghost clipping holds no
  per-example gradients and is not checked.

  Args:
    spec: the validated spec.
    task: the task (its trained parameters).
  """
  if not spec.private or spec.clipping_method != "vmap":
    return
  per = int(spec.microbatch_size or spec.physical_batch_size)
  trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(task.params))
  need, have = per * trained * 4, available_memory()
  if have is not None and need > have:
    fits = max(have // (trained * 4), 0)
    raise SpecError(
      f"{'microbatch_size' if spec.microbatch_size else 'physical_batch_size'}={per} holds "
      f"{per} per-example gradients of {trained:,} trained parameters at once "
      f"({need / 2**30:.1f} GiB), more than the {have / 2**30:.1f} GiB this machine's devices "
      f"can hold: set microbatch_size to at most {fits}, or clipping_method='ghost'"
    )


def with_weight_anchor(cfg, task: Task) -> Task:
  """`cfg.weight_anchor` = dict(lam, reference): lam * ||theta - reference|| in each example's loss.

  DP-Flat's "weight knowledge distillation" (a pull towards reference weights,
  not DistilDP's distillation through synthetic text).

  reference: "init" (the task's initial trainable parameters, e.g. public
  pretrained weights: free) or a path written by `flatness.save_reference`
  (a public or DP-trained copy; its own budget is the caller's to account).

  Args:
    cfg: the validated spec.
    task: the task.

  Returns:
    The task with the term added to its loss (unchanged without the key).
  """
  anchor = cfg.weight_anchor  # checked by `spec.validate`: lam and reference
  if not anchor:
    return task
  if anchor["reference"] == "init":
    ref = task.params
  else:
    ref = flatness.load_reference(anchor["reference"], task.params)
  return task._replace(loss_fn=flatness.weight_anchor(task.loss_fn, ref, anchor["lam"]))


def task_section(section, defaults: Mapping[str, Any]) -> ml_collections.FrozenConfigDict:
  """A config's task section with every optional key a task declares present.

  Each task declares its optional keys and their defaults once (a
  module-level `DEFAULTS`), and its builder reads every key as an
  attribute: what a key means without a value is written in one place.

  Args:
    section: the config's task section (a ConfigDict or a dict).
    defaults: the task's optional keys -> their defaults.

  Returns:
    The section, frozen, with the defaults where it sets none.
  """
  given = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  return ml_collections.FrozenConfigDict({**defaults, **given})


# Where a task builder may keep what it derives from the training data (frozen features of
# private rows): the run's own directory, set by whoever builds the task for a run.
_DERIVED_DIR: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
  "dpjax_derived_dir", default=None
)


@contextlib.contextmanager
def derived_data_dir(path: Optional[str]) -> Iterator[None]:
  """Within: task builders keep what they derive from the training data under `path`.

  `dpjax train` builds its task inside `derived_data_dir(<run dir>/features)`,
  so features of private data live with the run (owner-only, removed with it)
  and nowhere else; outside any (None), a builder keeps them in memory only.

  Args:
    path: the directory (created owner-only when first written), or None.
  """
  token = _DERIVED_DIR.set(path)
  try:
    yield
  finally:
    _DERIVED_DIR.reset(token)


def derived_dir() -> Optional[str]:
  """The directory of `derived_data_dir` in force, or None (keep derived data in memory).

  Returns:
    The path, or None.
  """
  return _DERIVED_DIR.get()
