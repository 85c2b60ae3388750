"""`dpjax.training.loop`: the convenience driver, built only from dpjax's public parts.

    spec  = spec.validate(cfg)                every key declared, checked before compute
    plan  = plan.make_plan(spec, task, ...)   sampler, clipping, noise, unit, accountant
    for each step:                            the pure step (dpjax.training.step)
      gsum  = sum of accumulate(...) over the sampled physical batches
      at    = perturb(params, opt_state, ascent, step)   DP-SAM's point, theta without it
      state = apply(state, gsum)              noise once -> normalize -> optimizer
      callbacks: checkpoint (with the ledger), metrics.jsonl, privacy.json, progress

The privacy unit is `privacy_unit`: "example", or "user" (the task then
carries `user_ids`; each user is capped to `max_examples_per_user` = G
examples before sampling; `user_sampling` "els" samples the kept examples
and clips each, "uls" samples users and clips each user's mean; see
`dpjax.core.accounting.user_level`). Every epsilon logged is per that unit and is
the composition of the run's ledger (`dpjax.core.accounting.ledger`). With
`data_devices` = n > 1, batches are split over a data mesh of n devices
(`dpjax.training.sharding`); with `model_devices` = m > 1 too, the mesh is
n x m and parameters and optimizer state are split over its "model" axis.
Under `jax.distributed` the mesh spans every process's devices (all on the
data axis unless `model_devices` is set), and process 0's fresh secret is
broadcast so that every process samples the same batches and draws the same
noise. Noise is still one draw on the global sum.

The state is created (`jax.jit(init, out_shardings=...)`) and restored (orbax,
with the target shardings) directly in its placement; the step is compiled
once ahead of time with the state donated; statistics stay on the devices
and are read only at log and checkpoint steps; checkpoints are written in
the background.

The run directory is described in `dpjax.training.rundir`; it is locked
before anything in it is read, and created owner-only. A resumed run
continues the same noise and batches; one that would change what its
guarantee depends on (`spec.privacy_spec`) is refused unless allowed, and
then appends a ledger segment with noise and batches of its own stream.
The whole planned ledger is accounted before the first step.

Training loss and accuracy logged here are computed on private data and are
NOT privatised: they are for monitoring, not for release.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from dpjax.core import accounting
from dpjax.core.accounting.ledger import Ledger
from dpjax.core.clipping import GroupUnits
from dpjax.core.sampling import eval_batches
from dpjax.methods import dp_adam, flatness
from dpjax.training import rundir
from dpjax.training import sharding as shard_lib
from dpjax.training import spec as spec_lib
from dpjax.training.plan import PrivacyPlan, ResumeRefused, Secret, make_plan
from dpjax.training.spec import SpecError
from dpjax.training.step import TrainState, accumulate, apply_update, perturb

PyTree = Any
_JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:2])


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


def make_optimizer(
  name: str,
  learning_rate: float,
  weight_decay: float = 0.0,
  warmup_steps: int = 0,
  total_steps: int = 0,
  learning_rates: dict | None = None,
  noise_variance: Optional[float] = 0.0,
) -> optax.GradientTransformation:
  """The optax optimizer of a config's `optimizer` / `learning_rate` keys.

  `learning_rates` maps a prefix of a top-level parameter name to its own
  learning rate (e.g. {"layer_": 1e-3} for encoder layers beside a head at
  `learning_rate`); the longest matching prefix wins, the rest use `learning_rate`.

  Args:
    name: "adamw", "adam", "adam_bc" (DP-AdamBC, `dpjax.methods.dp_adam`) or
      "sgd" (momentum 0.9).
    learning_rate: the peak learning rate.
    weight_decay: AdamW's decoupled weight decay.
    warmup_steps: warm-up steps of a warm-up + cosine schedule (0: constant).
    total_steps: the run's steps (the cosine ends there at 0.1 x the peak).
    learning_rates: {parameter-name prefix: learning rate}, or None.
    noise_variance: the per-coordinate noise variance of the updates
      (`PrivacyPlan.noise_variance`), which "adam_bc" removes; None: it is
      given with each update (`update(..., noise_variance=Phi_t)`).

  Returns:
    The optax optimizer.
  """
  if learning_rates:
    rates = {str(k): float(v) for k, v in learning_rates.items()}
    for k, v in rates.items():
      if not k or not v > 0:
        raise ValueError(
          f"learning_rates needs non-empty name prefixes and positive rates, got {k!r}: {v}"
        )
    # label "" = the default group (an empty prefix is refused above, so it cannot collide)
    txs = {
      "": make_optimizer(
        name, learning_rate, weight_decay, warmup_steps, total_steps, noise_variance=noise_variance
      )
    }
    txs.update(
      {
        k: make_optimizer(
          name, v, weight_decay, warmup_steps, total_steps, noise_variance=noise_variance
        )
        for k, v in rates.items()
      }
    )

    def labels(params):
      if not isinstance(params, dict):
        raise ValueError("learning_rates needs a dict of parameters (top-level names)")

      def label(top):
        hits = [k for k in rates if top.startswith(k)]
        return max(hits, key=len) if hits else ""

      return {top: jax.tree.map(lambda _, l=label(top): l, sub) for top, sub in params.items()}

    return optax.multi_transform(txs, labels)
  if warmup_steps > 0 and total_steps > warmup_steps:
    lr = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps, total_steps, end_value=learning_rate * 0.1
    )
  else:
    lr = learning_rate
  if name == "adamw":
    return optax.adamw(lr, weight_decay=weight_decay)
  if name == "adam":
    return optax.adam(lr)
  if name == "sgd":
    return optax.sgd(lr, momentum=0.9)
  if name == "adam_bc":
    return dp_adam.dp_adam_bc(lr, noise_variance)
  raise ValueError(f"optimizer must be 'adamw', 'adam', 'adam_bc' or 'sgd', got {name!r}")


def _fixed_noise_variance(spec, plan) -> Optional[float]:
  """DP-AdamBC's Phi when it is fixed for the run; None when it comes with each update
  (adaptive clipping); 0 for the other optimizers, which do not read it (BandMF's and
  BLT's cost a pass over C^-1's coefficients)."""
  if spec.optimizer != "adam_bc":
    return 0.0
  return None if plan.adaptive is not None else plan.noise_variance()


def _take(data: Dict[str, np.ndarray], idx: np.ndarray) -> Dict[str, jax.Array]:
  return {k: jax.device_put(np.asarray(v)[idx]) for k, v in data.items()}


def _num_rows(data: Dict[str, np.ndarray]) -> int:
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
  n = _num_rows(data)
  totals: Dict[str, float] = {}
  for pb in eval_batches(n, batch_size):
    out = eval_fn(params, _take(data, pb.indices), jnp.asarray(pb.mask))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return {k: v / n for k, v in totals.items()}


@dataclasses.dataclass
class RunResult:
  params: PyTree
  final_metrics: Dict[str, Any]
  workdir: Optional[str]
  noise_multiplier: Optional[float] = None  # the sigma of the last segment; None if not private
  ledger: Ledger = Ledger()  # what the run released, all segments
  privacy: Optional[Dict[str, Any]] = None  # the privacy.json record


def check_task_data(task: Task) -> None:
  """Refuses data that would train silently wrong: non-finite values, labels out of range, empty.

  Labels are checked when `task.info["num_classes"]` says how many there are.

  Args:
    task: the task whose data is checked (raises ValueError naming the split,
      the field and the first bad row).
  """
  classes = (task.info or {}).get("num_classes")
  for name, data in {"train": task.train, **task.splits}.items():
    if not data or _num_rows(data) == 0:
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


def with_weight_distillation(cfg, task: Task) -> Task:
  """`cfg.weight_distillation` = dict(lam, reference): DP-Flat's term in every example's loss.

  reference: "init" (the task's initial trainable parameters, e.g. public
  pretrained weights: free) or a path written by `flatness.save_reference`
  (a public or DP-trained copy; its own budget is the caller's to account).

  Args:
    cfg: the train config.
    task: the task.

  Returns:
    The task with the term added to its loss (unchanged without the key).
  """
  spec = cfg.get("weight_distillation")
  if not spec:
    return task
  spec = dict(spec)
  if set(spec) != {"lam", "reference"}:
    raise ValueError(f"weight_distillation takes lam and reference; got {sorted(spec)}")
  if spec["reference"] == "init":
    ref = task.params
  else:
    ref = flatness.load_reference(spec["reference"], task.params)
  return task._replace(loss_fn=flatness.weight_distillation(task.loss_fn, ref, spec["lam"]))


class RunInterrupted(KeyboardInterrupt):
  """A run stopped by SIGTERM or SIGINT after the step in flight, with that step saved.

  Attributes:
    signum: the signal.
    step: the steps done (checkpointed with the ledger; privacy.json written).
    steps: the steps the run was to take.
    workdir: the run directory (None when the run wrote nothing).
  """

  def __init__(self, signum: int, step: int, steps: int, workdir: Optional[str]):
    self.signum, self.step, self.steps, self.workdir = signum, step, steps, workdir
    saved = f": checkpoint and privacy ledger saved in {workdir}" if workdir else ""
    name = signal.Signals(signum).name
    super().__init__(f"stopped by {name} after step {step} of {steps}{saved}")


class StopSignals:
  """Within: the first SIGTERM or SIGINT asks the loop to stop after the step in flight.

  A cluster scheduler sends SIGTERM before preemption, a user SIGINT: the
  run finishes its step, checkpoints it with the ledger and raises
  `RunInterrupted`. A second signal ends the process at once, leaving the
  last complete checkpoint (checkpoints appear only when whole). Outside
  the main thread (where Python cannot take signals) it does nothing.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: Optional[int] = None
    self._old: Dict[int, Any] = {}

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def _handle(self, signum, frame) -> None:
    if self.signum is not None:  # the second: now
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
    self.signum = signum
    print(
      f"dpjax: {signal.Signals(signum).name}: stopping after the step in flight "
      "(again to stop at once)",
      file=sys.stderr,
      flush=True,
    )

  def __exit__(self, *exc) -> None:
    for s, handler in self._old.items():
      signal.signal(s, handler)
    self._old = {}


def _resume_point(workdir: Optional[str]):
  """(checkpoint meta or None, the ledger privacy.json says ran or None, why it is None)."""
  if not workdir or not os.path.isdir(workdir):
    return None, None, "there is no run directory"
  meta = rundir.Checkpoints.latest_meta(workdir)
  path = os.path.join(workdir, "privacy.json")
  try:
    ran = rundir.read_json(path)
    ran_ledger = Ledger.from_json(ran["ledger"]) if ran and ran.get("ledger") else None
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    return meta, None, f"{path} is unreadable ({type(e).__name__}: {str(e)[:80]})"
  if ran is None:
    return meta, None, f"{path} is missing"
  if meta is None and ran_ledger is not None and ran_ledger.steps:
    raise ResumeRefused(
      f"{workdir} holds no checkpoint, but its privacy.json records {ran_ledger.steps} released "
      "steps: their ledger cannot be continued, and a fresh run would report only its own; "
      "restore the checkpoints directory, or start the new run in another workdir"
    )
  return meta, ran_ledger, None


def _one_secret(secret: Secret) -> Secret:
  """Process 0's fresh secret on every process (one noise and one sampling stream per run)."""
  if jax.process_count() == 1:
    return secret
  words = np.array([(secret.entropy >> (32 * i)) & 0xFFFFFFFF for i in range(4)], np.uint32)
  words = np.asarray(multihost_utils.broadcast_one_to_all(words))
  return Secret(sum(int(w) << (32 * i) for i, w in enumerate(words)), True)


def prepare(
  cfg,
  task: Task,
  workdir: Optional[str] = None,
  *,
  allow_privacy_change: bool = False,
  extra_event=None,
):
  """Validates `cfg` and `task` and makes the run's privacy plan; writes nothing.

  Returns (spec, plan, checkpoint meta or None). Every bad input raises here
  (a `ValueError` of one line), before any compute or file is written.

  Args:
    cfg: the train config.
    task: the task.
    workdir: the run directory (read for a checkpoint to resume), or None.
    allow_privacy_change: see `train`.
    extra_event: see `train`.

  Returns:
    (spec, plan, checkpoint meta or None).
  """
  spec = spec_lib.validate(spec_lib.with_defaults(cfg))
  check_task_data(task)
  meta, ran, no_ran = _resume_point(workdir)
  if workdir and meta is not None:
    rundir.check_same_run(workdir, spec.to_dict(), allow_privacy_change)
  if meta is None:
    if spec.noise_seed is not None:
      secret = Secret.from_seed(spec.noise_seed)
    else:
      secret = _one_secret(Secret.fresh())
    prior, start = Ledger(), 0
  else:
    secret, prior, start = meta["secret"], meta["ledger"], meta["step"]
  plan = make_plan(
    spec,
    task,
    secret=secret,
    prior=prior,
    start_step=start,
    allow_privacy_change=allow_privacy_change,
    extra_event=extra_event,
  )
  if plan.private and prior.segments:
    if plan.segment(plan.steps).privacy_key() != prior.segments[-1].privacy_key():
      # Steps that ran past the checkpoint released outputs under the old plan;
      # replaying them under a new one releases again (fresh draws): charge both.
      if ran is None:
        raise ResumeRefused(
          f"{no_ran}: the steps released past the checkpoint at step {start} cannot be "
          "counted, and a changed plan would release them again; restore privacy.json, or "
          "resume with the unchanged config first (its replayed steps draw the same noise: "
          "nothing is released twice), or use a new workdir"
        )
      if ran.steps > start:
        plan = make_plan(
          spec,
          task,
          secret=secret,
          prior=ran,
          start_step=start,
          allow_privacy_change=True,
          extra_event=extra_event,
        )
  check_fits(spec, task)  # after the plan's own size checks (a batch larger than the data)
  if plan.private:  # the whole planned ledger, accounted before any compute
    try:
      accounting.check_accountable(plan.ledger_at(plan.steps).event())
    except ValueError as e:
      raise SpecError(str(e)) from None
    eps = plan.epsilon_fields(plan.steps)["epsilon"]
    if not math.isfinite(eps):
      raise SpecError(
        f"the planned run's epsilon is {eps} ({plan.accountant}): it gives no guarantee; "
        "raise noise_multiplier or lower steps"
      )
  return spec, plan, meta


def train(
  cfg,
  task: Task,
  workdir: Optional[str] = None,
  *,
  progress: bool = True,
  stop_at_step: Optional[int] = None,
  allow_privacy_change: bool = False,
  extra_event=None,
  callbacks: Sequence[Callback] = (),
) -> RunResult:
  """Runs (or resumes) `cfg` on `task`, writing to `workdir` when given.

  `cfg` is a config (`ConfigDict` or dict) of the keys in `dpjax.training.spec.KEYS`
  (missing keys take their defaults). `stop_at_step` ends the run early
  (after checkpointing) as an interruption would. A resume whose privacy
  (mechanism, sigma, q, unit) differs from what the checkpoint's ledger
  recorded is refused unless `allow_privacy_change`; a target epsilon is then
  met by the whole ledger. `extra_event`: another release the target must
  cover too (DistilDP's histogram). `callbacks`: more `Callback`s after the
  built-in ones (metrics, privacy.json, checkpoints, progress).

  Args:
    cfg: the train config.
    task: the task.
    workdir: the run directory, or None (nothing written).
    progress: show a progress bar.
    stop_at_step: end after this step.
    allow_privacy_change: see above.
    extra_event: see above.
    callbacks: see above.

  Returns:
    A `RunResult` (final params and metrics, the ledger, the privacy record).
  """
  lead = jax.process_index() == 0  # multi-host: one process writes metrics and plots
  mesh = run_mesh(spec_lib.validate(spec_lib.with_defaults(cfg)))  # device errors first
  if workdir and jax.process_count() > 1 and _JAX_VERSION < (0, 7):
    raise SpecError(
      f"checkpoints of a multi-process run need jax >= 0.7 (orbax writes arrays split "
      f"over processes under jax.sharding.set_mesh as a context manager); this is jax "
      f"{jax.__version__}"
    )
  lock = rundir.RunLock(workdir) if workdir and lead else None
  created = False
  if lock is not None:  # taken before anything in the workdir is read
    created = rundir.make_private_dir(workdir)
    lock.acquire()
  try:
    with rundir.owner_only_files(), StopSignals() as stop:
      while True:  # each pass sets one damaged checkpoint aside, falling back to an older one
        spec, plan, meta = prepare(
          cfg, task, workdir, allow_privacy_change=allow_privacy_change, extra_event=extra_event
        )
        if workdir and lock is None:  # another process of a multi-host run holds the lock
          os.makedirs(workdir, mode=0o700, exist_ok=True)
        try:
          return _run(
            spec, plan, meta, task, workdir, lead, progress, stop_at_step, callbacks, mesh, stop
          )
        except rundir.DamagedCheckpoint as e:
          if not lead or jax.process_count() > 1:
            raise
          rundir.set_aside(workdir, e.step, e.error)
  finally:
    if lock is not None:
      lock.release()
      if created and not os.listdir(workdir):  # refused before anything was written
        os.rmdir(workdir)


class Callback:
  """A hook of the driver; every method does nothing unless overridden.

  `on_start(header)` once (the run's facts as logged), `on_step(step, state)`
  after every step (`step` = steps done), `on_log(step, rec, state)` with each
  metric row, `on_end(final, state)` once. Callbacks see released values
  (parameters, privatised state) and monitoring metrics; what they compute
  from the private data themselves is theirs to account. The state of
  `on_step` / `on_log` is donated to the next step (its buffers reused): a
  callback that keeps it copies it (`jax.device_get`) before returning.
  """

  def on_start(self, header: Dict[str, Any]) -> None:
    pass

  def on_step(self, step: int, state: TrainState) -> None:
    pass

  def on_log(self, step: int, rec: Dict[str, Any], state: TrainState) -> None:
    pass

  def on_end(self, final: Dict[str, Any], state: TrainState) -> None:
    pass


class MetricsFile(Callback):
  """`metrics.jsonl`: the start row, one row per logged step, the final row; `curves.png`."""

  def __init__(self, workdir: str, start: int, steps: int):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.curves = os.path.join(workdir, "curves.png")
    self.steps = steps
    rundir.truncate_metrics(self.path, start)  # replayed steps replace their rows

  def on_start(self, header):
    rundir.log_jsonl(self.path, header)

  def on_log(self, step, rec, state):
    rundir.log_jsonl(self.path, rec)

  def on_end(self, final, state):
    if final["step"] == self.steps:
      rundir.log_jsonl(self.path, dict(final, event="final"))
      rundir.plot_curves(self.path, self.curves)


class PrivacyFile(Callback):
  """`privacy.json`: the plan's record (epsilon of the ledger) after every logged step."""

  def __init__(self, workdir: str, plan: PrivacyPlan):
    self.path, self.plan = os.path.join(workdir, "privacy.json"), plan

  def on_log(self, step, rec, state):
    rundir.write_json_atomic(self.path, self.plan.privacy_record(step))

  def on_end(self, final, state):
    rundir.write_json_atomic(self.path, self.plan.privacy_record(final["step"]))


class Checkpointer(Callback):
  """Saves the state with the ledger every `every` steps and at `end` (asynchronously)."""

  def __init__(self, ckpt: rundir.Checkpoints, plan: PrivacyPlan, every: int, end: int):
    self.ckpt, self.plan, self.every, self.end = ckpt, plan, every, end

  def due(self, step: int) -> bool:
    """Whether `step` is saved.

    Args:
      step: steps done.

    Returns:
      True at every `every`-th step and at the end.
    """
    return step % self.every == 0 or step == self.end

  def on_step(self, step, state):
    if self.due(step):
      plan = self.plan
      self.ckpt.save(state, plan.ledger_at(step), plan.secret, stream=plan.stream, end=self.end)


class ProgressBar(Callback):
  """A tqdm bar with loss, dev accuracy and epsilon spent."""

  def __init__(self, start: int, total: int):
    self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

  def on_step(self, step, state):
    self.bar.update(1)

  def on_log(self, step, rec, state):
    self.bar.set_postfix(
      {
        k: f"{rec[k]:.3g}"
        for k in ("train_loss", "dev_accuracy", "epsilon")
        if isinstance(rec.get(k), float)
      }
    )

  def on_end(self, final, state):
    self.bar.close()


def _now() -> str:
  """The wall-clock time of a metric row, ISO 8601 in UTC to the second."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def plan_line(spec, plan: PrivacyPlan) -> str:
  """The privacy plan in one line, printed before the first step.

  Args:
    spec: the validated spec.
    plan: its privacy plan.

  Returns:
    E.g. "privacy plan: target eps 3 at delta 1e-05 per example | gaussian
    sigma 1.08 | Poisson q 0.05 (expected batch 50) | 400 steps | accountant pld".
  """
  if not plan.private:
    return f"privacy plan: none (private=False, no guarantee) | {spec.steps} steps"
  target = "none" if spec.target_epsilon is None else f"{spec.target_epsilon:g}"
  unit = plan.unit if plan.sampling is None else f"{plan.unit} ({plan.sampling.upper()})"
  if plan.lmo is not None:
    noise = "lmo"
  else:
    noise = f"{plan.mechanism} sigma {plan.noise_multiplier:.4g}"
  parts = [
    f"privacy plan: target eps {target} at delta {plan.delta:g} per {unit}",
    noise,
    "fixed batches"
    if plan.sampling_rate is None
    else f"Poisson q {plan.sampling_rate:.4g} (expected batch {plan.expected_batch_size:g})",
    f"{spec.steps} steps",
    f"accountant {plan.accountant}",
  ]
  if plan.bands > 1 and not plan.mf_buffers:
    parts.append(f"BandMF {plan.bands} bands")
  if plan.mf_buffers:
    parts.append(
      f"BLT {plan.mf_buffers} buffers, {plan.bands} group(s), C-sensitivity "
      f"{plan.mf_sensitivity:.4g} (one Gaussian mechanism, no amplification)"
    )
  if plan.adaptive is not None:
    parts.append(f"adaptive clipping (gradient sigma {plan.gradient_noise_multiplier:.4g})")
  return " | ".join(parts)


class LogLines(Callback):
  """One plain line per metric row (time, step, loss, accuracy, epsilon) when the bar is off."""

  KEYS = ("train_loss", "dev_loss", "dev_accuracy", "epsilon", "clip_norm", "examples_per_s")

  def __init__(self, total: int, stream=None):
    self.total, self.stream = total, stream or sys.stderr

  def on_log(self, step, rec, state):
    fields = [f"{k}={rec[k]:.4g}" for k in self.KEYS if isinstance(rec.get(k), (int, float))]
    if rec.get("dropped_units"):
      fields.append(f"dropped_units={rec['dropped_units']}")
    print(f"{rec['time']} step {step}/{self.total} " + " ".join(fields), file=self.stream)
    self.stream.flush()


class TensorBoardWriter(Callback):
  """TensorBoard event files under WORKDIR/tensorboard: each numeric metric by step.

  Needs the optional `tensorboardX` (`pip install tensorboardX`); the spec
  refuses `metric_writers=...tensorboard` without it before any compute.
  """

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter  # optional dependency

    self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def on_start(self, header):
    self.writer.add_text("run", json.dumps(rundir.strict_json(header), indent=1), 0)

  def _scalars(self, prefix: str, step: int, rec: Dict[str, Any]) -> None:
    for k, v in rec.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
        if k != "step":
          self.writer.add_scalar(prefix + k, v, step)
    self.writer.flush()

  def on_log(self, step, rec, state):
    self._scalars("", step, rec)

  def on_end(self, final, state):
    self._scalars("final/", final["step"], final)
    self.writer.close()


def run_mesh(spec) -> Optional[Mesh]:
  """The run's device mesh from `data_devices` x `model_devices`, or None on one device.

  Under `jax.distributed` (more than one process) the mesh takes every device
  of every process; `data_devices` left at 1 then means data parallelism over
  all of them (`jax.device_count() // model_devices`).

  Args:
    spec: the validated spec.

  Returns:
    The Mesh, or None (one device).
  """
  n_data, n_model = spec.data_devices, spec.model_devices
  total = jax.device_count()
  if jax.process_count() > 1:
    if n_data == 1:
      n_data = max(total // n_model, 1)
    if n_data * n_model != total:
      raise SpecError(
        f"data_devices={n_data} x model_devices={n_model}: under jax.distributed "
        f"({jax.process_count()} processes) the mesh takes all {total} devices"
      )
  elif n_data * n_model > total:
    raise SpecError(
      f"data_devices={n_data} x model_devices={n_model} but only {total} devices are visible"
    )
  if spec.physical_batch_size % n_data:
    raise SpecError(
      f"physical_batch_size={spec.physical_batch_size} is not divisible by the {n_data} "
      "devices of the data axis; pick a multiple of them"
    )
  if n_data * n_model == 1:
    return None
  return shard_lib.make_mesh(jax.devices()[: n_data * n_model], model=n_model)


class _Sums(NamedTuple):
  """One logical step's clipped sum and stats, still on the devices."""

  gsum: PyTree
  stats: Dict[str, jax.Array]  # summed over the step's physical batches
  units: float  # sampled units (host: from the sampler's masks)
  examples: int  # examples in them


@jax.jit
def _add(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.add, a, b)


def _run(
  spec,
  plan: PrivacyPlan,
  meta,
  task: Task,
  workdir: Optional[str],
  lead: bool,
  progress: bool,
  stop_at_step: Optional[int],
  callbacks: Sequence[Callback],
  mesh: Optional[Mesh],
  stop: StopSignals,
) -> RunResult:
  """The driver: state in, the pure step per sampled batch, callbacks out.

  Nothing inside the step loop reads the devices except at log and checkpoint
  steps: statistics are summed on the devices and read there; the state and
  the gradient sum are donated to the step, which is compiled ahead of time,
  once, for the state's placement (`init` and `restore` put it there
  directly).
  """
  task = with_weight_distillation(spec, task)
  optimizer = make_optimizer(
    spec.optimizer,
    spec.learning_rate,
    spec.weight_decay,
    spec.warmup_steps,
    spec.steps,
    spec.learning_rates,
    noise_variance=_fixed_noise_variance(spec, plan),
  )
  tx = plan.transform(optimizer)

  def host_batch(pb):
    """A sampler's physical batch -> (device batch, unit mask)."""
    batch = _take(task.train, pb.indices)  # [P, ...] or [P, G, ...]
    if plan.per_user:  # [P, G, ...] examples of P users and which of them are real
      batch = GroupUnits(batch, jax.device_put(pb.example_mask))
    mask = jax.device_put(pb.mask)
    if mesh is not None:
      batch, mask = shard_lib.shard_batch(batch, mesh), shard_lib.shard_batch(mask, mesh)
    return batch, mask

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
  ckpt = rundir.Checkpoints(workdir) if workdir else None
  try:
    start = 0 if meta is None else meta["step"]
    end = spec.steps if stop_at_step is None else min(spec.steps, stop_at_step)
    if meta is not None:  # every array read straight onto its devices
      state = ckpt.restore(target)
      # a new segment draws its own noise: the restored key is the old segment's
      state = state._replace(opt_state=plan.rekey(state.opt_state, meta["stream"]))
    else:
      state = jax.jit(init, out_shardings=shardings)(task.params)
      if ckpt is not None:  # the secret is kept before anything is released
        ckpt.save(state, Ledger(), plan.secret, stream=plan.stream, end=end, wait=True)

    if lead:
      print(plan_line(spec, plan), file=sys.stderr, flush=True)

    # The step, compiled once (ahead of time) for the state's placement.
    t_compile = time.perf_counter()
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
    compile_s = time.perf_counter() - t_compile

    def summed(params, batches, clip_norm=None, fn=None) -> _Sums:
      """The gradient sum over a step's physical batches, and their stats, on the devices."""
      gsum, stats, units, examples = zeros(params), None, 0.0, 0
      for pb in batches:
        gsum, s = (fn or acc)(gsum, params, task.frozen, *host_batch(pb), clip_norm)
        stats = s if stats is None else _add(stats, s)
        units += float(pb.mask.sum())
        examples += int(pb.example_mask.sum() if plan.per_user else pb.mask.sum())
      return _Sums(gsum, stats, units, examples)

    def ascent_sum(params, batches) -> PyTree:
      """Charged DP-SAM's clipped sum of an independent draw (at the plan's fixed bound)."""
      fn = functools.partial(accumulate, plan=plan, loss_fn=task.loss_fn)  # jitted, not AOT
      return summed(params, batches, fn=fn).gsum

    cbs: List[Callback] = []
    checkpointer = None
    writers = spec.metric_writers.split(",")
    if workdir and lead:
      with open(os.path.join(workdir, "config.json"), "w") as f:  # never the noise seed
        config = {k: v for k, v in spec.to_dict().items() if k != "noise_seed"}
        json.dump(rundir.strict_json(config), f, indent=2)
      cbs.append(PrivacyFile(workdir, plan))  # first: a logged step is in it before anywhere
      if "jsonl" in writers:
        cbs.append(MetricsFile(workdir, start, spec.steps))
    if ckpt is not None:
      checkpointer = Checkpointer(ckpt, plan, spec.checkpoint_every, end)
      cbs.append(checkpointer)
    if workdir and lead and "tensorboard" in writers:
      cbs.append(TensorBoardWriter(workdir))
    if lead:
      cbs.append(ProgressBar(start, spec.steps) if progress else LogLines(spec.steps))
    cbs += list(callbacks)
    full = plan.ledger_at(spec.steps)
    header = {
      "event": "start",
      "time": _now(),
      "task": task.name,
      "private": plan.private,
      "noise_multiplier": plan.noise_multiplier,
      "mf_bands": plan.bands,
      "mf_buffers": plan.mf_buffers,
      "adaptive_clipping": plan.adaptive,
      "gradient_noise_multiplier": plan.gradient_noise_multiplier,
      "sampling_rate": plan.sampling_rate,
      "expected_batch_size": plan.expected_batch_size,
      "steps": spec.steps,
      "resumed_from": start,
      "privacy_unit": plan.unit,
      "user_sampling": plan.sampling,
      "max_examples_per_user": plan.max_examples_per_user,
      "lmo": plan.lmo.as_dict() if plan.lmo is not None else None,
      "dp_sam": None
      if plan.sam is None
      else {"rho": plan.sam.rho, "mode": plan.sam.mode, "active_steps": plan.sam.active_steps},
      "releases": full.releases,
      "ledger_segments": len(full.segments),
      "noise_seed_secret": plan.noise_seed_secret,
      "devices": 1 if mesh is None else int(mesh.devices.size),
      "compile_s": compile_s,
    }
    for cb in cbs:
      cb.on_start(header)

    eval_fn = make_eval_fn(task) if task.splits else None
    window, count, seen = None, 0.0, 0  # stats since the last log row (on the devices)
    unchecked = _NO_DROPS  # dropped-unit counts since the last read (on the devices)
    t0 = time.perf_counter()
    last: Dict[str, Any] = {}
    dropped_total = units_total = units_unchecked = 0.0

    def read_dropped(done: int) -> None:
      """Reads the dropped-unit counts before a step is saved or logged (stops if all dropped)."""
      nonlocal unchecked, units_unchecked, dropped_total, units_total
      dropped_total += _check_dropped(unchecked, done)
      units_total += units_unchecked
      unchecked, units_unchecked = _NO_DROPS, 0.0

    stopped_after = None  # the step a SIGTERM / SIGINT stopped the run after
    for step in range(start, end):
      if stop.signum is not None:  # before the first step: nothing ran since the checkpoint
        stopped_after = step
        break
      at = state.params
      if at_fn is not None:
        ascent = None
        if plan.ascent_releases(step, step + 1):  # charged DP-SAM: an independent draw
          ascent = ascent_sum(state.params, plan.sampler.batches(step, draw=1))
        at = at_fn(state.params, state.opt_state, ascent, state.step)
      clip_norm = plan.clip_norm_now(state.opt_state)
      sums = summed(at, plan.sampler.batches(step), clip_norm)
      window = sums.stats if window is None else _add(window, sums.stats)
      count += sums.units
      seen += sums.examples
      unchecked = _note_dropped(unchecked, sums.stats["dropped_units"], sums.units, step + 1)
      units_unchecked += sums.units
      extra = {}
      if clip_norm is not None:  # sum_i (1[||g_i|| <= C] - 1/2) over the kept units, noised in tx
        kept = sums.units - sums.stats["dropped_units"]
        extra["quantile_count"] = (sums.stats["unclipped_units"] - 0.5 * kept).astype(jnp.float32)
        if spec.optimizer == "adam_bc":  # this step's (sigma_g C_t / B)^2, for DP-AdamBC
          extra["noise_variance"] = plan.noise_variance(clip_norm).astype(jnp.float32)
      state = update(state, sums.gsum, **extra)
      done = step + 1
      logs = done % spec.log_every == 0 or done == end
      if logs or (checkpointer is not None and checkpointer.due(done)):
        read_dropped(done)
      for cb in cbs:
        cb.on_step(done, state)
      if logs:
        totals = {k: float(v) for k, v in window.items()}  # the one read of the window
        dropped = totals.pop("dropped_units")
        rec = {
          "step": done,
          "time": _now(),
          **{f"train_{k}": v / max(count, 1.0) for k, v in totals.items()},
          "dropped_units": int(dropped),
          **plan.epsilon_fields(done),
          "delta": plan.delta,
          "examples_per_s": seen / max(time.perf_counter() - t0, 1e-9),
        }
        if plan.adaptive is not None:  # a function of released counts: public
          rec["clip_norm"] = float(plan.clip_norm_now(state.opt_state))
        if eval_fn is not None and "dev" in task.splits:
          rec.update(
            {
              f"dev_{k}": v
              for k, v in evaluate(
                task, state.params, "dev", spec.physical_batch_size, eval_fn
              ).items()
            }
          )
        for cb in cbs:
          cb.on_log(done, rec, state)
        last, window, count = rec, None, 0.0
      if stop.signum is not None:  # a signal came during this step: it is done; save it, stop
        if checkpointer is not None and not checkpointer.due(done):
          read_dropped(done)
          checkpointer.end = done
          checkpointer.on_step(done, state)
        stopped_after = done
        break
    if units_total and dropped_total > DROPPED_WARN_FRACTION * units_total:
      warnings.warn(
        f"{int(dropped_total)} of {int(units_total)} sampled units "
        f"({dropped_total / units_total:.1%}) had a non-finite loss or gradient and "
        "were dropped (dropped_units in metrics.jsonl)",
        UserWarning,
        stacklevel=3,
      )

    final = dict(last)
    final["step"], final["time"] = int(state.step), _now()
    final.update(plan.epsilon_fields(int(state.step)))
    if int(state.step) == spec.steps and eval_fn is not None:
      for split in task.splits:
        for k, v in evaluate(task, state.params, split, spec.physical_batch_size, eval_fn).items():
          final[f"{split}_{k}"] = v
    for cb in cbs:
      cb.on_end(final, state)
    if stopped_after is not None:
      if ckpt is not None:
        ckpt.wait()
      raise RunInterrupted(stop.signum, int(state.step), spec.steps, workdir)
    return RunResult(
      state.params,
      final,
      workdir,
      plan.noise_multiplier if plan.private else None,
      plan.ledger_at(int(state.step)),
      plan.privacy_record(int(state.step)),
    )
  finally:
    if ckpt is not None:  # a save still being written (at an error too) is finished
      ckpt.wait()


# Dropped-unit counts kept on the devices between reads, so that a run that logs
# rarely holds three scalars, not one array per step: (dropped units since the
# last read, the first step since then whose every sampled unit was dropped (0:
# none), that step's sampled units).
_NO_DROPS = (0.0, 0, 0.0)


@jax.jit
def _note_dropped(unchecked: tuple, dropped: jax.Array, units: float, step: int) -> tuple:
  """Adds one step's dropped units to `unchecked` (on the devices: nothing is read)."""
  since, bad_step, bad_units = unchecked
  bad = (units > 0) & (dropped >= units) & (bad_step == 0)
  return since + dropped, jnp.where(bad, step, bad_step), jnp.where(bad, units, bad_units)


def _check_dropped(unchecked: tuple, done: int) -> float:
  """Reads the dropped-unit counts of the steps since the last read; stops at an all-dropped step.

  Args:
    unchecked: `_NO_DROPS` or what `_note_dropped` returned.
    done: the steps run (for the message).

  Returns:
    The units dropped over those steps.
  """
  since, bad_step, bad_units = (float(x) for x in unchecked)
  if bad_step:
    step = int(bad_step)
    raise NonFiniteData(
      f"step {step}: every one of the {int(bad_units)} sampled units had a non-finite "
      "loss or gradient and was dropped; check the data and the learning rate "
      f"(the run stopped at step {done}, before saving or logging any step past {step - 1})"
    )
  return since


class NonFiniteData(ValueError):
  """Every unit a step sampled had a non-finite loss or gradient."""


DROPPED_WARN_FRACTION = 0.01  # warn when more of the sampled units were dropped
