"""The generic private training loop, built only from dpjax's public parts.

One logical step of DP-SGD (arXiv 1607.00133) is

    indices ~ PoissonSampler(q)                      host side, fixed shapes
    g = sum over physical batches of clipped_grad()  gradient accumulation
    params <- optimizer(normalize(mechanism(g)))     noise once, on the sum

The privacy unit is `cfg.privacy_unit`: "example", or "user" (the task then
carries `user_ids`; each user is capped to `cfg.max_examples_per_user` = G
examples before sampling, and `cfg.user_sampling` is "els" -- Poisson over
the kept examples, clipped per example -- or "uls" -- Poisson over users,
each user's loss the mean over its examples, clipped per user; see
`dpjax.accounting.user_level`). Every epsilon logged is per that unit.
With `cfg.data_devices` = n > 1, batches are split over a data mesh of n
devices (`dpjax.data.pipeline`); with `cfg.model_devices` = m > 1 too, the
mesh is n x m and parameters and optimizer state are split over its "model"
axis. Noise is still one draw on the global sum. `cfg.clipping_method`
"ghost" computes the clipped sums by ghost norms (`dpjax.ghost`).

Everything privacy-relevant comes from one `dpjax.plan.PrivacyPlan`, made
before any compute or file (`prepare`). The run directory holds
`config.json` (the validated spec; no secret), `metrics.jsonl` (strict
JSON, one row per logged step even across resumes), orbax checkpoints (the
parameters, the optimizer state with the noise key, and beside them the
privacy ledger and the run's secret entropy), `privacy.json` (epsilon as the
composition of the ledger, its delta, unit and accountant, the ledger, and
whether the noise seed was secret) and `curves.png`. A `.lock` file keeps a
second process out. A resumed run continues the same noise and batches; one
that would change sigma, q or the unit is refused unless allowed, and then
appends a ledger segment.

Training loss and accuracy logged here are computed on private data and are
NOT privatised: they are for monitoring, not for release.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import flatness
from dpjax import spec as spec_lib
from dpjax.accounting.ledger import Ledger
from dpjax.data import pipeline
from dpjax.data.sampling import eval_batches
from dpjax.plan import PrivacyPlan, ResumeRefused, Secret, make_plan
from dpjax.spec import SpecError

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


class TrainState(NamedTuple):
  params: PyTree
  opt_state: PyTree
  step: jax.Array  # int32 scalar: logical steps taken (what the accountant charges)


def make_optimizer(name: str, learning_rate: float, weight_decay: float = 0.0,
                   warmup_steps: int = 0, total_steps: int = 0,
                   learning_rates: dict | None = None) -> optax.GradientTransformation:
  """`learning_rates` maps a prefix of a top-level parameter name to its own
  learning rate (e.g. {"layer_": 1e-3} for encoder layers beside a head at
  `learning_rate`); the longest matching prefix wins, the rest use `learning_rate`."""
  if learning_rates:
    rates = {str(k): float(v) for k, v in learning_rates.items()}
    for k, v in rates.items():
      if not k or not v > 0:
        raise ValueError(f"learning_rates needs non-empty name prefixes and positive rates, "
                         f"got {k!r}: {v}")
    # label "" = the default group (an empty prefix is refused above, so it cannot collide)
    txs = {"": make_optimizer(name, learning_rate, weight_decay, warmup_steps, total_steps)}
    txs.update({k: make_optimizer(name, v, weight_decay, warmup_steps, total_steps)
                for k, v in rates.items()})

    def labels(params):
      if not isinstance(params, dict):
        raise ValueError("learning_rates needs a dict of parameters (top-level names)")
      def label(top):
        hits = [k for k in rates if top.startswith(k)]
        return max(hits, key=len) if hits else ""
      return {top: jax.tree.map(lambda _, l=label(top): l, sub) for top, sub in params.items()}
    return optax.multi_transform(txs, labels)
  if warmup_steps > 0 and total_steps > warmup_steps:
    lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total_steps,
                                            end_value=learning_rate * 0.1)
  else:
    lr = learning_rate
  if name == "adamw":
    return optax.adamw(lr, weight_decay=weight_decay)
  if name == "adam":
    return optax.adam(lr)
  if name == "sgd":
    return optax.sgd(lr, momentum=0.9)
  raise ValueError(f"optimizer must be 'adamw', 'adam' or 'sgd', got {name!r}")


def _take(data: Dict[str, np.ndarray], idx: np.ndarray) -> Dict[str, jax.Array]:
  return {k: jnp.asarray(v[idx]) for k, v in data.items()}


def _num_rows(data: Dict[str, np.ndarray]) -> int:
  return len(next(iter(data.values())))


def make_eval_fn(task: Task) -> Callable:
  """Jitted `(params, batch, mask) -> summed metrics` over a masked batch."""
  def per_example(params, ex):
    loss, metrics = task.loss_fn(params, ex, task.frozen)
    return dict(metrics, loss=loss)

  @jax.jit
  def eval_fn(params, batch, mask):
    out = jax.vmap(per_example, in_axes=(None, 0))(params, batch)
    return {k: jnp.sum(jnp.where(mask > 0, v, 0.0)) for k, v in out.items()}
  return eval_fn


def evaluate(task: Task, params: PyTree, split: str, batch_size: int,
             eval_fn: Optional[Callable] = None) -> Dict[str, float]:
  """Mean metrics of `params` over one held-out split."""
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
  noise_multiplier: Optional[float] = None   # the sigma of the last segment; None if not private
  ledger: Ledger = Ledger()                  # what the run released, all segments
  privacy: Optional[Dict[str, Any]] = None   # the privacy.json record


def check_task_data(task: Task) -> None:
  """Refuses data that would train silently wrong: non-finite values, labels out of range, empty.

  Labels are checked when `task.info["num_classes"]` says how many there are.
  """
  classes = (task.info or {}).get("num_classes")
  for name, data in {"train": task.train, **task.splits}.items():
    if not data or _num_rows(data) == 0:
      raise SpecError(f"task {task.name!r}: the {name} split is empty")
    for key, arr in data.items():
      rows = np.asarray(arr).reshape(len(arr), -1)
      if rows.dtype.kind == "f":
        for lo in range(0, len(rows), 4096):     # chunks: no full-size boolean copy
          bad = ~np.isfinite(rows[lo:lo + 4096])
          if bad.any():
            i = int(np.argmax(bad.any(axis=1)))
            raise SpecError(f"task {task.name!r}: {name} row {lo + i}, {key!r} holds "
                            f"{rows[lo + i][bad[i]][0]} (values must be finite)")
      if key == "label" and classes is not None:
        bad = np.flatnonzero((rows < 0).any(axis=1) | (rows >= classes).any(axis=1))
        if len(bad):
          raise SpecError(f"task {task.name!r}: {name} row {int(bad[0])} has label "
                          f"{rows[bad[0]][0]}, outside [0, {classes - 1}] ({classes} classes)")


def _resumable_keys(allow_privacy_change: bool):
  keys = set(spec_lib.RUN_CONTROL)
  if allow_privacy_change:
    keys |= {k.name for k in spec_lib.KEYS if k.privacy}
  return keys


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _check_same_run(workdir: str, new: Dict[str, Any], allow_privacy_change: bool) -> None:
  """Refuses to resume a checkpoint written under a different config."""
  path = os.path.join(workdir, "config.json")
  if not (os.path.isfile(path) and os.path.isdir(os.path.join(workdir, "checkpoints"))):
    return
  with open(path) as f:
    old = _flat(json.load(f))
  new = _flat(new)
  free = _resumable_keys(allow_privacy_change)
  diff = sorted(k for k in set(old) | set(new) if k not in free and old.get(k) != new.get(k))
  if diff:
    changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:5])
    raise ResumeRefused(f"{workdir} holds a checkpoint of a run with a different config "
                        f"({changes}); resume with the same config or use a new workdir")


class _Checkpoints:
  """Orbax checkpoints of the state with the ledger and the secret beside it (one atomic step)."""

  def __init__(self, workdir: str):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.path = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.mngr = ocp.CheckpointManager(
        self.path, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

  @staticmethod
  def latest_meta(workdir: str) -> Optional[Dict[str, Any]]:
    """The ledger, secret and step of the newest checkpoint in `workdir`, or None."""
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
      return None
    import orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(os.path.abspath(path))
    step = mngr.latest_step()
    if step is None:
      return None
    if not os.path.isdir(os.path.join(path, str(step), "meta")):
      raise ResumeRefused(f"{path} holds a checkpoint (step {step}) without a privacy ledger; "
                          "its budget cannot be composed: use a new workdir")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return {"step": int(step), "ledger": Ledger.from_json(meta["ledger"]),
            "secret": Secret.from_json(meta["secret"])}

  def save(self, state: TrainState, ledger: Ledger, secret: Secret) -> None:
    ocp = self._ocp
    meta = {"ledger": ledger.to_json(), "secret": secret.to_json(), "step": int(state.step)}
    self.mngr.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self.mngr.wait_until_finished()

  def restore(self, template: TrainState) -> TrainState:
    ocp = self._ocp
    step = self.mngr.latest_step()
    restored = self.mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template)))["state"]
    return jax.tree.map(jnp.asarray, restored)


class _Lock:
  """`<workdir>/.lock` holding the pid: one process per run directory."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self.held = False

  def acquire(self) -> None:
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        try:
          pid = int(open(self.path).read().strip() or 0)
        except (OSError, ValueError):
          pid = 0
        if pid and pid != os.getpid() and _alive(pid):
          raise RunLocked(f"{os.path.dirname(self.path)} is in use by process {pid} (lock file "
                          f"{self.path}); wait for it or use another workdir")
        os.remove(self.path)    # stale: its process is gone
        continue
      with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
      self.held = True
      return

  def release(self) -> None:
    if self.held:
      self.held = False
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass


