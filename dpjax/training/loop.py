"""`dpjax.training.loop`: the convenience driver, built only from dpjax's public parts.

    spec  = spec.validate(cfg)                every key declared, checked before compute
    plan  = plan.make_plan(spec, task, ...)   sampler, clipping, noise, unit, accountant
    for each step:                            the pure step (dpjax.training.step)
      gsum  = sum of accumulate(...) over the sampled physical batches
      at    = perturb(params, opt_state, ascent, step)   DP-SAM's point, theta without it
      state = apply(state, gsum)              noise once -> normalize -> optimizer
      callbacks: checkpoint (with the ledger), metrics.jsonl, privacy.json, progress

In code: `train` locks the run directory and calls `prepare` (spec, plan,
the checkpoint to resume); the driver then makes or restores the state in
its placement (`init_or_restore`), compiles the step once
(`compile_step`; both `dpjax.training.compiled_step`), writes the start row
(`run_header`) and runs `fit`, the step loop. The task and its checks are
`dpjax.training.task`, the optimizer `dpjax.training.optimizer`, the hooks
`dpjax.training.callbacks`.

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
import json
import math
import os
import signal
import sys
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dpjax.core import accounting
from dpjax.core.accounting.ledger import Ledger
from dpjax.training import rundir
from dpjax.training import sharding as shard_lib
from dpjax.training import spec as spec_lib
from dpjax.training.callbacks import (
  Callback,
  Checkpointer,
  LogLines,
  MetricsFile,
  PrivacyFile,
  ProgressBar,
  TensorBoardWriter,
  WandbWriter,
  now,
  plan_line,
)
from dpjax.training.compiled_step import (
  CompiledStep,
  Placement,
  compile_step,
  init_or_restore,
)
from dpjax.training.optimizer import fixed_noise_variance, make_optimizer
from dpjax.training.plan import PrivacyPlan, ResumeRefused, Secret, make_plan
from dpjax.training.spec import SpecError
from dpjax.training.step import TrainState
from dpjax.training.tally import Tally
from dpjax.training.task import (
  Task,
  check_fits,
  check_task_data,
  evaluate,
  with_weight_anchor,
)

PyTree = Any
_JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:2])


@dataclasses.dataclass
class RunResult:
  params: PyTree
  final_metrics: Dict[str, Any]
  workdir: Optional[str]
  noise_multiplier: Optional[float] = None  # the sigma of the last segment; None if not private
  ledger: Ledger = Ledger()  # what the run released, all segments
  privacy: Optional[Dict[str, Any]] = None  # the privacy.json record


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
  cfg = spec_lib.validate(spec_lib.with_defaults(cfg))  # checked once: a Spec from here on
  mesh = run_mesh(cfg)  # device errors first
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
    _all_processes_here("dpjax-run-start")  # nothing is read before process 0 holds the lock
    with rundir.owner_only_files(), StopSignals() as stop:
      while True:  # each pass sets one damaged checkpoint aside, falling back to an older one
        spec, plan, meta = prepare(
          cfg, task, workdir, allow_privacy_change=allow_privacy_change, extra_event=extra_event
        )
        if workdir and lock is None:  # another process of a multi-host run holds the lock
          os.makedirs(workdir, mode=0o700, exist_ok=True)
        try:
          result = _run(
            spec, plan, meta, task, workdir, lead, progress, stop_at_step, callbacks, mesh, stop
          )
          _all_processes_here("dpjax-run-end")  # every file is written before any process goes on
          return result
        except rundir.DamagedCheckpoint as e:
          if not lead or jax.process_count() > 1:
            raise
          rundir.set_aside(workdir, e.step, e.error)
  finally:
    if lock is not None:
      lock.release()
      if created and not os.listdir(workdir):  # refused before anything was written
        os.rmdir(workdir)


def _all_processes_here(name: str) -> None:
  """Under `jax.distributed`, waits until every process reaches this point (else nothing).

  Every process reads the run directory (the checkpoint to resume, privacy.json)
  but process 0 writes it: without these two points a process could read it
  before process 0 holds the lock, or while process 0 finalises the last
  checkpoint of a run that just ended, and resume from another step than the
  others (their collectives then never meet).
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


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
  """The driver: the state in its placement, the compiled step, callbacks, `fit`, the result.

  Nothing inside the step loop reads the devices except at log and checkpoint
  steps: statistics are summed on the devices and read there; the state and
  the gradient sum are donated to the step, which is compiled ahead of time,
  once, for the state's placement (`init` and `restore` put it there
  directly).
  """
  task = with_weight_anchor(spec, task)
  optimizer = make_optimizer(
    spec.optimizer,
    spec.learning_rate,
    spec.weight_decay,
    spec.warmup_steps,
    spec.steps,
    spec.learning_rates,
    noise_variance=fixed_noise_variance(spec, plan),
  )
  tx = plan.transform(optimizer)
  place = Placement.of(task, tx, mesh)
  if mesh is not None:  # the frozen base split like the trained parameters, never replicated
    task = task._replace(frozen=shard_lib.shard_params(task.frozen, mesh))
  ckpt = rundir.Checkpoints(workdir) if workdir else None
  try:
    start = 0 if meta is None else meta["step"]
    end = spec.steps if stop_at_step is None else min(spec.steps, stop_at_step)
    state = init_or_restore(plan, task, place, ckpt, meta, end)
    if lead:
      print(plan_line(spec, plan), file=sys.stderr, flush=True)
      if workdir:  # where to look while it runs, and what resumes it
        print(f"run directory: {workdir} (resume: --workdir {workdir})", file=sys.stderr)
    step = compile_step(spec, plan, task, tx, place, mesh, state, start)
    cbs, checkpointer = _callbacks(spec, plan, workdir, lead, progress, ckpt, start, end)
    header = run_header(spec, plan, task, start, mesh, step.compile_s)
    for cb in [*cbs, *callbacks]:
      cb.on_start(header)
    state, last, stopped_after = fit(
      state, spec, plan, task, step, [*cbs, *callbacks], checkpointer, start, end, stop
    )
    final = dict(last)
    final["step"], final["time"] = int(state.step), now()
    final.update(plan.epsilon_fields(int(state.step)))
    if int(state.step) == spec.steps:
      for split in task.splits:
        metrics = evaluate(task, state.params, split, spec.physical_batch_size, step.eval_fn)
        final.update({f"{split}_{k}": v for k, v in metrics.items()})
    for cb in [*cbs, *callbacks]:
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


def fit(
  state: TrainState,
  spec,
  plan: PrivacyPlan,
  task: Task,
  step: CompiledStep,
  callbacks: Sequence[Callback],
  checkpointer: Optional[Checkpointer],
  start: int,
  end: int,
  stop: StopSignals,
) -> Tuple[TrainState, Dict[str, Any], Optional[int]]:
  """The step loop from `start` to `end`: step, tally, read at log / checkpoint steps, call back.

  Args:
    state: the state after `start` steps, in its placement.
    spec: the validated spec.
    plan: the privacy plan (sampler, noise, ledger).
    task: the task (its dev split is evaluated at each log row).
    step: the compiled step (`compile_step`).
    callbacks: every callback, in order.
    checkpointer: the one among them that saves, or None.
    start: the steps already done.
    end: the step to stop after.
    stop: the signals that stop the loop after the step in flight.

  Returns:
    (state, the last metric row, the step a signal stopped the run after or None).
  """
  tally, last, stopped_after = Tally(), {}, None
  for i in range(start, end):
    if stop.signum is not None:  # before the first step: nothing ran since the checkpoint
      stopped_after = i
      break
    state, sums = step.run(state, i)
    done = i + 1
    tally.add(sums, done)
    logs = done % spec.log_every == 0 or done == end
    if logs or (checkpointer is not None and checkpointer.due(done)):
      tally.read_dropped(done)  # before the step is saved or logged
    for cb in callbacks:
      cb.on_step(done, state)
    if logs:
      last = _log_row(done, tally, spec, plan, task, state, step.eval_fn)
      for cb in callbacks:
        cb.on_log(done, last, state)
    if stop.signum is not None:  # a signal came during this step: it is done; save it, stop
      if checkpointer is not None and not checkpointer.due(done):
        tally.read_dropped(done)
        checkpointer.end = done
        checkpointer.on_step(done, state)
      stopped_after = done
      break
  tally.warn_if_dropped()
  return state, last, stopped_after


def _log_row(
  done: int, tally: Tally, spec, plan: PrivacyPlan, task: Task, state: TrainState, eval_fn
) -> Dict[str, Any]:
  """The metric row after `done` steps: training stats since the last row, epsilon, dev metrics."""
  rec = {"step": done, "time": now(), **tally.read_window(), **plan.epsilon_fields(done)}
  rec["delta"] = plan.delta
  rec["examples_per_s"] = tally.examples_per_s()
  if plan.adaptive is not None:  # a function of released counts: public
    rec["clip_norm"] = float(plan.clip_norm_now(state.opt_state))
  if "dev" in task.splits:
    dev = evaluate(task, state.params, "dev", spec.physical_batch_size, eval_fn)
    rec.update({f"dev_{k}": v for k, v in dev.items()})
  return rec


def _callbacks(
  spec, plan: PrivacyPlan, workdir, lead: bool, progress: bool, ckpt, start: int, end: int
) -> Tuple[List[Callback], Optional[Checkpointer]]:
  """The built-in callbacks (writing config.json first) and the checkpointer among them."""
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
  if workdir and lead and "wandb" in writers:
    cbs.append(WandbWriter(workdir))
  if lead:
    cbs.append(ProgressBar(start, spec.steps) if progress else LogLines(spec.steps))
  return cbs, checkpointer


def run_header(
  spec, plan: PrivacyPlan, task: Task, start: int, mesh: Optional[Mesh], compile_s: float
) -> Dict[str, Any]:
  """The run's start row (metrics.jsonl, `Callback.on_start`): the plan's facts as logged.

  Args:
    spec: the validated spec.
    plan: the privacy plan.
    task: the task.
    start: the steps already done (a resume's checkpoint).
    mesh: the device mesh, or None.
    compile_s: the seconds compiling the step took.

  Returns:
    The row.
  """
  full = plan.ledger_at(spec.steps)
  sam = plan.sam
  return {
    "event": "start",
    "time": now(),
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
    "mechanism": plan.mechanism.to_json() if plan.private else None,
    "dp_sam": None
    if sam is None
    else {"rho": sam.rho, "mode": sam.mode, "active_steps": sam.active_steps},
    "releases": full.releases,
    "ledger_segments": len(full.segments),
    "noise_seed_secret": plan.noise_seed_secret,
    "devices": 1 if mesh is None else int(mesh.devices.size),
    "compile_s": compile_s,
  }