class RunLocked(RuntimeError):
  """Another live process holds the run directory."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _read_json(path: str) -> Optional[Dict[str, Any]]:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json_atomic(path: str, rec: Dict[str, Any]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(json.dumps(strict_json(rec), indent=2, allow_nan=False) + "\n")
  os.replace(tmp, path)


def strict_json(x: Any) -> Any:
  """`x` with every non-finite float replaced by None and a `<key>_nonfinite` flag beside it."""
  if isinstance(x, dict):
    out = {}
    for k, v in x.items():
      if isinstance(v, (float, np.floating)) and not math.isfinite(float(v)):
        out[k] = None
        out[f"{k}_nonfinite"] = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
      else:
        out[k] = strict_json(v)
    return out
  if isinstance(x, (list, tuple)):
    return [strict_json(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, jax.Array):
    return strict_json(np.asarray(x).item())
  return x


def _truncate_metrics(path: str, step: int) -> None:
  """Drops rows of steps after `step` (they are replayed) and earlier final rows."""
  if not os.path.isfile(path):
    return
  keep = []
  for line in open(path):
    if not line.strip():
      continue
    rec = json.loads(line)
    if rec.get("event") == "final" or ("event" not in rec and rec.get("step", 0) > step):
      continue
    keep.append(line if line.endswith("\n") else line + "\n")
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def with_weight_distillation(cfg, task: Task) -> Task:
  """`cfg.weight_distillation` = dict(lam, reference): DP-Flat's term in every example's loss.

  reference: "init" (the task's initial trainable parameters, e.g. public
  pretrained weights: free) or a path written by `flatness.save_reference`
  (a public or DP-trained copy; its own budget is the caller's to account).
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


def _resume_point(workdir: Optional[str]):
  """(checkpoint meta or None, the ledger privacy.json says ran, or None)."""
  if not workdir or not os.path.isdir(workdir):
    return None, None
  meta = _Checkpoints.latest_meta(workdir)
  ran = _read_json(os.path.join(workdir, "privacy.json"))
  ran_ledger = Ledger.from_json(ran["ledger"]) if ran and ran.get("ledger") else None
  return meta, ran_ledger


def prepare(cfg, task: Task, workdir: Optional[str] = None, *,
            allow_privacy_change: bool = False, extra_event=None):
  """Validates `cfg` and `task` and makes the run's privacy plan; writes nothing.

  Returns (spec, plan, checkpoint meta or None). Every bad input raises here
  (a `ValueError` of one line), before any compute or file is written.
  """
  spec = spec_lib.validate(spec_lib.with_defaults(cfg))
  check_task_data(task)
  meta, ran = _resume_point(workdir)
  if workdir and meta is not None:
    _check_same_run(workdir, spec.to_dict(), allow_privacy_change)
  if meta is None:
    secret = (Secret.from_seed(spec.noise_seed) if spec.noise_seed is not None
              else Secret.fresh())
    prior, start = Ledger(), 0
  else:
    secret, prior, start = meta["secret"], meta["ledger"], meta["step"]
  plan = make_plan(spec, task, secret=secret, prior=prior, start_step=start,
                   allow_privacy_change=allow_privacy_change, extra_event=extra_event)
  if plan.private and prior.segments and ran is not None and ran.steps > start:
    if plan.segment(plan.steps).privacy_key() != prior.segments[-1].privacy_key():
      # Steps that ran past the checkpoint released outputs under the old plan;
      # replaying them under a new one releases again: charge both.
      plan = make_plan(spec, task, secret=secret, prior=ran, start_step=start,
                       allow_privacy_change=True, extra_event=extra_event)
  return spec, plan, meta


def train(cfg, task: Task, workdir: Optional[str] = None, *, progress: bool = True,
          stop_at_step: Optional[int] = None, allow_privacy_change: bool = False,
          extra_event=None) -> RunResult:
  """Runs (or resumes) `cfg` on `task`, writing to `workdir` when given.

  `cfg` is a config (`ConfigDict` or dict) of the keys in `dpjax.spec.KEYS`
  (missing keys take their defaults). `stop_at_step` ends the run early
  (after checkpointing) as an interruption would. A resume whose privacy
  (mechanism, sigma, q, unit) differs from what the checkpoint's ledger
  recorded is refused unless `allow_privacy_change`; a target epsilon is then
  met by the whole ledger. `extra_event`: another release the target must
  cover too (DistilDP's histogram).
  """
  lead = jax.process_index() == 0    # multi-host: one process writes metrics and plots
  lock = _Lock(workdir) if workdir and lead else None
  if lock is not None and os.path.isdir(workdir):
    lock.acquire()
  try:
    spec, plan, meta = prepare(cfg, task, workdir, allow_privacy_change=allow_privacy_change,
                               extra_event=extra_event)
    if workdir:
      os.makedirs(workdir, exist_ok=True)
      if lock is not None and not lock.held:
        lock.acquire()
    return _run(spec, plan, meta, task, workdir, lead, progress, stop_at_step)
  finally:
    if lock is not None:
      lock.release()


def _run(spec, plan: PrivacyPlan, meta, task: Task, workdir: Optional[str], lead: bool,
         progress: bool, stop_at_step: Optional[int]) -> RunResult:
  task = with_weight_distillation(spec, task)
  sampler, sam, grad_fn = plan.sampler, plan.sam, plan.grad_fn
  per_user = plan.per_user
  mesh = None
  n_data, n_model = spec.data_devices, spec.model_devices
  if n_data * n_model > 1:
    if n_data * n_model > jax.device_count():
      raise SpecError(f"data_devices={n_data} x model_devices={n_model} but only "
                      f"{jax.device_count()} devices are visible")
    mesh = pipeline.make_mesh(jax.devices()[:n_data * n_model], model=n_model)

  optimizer = make_optimizer(spec.optimizer, spec.learning_rate, spec.weight_decay,
                             spec.warmup_steps, spec.steps, spec.learning_rates)
  tx = plan.transform(optimizer)

  if sam is not None:
    ascent_root = plan.secret.ascent_key()

    @jax.jit
    def perturb_free(params, opt_state):
      return sam.perturb(params, flatness.find_state(opt_state))

    @jax.jit
    def perturb_charged(params, opt_state, asum, step):
      # A fresh privatised ascent gradient: same mechanism, its own key per
      # step from the ascent stream (resume-safe), charged by the plan.
      t = plan.noise_transform(jax.random.fold_in(ascent_root, step))
      direction, _ = t.update(asum, t.init(asum))
      return sam.perturb(params, flatness.find_state(opt_state), direction=direction)

  def plain_grad(params, batch, mask):
    def total(p):
      loss, metrics = jax.vmap(task.loss_fn, in_axes=(None, 0, None))(p, batch, task.frozen)
      return jnp.sum(jnp.where(mask > 0, loss, 0.0)), (loss, metrics)
    g, (loss, metrics) = jax.grad(total, has_aux=True)(params)
    return g, loss, metrics

  @jax.jit
  def accumulate(gsum, params, batch, mask):
    if grad_fn is not None:
      g, aux = grad_fn(params, batch, task.frozen, mask=mask)
      loss, metrics, dropped = aux.loss, aux.loss_aux, aux.num_dropped
    else:
      g, loss, metrics = plain_grad(params, batch, mask)
      dropped = jnp.sum(jnp.where(mask > 0, ~jnp.isfinite(loss), False))
    stats = {k: jnp.sum(jnp.where((mask > 0) & jnp.isfinite(v), v, 0.0))
             for k, v in dict(metrics, loss=loss).items()}
    stats["dropped_units"] = dropped.astype(jnp.float32)
    return jax.tree.map(jnp.add, gsum, g), stats

  state_sharding = None    # set once the state is placed on the mesh

  @jax.jit
  def apply(state: TrainState, gsum):
    updates, opt_state = tx.update(gsum, state.opt_state, state.params)
    new = TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
    if state_sharding is not None:   # keep the placement: one compilation, no resharding
      new = jax.lax.with_sharding_constraint(new, state_sharding)
    return new

  def host_batch(pb):
    """A sampler's physical batch -> (device batch, unit mask)."""
    batch = _take(task.train, pb.indices)                        # [P, ...] or [P, G, ...]
    if per_user:
      batch["_example_mask"] = jnp.asarray(pb.example_mask)
    mask = jnp.asarray(pb.mask)
    if mesh is not None:
      batch, mask = pipeline.shard_batch(batch, mesh), pipeline.shard_batch(mask, mesh)
    return batch, mask

  state = TrainState(task.params, tx.init(task.params), jnp.zeros([], jnp.int32))
  ckpt = None
  metrics_path = privacy_path = None
  if workdir:
    if lead:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(strict_json(spec.to_dict()), f, indent=2)
      metrics_path = os.path.join(workdir, "metrics.jsonl")
      privacy_path = os.path.join(workdir, "privacy.json")
    ckpt = _Checkpoints(workdir)
    if meta is not None:
      state = ckpt.restore(state)
    else:
      ckpt.save(state, Ledger(), plan.secret)   # the secret is kept before anything is released
  if mesh is not None:
    state_sharding = pipeline.param_sharding(state, mesh)   # replicated on a data-only mesh
    state = jax.device_put(state, state_sharding)

  eval_fn = make_eval_fn(task) if task.splits else None
  start = int(state.step)
  end = spec.steps if stop_at_step is None else min(spec.steps, stop_at_step)
  if metrics_path:
    _truncate_metrics(metrics_path, start)
  header = {"event": "start", "task": task.name, "private": plan.private,
            "noise_multiplier": plan.noise_multiplier, "sampling_rate": plan.sampling_rate,
            "expected_batch_size": plan.expected_batch_size, "steps": spec.steps,
            "resumed_from": start, "privacy_unit": plan.unit, "user_sampling": plan.sampling,
            "max_examples_per_user": plan.G,
            "lmo": plan.lmo.as_dict() if plan.lmo is not None else None,
            "dp_sam": None if sam is None else {"rho": sam.rho, "mode": sam.mode,
                                                "active_steps": sam.active_steps},
            "releases": plan.ledger_at(spec.steps).releases if plan.private else 0,
            "ledger_segments": len(plan.ledger_at(spec.steps).segments),
            "noise_seed_secret": plan.noise_seed_secret}
  _log(metrics_path, header)

  def write_privacy(step: int) -> Dict[str, Any]:
    rec = plan.privacy_record(step)
    if privacy_path:
      _write_json_atomic(privacy_path, rec)
    return rec

  bar = _progress(range(start, end), progress and lead, initial=start, total=spec.steps)
  zeros = jax.tree.map(jnp.zeros_like, state.params)   # replicated like the params
  window: Dict[str, float] = {}
  t0, seen = time.perf_counter(), 0
  last: Dict[str, Any] = {}
  dropped_total = units_total = 0.0
  for step in bar:
    at = state.params
    if sam is not None and sam.mode == "charged" and step < sam.active_steps:
      asum = zeros   # an independent Poisson draw of the same step (draw 1)
      for pb in sampler.batches(step, draw=1):
        asum, _ = accumulate(asum, state.params, *host_batch(pb))
      at = perturb_charged(state.params, state.opt_state, asum, step)
    elif sam is not None and sam.mode == "free":
      at = perturb_free(state.params, state.opt_state)
    gsum = zeros
    step_units = step_dropped = 0.0
    for pb in sampler.batches(step):
      gsum, stats = accumulate(gsum, at, *host_batch(pb))
      for k, v in stats.items():
        window[k] = window.get(k, 0.0) + float(v)
      seen += int(pb.example_mask.sum() if per_user else pb.mask.sum())
      step_units += float(pb.mask.sum())
      step_dropped += float(stats["dropped_units"])
    if step_units > 0 and step_dropped >= step_units:
      raise RuntimeError(f"step {step + 1}: every one of the {int(step_units)} sampled units had "
                         "a non-finite loss or gradient and was dropped; check the data and the "
                         "learning rate (the run stopped before releasing this step)")
    dropped_total += step_dropped
    units_total += step_units
    window["count"] = window.get("count", 0.0) + step_units
    state = apply(state, gsum)
    done = step + 1
    if done % spec.log_every == 0 or done == end:
      cnt = max(window.pop("count", 0.0), 1.0)
      dropped = window.pop("dropped_units", 0.0)
      rec = {"step": done, **{f"train_{k}": v / cnt for k, v in window.items()},
             "dropped_units": int(dropped), **plan.epsilon_fields(done),
             "delta": plan.delta,
             "examples_per_s": seen / max(time.perf_counter() - t0, 1e-9)}
      if eval_fn is not None and "dev" in task.splits:
        rec.update({f"dev_{k}": v for k, v in
                    evaluate(task, state.params, "dev", spec.physical_batch_size, eval_fn).items()})
      _log(metrics_path, rec)
      write_privacy(done)
      last = rec
      window = {}
      if hasattr(bar, "set_postfix"):
        bar.set_postfix({k: f"{rec[k]:.3g}" for k in
                         ("train_loss", "dev_accuracy", "epsilon") if k in rec})
    if ckpt is not None and (done % spec.checkpoint_every == 0 or done == end):
      ckpt.save(state, plan.ledger_at(done), plan.secret)
  if units_total and dropped_total > DROPPED_WARN_FRACTION * units_total:
    warnings.warn(f"{int(dropped_total)} of {int(units_total)} sampled units "
                  f"({dropped_total / units_total:.1%}) had a non-finite loss or gradient and "
                  "were dropped (dropped_units in metrics.jsonl)", UserWarning, stacklevel=2)

  final = dict(last)
  final["step"] = int(state.step)
  final.update(plan.epsilon_fields(int(state.step)))
  if int(state.step) == spec.steps and eval_fn is not None:
    for split in task.splits:
      for k, v in evaluate(task, state.params, split, spec.physical_batch_size, eval_fn).items():
        final[f"{split}_{k}"] = v
    _log(metrics_path, dict(final, event="final"))
  privacy = write_privacy(int(state.step))
  if metrics_path and int(state.step) == spec.steps:
    _plot_curves(metrics_path, os.path.join(workdir, "curves.png"))
  return RunResult(state.params, final, workdir,
                   plan.noise_multiplier if plan.private else None,
                   plan.ledger_at(int(state.step)), privacy)


DROPPED_WARN_FRACTION = 0.01   # warn when more of the sampled units were dropped


def _log(path: Optional[str], rec: Dict[str, Any]) -> None:
  if path is None:
    return
  with open(path, "a") as f:
    f.write(json.dumps(strict_json(rec), allow_nan=False) + "\n")


def _progress(it, enabled: bool, initial: int, total: int):
  if not enabled:
    return it
  from tqdm.auto import tqdm
  return tqdm(it, initial=initial, total=total, desc="train", dynamic_ncols=True)


def _plot_curves(metrics_path: str, out_path: str) -> None:
  """loss, dev accuracy and epsilon against step, from metrics.jsonl."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  recs = [json.loads(l) for l in open(metrics_path)]
  recs = [r for r in recs if "step" in r and "event" not in r]
  if not recs:
    return
  panels = [("train_loss", "train loss"), ("dev_accuracy", "dev accuracy"),
            ("epsilon", "epsilon spent")]
  panels = [(k, t) for k, t in panels if any(k in r for r in recs)]
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
  for ax, (k, title) in zip(np.atleast_1d(axes), panels):
    pts = [(r["step"], r[k]) for r in recs if k in r and r[k] is not None and math.isfinite(r[k])]
    if pts:
      ax.plot(*zip(*pts), marker=".")
    ax.set_title(title)
    ax.set_xlabel("step")
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
