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

Metrics go to `metrics.jsonl`; checkpoints (orbax) hold the parameters, the
optimizer state (which holds the noise key), and the step count, from which
the accountant recomputes the budget spent: a resumed run neither reuses
noise nor forgets spent privacy.

Training loss and accuracy logged here are computed on private data and are
NOT privatised: they are for monitoring, not for release.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import accounting, flatness
from dpjax.clipping import clipped_grad, group_mean
from dpjax.data import pipeline
from dpjax.data.sampling import (ELSSampler, PoissonSampler, ShuffledSampler, ULSSampler,
                                 bound_contributions, eval_batches, median_group_size)
from dpjax.mechanisms import gaussian, laplace, lmo, normalize

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


L1_MECHANISMS = ("laplace", "lmo")   # noise calibrated to the L1 sensitivity


def noise_transform(*, noise_multiplier: float, sensitivity: float, key: jax.Array,
                    mechanism: str = "gaussian", lmo_params=None) -> optax.GradientTransformation:
  """The privatiser alone: "gaussian" (L2 sensitivity), "laplace" or "lmo" (L1)."""
  if mechanism == "gaussian":
    noise = gaussian(noise_multiplier, sensitivity, key)
  elif mechanism == "laplace":
    noise = laplace(noise_multiplier, sensitivity, key)
  elif mechanism == "lmo":
    noise = lmo(lmo_params, key, l1_clip_norm=sensitivity)
  else:
    raise ValueError(f"mechanism must be 'gaussian', 'laplace' or 'lmo', got {mechanism!r}")
  return noise


def private_transform(*, noise_multiplier: float, sensitivity: float, expected_batch_size: float,
                      optimizer: optax.GradientTransformation, key: jax.Array,
                      mechanism: str = "gaussian", lmo_params=None,
                      after_noise: Optional[optax.GradientTransformation] = None
                      ) -> optax.GradientTransformation:
  """mechanism -> [after_noise] -> normalize(expected batch) -> optimizer, as one optax chain.

  `sensitivity` is the L2 sensitivity for "gaussian" and the L1 sensitivity
  for "laplace" and "lmo" (whose noise comes from `lmo_params`). `after_noise`
  (e.g. `flatness.dp_sam`) sees only privatised gradients.
  """
  noise = noise_transform(noise_multiplier=noise_multiplier, sensitivity=sensitivity, key=key,
                          mechanism=mechanism, lmo_params=lmo_params)
  parts = [noise] + ([after_noise] if after_noise is not None else [])
  return optax.chain(*parts, normalize(expected_batch_size), optimizer)


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
  noise_multiplier: Optional[float] = None   # the sigma used (calibrated or given); None if not private


_RUN_CONTROL = ("log_every", "checkpoint_every")   # may change when a run resumes


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _check_same_run(workdir: str, new: Dict[str, Any]) -> None:
  """Refuses to resume a checkpoint written under a different config."""
  path = os.path.join(workdir, "config.json")
  if not (os.path.isfile(path) and os.path.isdir(os.path.join(workdir, "checkpoints"))):
    return
  with open(path) as f:
    old = _flat(json.load(f))
  new = _flat(new)
  diff = sorted(k for k in set(old) | set(new)
                if k not in _RUN_CONTROL and old.get(k) != new.get(k))
  if diff:
    changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:5])
    raise ValueError(f"{workdir} holds a checkpoint of a run with a different config "
                     f"({changes}); resume with the same config or use a new workdir")


def _checkpoint_manager(workdir: str):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def _save(mngr, state: TrainState) -> None:
  import orbax.checkpoint as ocp
  mngr.save(int(state.step), args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()


def _restore(mngr, template: TrainState) -> Optional[TrainState]:
  import orbax.checkpoint as ocp
  step = mngr.latest_step()
  if step is None:
    return None
  restored = mngr.restore(step, args=ocp.args.StandardRestore(template))
  return jax.tree.map(jnp.asarray, restored)


class UnitPlan(NamedTuple):
  """How a run samples its privacy units, and what the accountant is told."""
  unit: str                   # "example" | "user"
  sampling: Optional[str]     # None (examples) | "els" | "uls"
  G: int                      # max examples per user (1 for example level)
  sampler: Any                # .batches(step) -> physical batches
  sampling_rate: Optional[float]   # per unit the sampler draws (example, or user for ULS)
  expected_batch_size: float  # expected units per step: the normaliser

  def accounting_kwargs(self) -> Dict[str, Any]:
    return {"unit": self.unit, "sampling": self.sampling, "G": self.G}


def resolve_group_size(cfg, user_ids: np.ndarray) -> int:
  """cfg.max_examples_per_user: an integer, or "median" (the ELS rule of arXiv 2407.07737)."""
  G = cfg.get("max_examples_per_user", "median")
  if G == "median":
    return median_group_size(user_ids)
  if isinstance(G, bool) or int(G) != G or G < 1:
    raise ValueError(f"max_examples_per_user must be an integer >= 1 or 'median', got {G!r}")
  return int(G)


def plan_units(cfg, task: Task) -> UnitPlan:
  """The sampler and sampling rate for `cfg.privacy_unit` (see the module docstring)."""
  n = _num_rows(task.train)
  unit = cfg.get("privacy_unit", "example")
  sampling = cfg.get("user_sampling") if unit == "user" else None
  if not cfg.private:
    if unit != "example":
      raise ValueError("privacy_unit='user' needs private=True")
    return UnitPlan(unit, None, 1, ShuffledSampler(n, cfg.batch_size, cfg.seed), None,
                    float(cfg.batch_size))
  if unit == "example":
    accounting.check_unit(unit, None, 1)
    q = cfg.get("sampling_rate") or cfg.batch_size / n
    sampler = PoissonSampler(n, q, cfg.physical_batch_size, cfg.seed)
    return UnitPlan(unit, None, 1, sampler, q, sampler.expected_batch_size)
  if task.user_ids is None:
    raise ValueError(f"privacy_unit='user' needs a task with user_ids; task {task.name!r} "
                     "has none")
  if len(task.user_ids) != n:
    raise ValueError(f"task.user_ids has {len(task.user_ids)} entries for {n} examples")
  G = resolve_group_size(cfg, task.user_ids)
  accounting.check_unit(unit, sampling, G)
  index = bound_contributions(task.user_ids, G, cfg.seed)
  if sampling == "els":
    q = cfg.get("sampling_rate") or cfg.batch_size / len(index.kept_examples())
    sampler = ELSSampler(index, q, cfg.physical_batch_size, cfg.seed)
  else:
    users = len(index.users)
    q = cfg.get("sampling_rate") or cfg.users_per_step / users
    sampler = ULSSampler(index, q, cfg.physical_batch_size, cfg.seed)
  return UnitPlan(unit, sampling, G, sampler, q, sampler.expected_batch_size)


def resolve_sam(cfg) -> Optional[flatness.DPSAM]:
  """`cfg.dp_sam` = dict(rho, mode="free", active_fraction=0.5, layerwise=True), or None."""
  spec = cfg.get("dp_sam")
  if not spec:
    return None
  spec = dict(spec)
  unknown = set(spec) - {"rho", "mode", "active_fraction", "layerwise"}
  if unknown or "rho" not in spec:
    raise ValueError(f"dp_sam takes rho, mode, active_fraction, layerwise; got {sorted(spec)}")
  frac = spec.get("active_fraction", 0.5)
  if not 0 <= frac <= 1:
    raise ValueError(f"dp_sam.active_fraction must be in [0, 1], got {frac}")
  mode = spec.get("mode", "free")
  if mode == "charged" and not cfg.private:
    raise ValueError("dp_sam mode='charged' privatises an ascent gradient: needs private=True")
  return flatness.dp_sam(spec["rho"], mode=mode, layerwise=spec.get("layerwise", True),
                         active_steps=int(round(frac * cfg.steps)))


def resolve_lmo(cfg, plan: UnitPlan, sam: Optional[flatness.DPSAM] = None):
  """LMO parameters: `cfg.lmo` (a dict of LMOParams fields), or searched for the target."""
  from dpjax.accounting import lmo as lmo_acc
  if plan.sampling == "els":
    raise ValueError("LMO noise has no ELS user-level accountant; use user_sampling='uls' "
                     "or privacy_unit='example'")
  if cfg.accountant != "pld":
    raise ValueError(f"LMO noise is accounted by its own PLD; set accountant='pld', "
                     f"got {cfg.accountant!r}")
  if cfg.get("lmo"):
    return lmo_acc.LMOParams(**dict(cfg.lmo))
  found = lmo_acc.lmo_search(cfg.target_epsilon, cfg.delta, plan.sampling_rate,
                             _releases(cfg, sam),
                             grid=dict(cfg.lmo_grid) if cfg.get("lmo_grid") else None,
                             objective=cfg.get("lmo_objective", "abs"), progress=True)
  return found["params"]


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


def _releases(cfg, sam: Optional[flatness.DPSAM]) -> int:
  """Privatised gradients the whole run releases (charged SAM adds its ascent steps)."""
  if sam is None:
    return int(cfg.steps)
  return flatness.releases(int(cfg.steps), mode=sam.mode, active_steps=sam.active_steps)


def resolve_noise(cfg, plan: UnitPlan, sam: Optional[flatness.DPSAM] = None) -> float:
  """The noise multiplier: given directly, or calibrated to the target epsilon per unit."""
  if not cfg.private or cfg.mechanism == "lmo":
    return 0.0
  if cfg.get("noise_multiplier") is not None:
    return float(cfg.noise_multiplier)
  return accounting.calibrate_noise(cfg.target_epsilon, cfg.delta, plan.sampling_rate,
                                    _releases(cfg, sam), accountant=cfg.accountant,
                                    mechanism=cfg.mechanism, **plan.accounting_kwargs())


def user_mean_loss(loss_fn: Callable) -> Callable:
  """A per-example loss -> the loss of one user `[G, ...]`: the mean over its valid examples.

  The user's batch dict carries `_example_mask` `[G]` (1 for a real example);
  metrics are averaged the same way (`dpjax.clipping.group_mean`).
  """
  return group_mean(loss_fn, weight_key="_example_mask", has_aux=True)


def train(cfg, task: Task, workdir: Optional[str] = None, *, progress: bool = True,
          stop_at_step: Optional[int] = None) -> RunResult:
  """Runs (or resumes) `cfg` on `task`, writing to `workdir` when given.

  Required config fields: private, steps, seed, learning_rate, optimizer,
  physical_batch_size, log_every; private runs also need l2_clip_norm,
  delta, accountant, mechanism and either sampling_rate or batch_size, and
  either noise_multiplier or target_epsilon. `stop_at_step` ends the run early
  (after checkpointing) as an interruption would.
  """
  plan = plan_units(cfg, task)
  sampler, q, expected = plan.sampler, plan.sampling_rate, plan.expected_batch_size
  sam = resolve_sam(cfg)
  task = with_weight_distillation(cfg, task)
  sigma = resolve_noise(cfg, plan, sam)
  lmo_params = resolve_lmo(cfg, plan, sam) if cfg.private and cfg.mechanism == "lmo" else None
  per_user = plan.sampling == "uls"
  mesh = None
  n_data, n_model = cfg.get("data_devices") or 1, cfg.get("model_devices") or 1
  if n_data * n_model > 1:
    if n_data * n_model > jax.device_count():
      raise ValueError(f"data_devices={n_data} x model_devices={n_model} but only "
                       f"{jax.device_count()} devices are visible")
    mesh = pipeline.make_mesh(jax.devices()[:n_data * n_model], model=n_model)

  optimizer = make_optimizer(cfg.optimizer, cfg.learning_rate, cfg.get("weight_decay", 0.0),
                             cfg.get("warmup_steps", 0), cfg.steps, cfg.get("learning_rates"))
  key = jax.random.PRNGKey(cfg.seed)
  if cfg.private:
    unit_loss = user_mean_loss(task.loss_fn) if per_user else task.loss_fn
    if cfg.mechanism in L1_MECHANISMS:
      if not cfg.get("l1_clip_norm"):
        raise ValueError(f"mechanism={cfg.mechanism!r} needs l1_clip_norm (its noise is "
                         "calibrated to the L1 sensitivity; L2 clipping does not bound it)")
      clip = {"l1_clip_norm": cfg.l1_clip_norm}
    else:
      clip = {"l2_clip_norm": cfg.l2_clip_norm}
    grad_fn = clipped_grad(unit_loss, has_aux=True, microbatch_size=cfg.get("microbatch_size"),
                           method=cfg.get("clipping_method") or "vmap", **clip)
    tx = private_transform(noise_multiplier=sigma, sensitivity=grad_fn.sensitivity(),
                           expected_batch_size=expected, optimizer=optimizer, key=key,
                           mechanism=cfg.mechanism, lmo_params=lmo_params, after_noise=sam)
  else:
    grad_fn = None
    tx = optax.chain(*([sam] if sam is not None else []), normalize(expected), optimizer)

  if sam is not None:
    ascent_key = jax.random.fold_in(key, 0x5A4D)

    @jax.jit
    def perturb_free(params, opt_state):
      return sam.perturb(params, flatness.find_state(opt_state))

    @jax.jit
    def perturb_charged(params, opt_state, asum, step):
      # A fresh privatised ascent gradient: same mechanism, its own key per step
      # (resume-safe), charged by `flatness.releases`.
      t = noise_transform(noise_multiplier=sigma, sensitivity=grad_fn.sensitivity(),
                          key=jax.random.fold_in(ascent_key, step), mechanism=cfg.mechanism,
                          lmo_params=lmo_params)
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
      loss, metrics = aux.loss, aux.loss_aux
    else:
      g, loss, metrics = plain_grad(params, batch, mask)
    stats = {k: jnp.sum(jnp.where(mask > 0, v, 0.0)) for k, v in dict(metrics, loss=loss).items()}
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
    if per_user:
      batch = _take(task.train, pb.indices)                    # [P, G, ...]
      batch["_example_mask"] = jnp.asarray(pb.example_mask)
    else:
      batch = _take(task.train, pb.indices)
    mask = jnp.asarray(pb.mask)
    if mesh is not None:
      batch, mask = pipeline.shard_batch(batch, mesh), pipeline.shard_batch(mask, mesh)
    return batch, mask

  state = TrainState(task.params, tx.init(task.params), jnp.zeros([], jnp.int32))
  lead = jax.process_index() == 0    # multi-host: one process writes metrics and plots
  mngr = None
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    text = cfg.to_json(indent=2) if hasattr(cfg, "to_json") else json.dumps(dict(cfg), indent=2)
    _check_same_run(workdir, json.loads(text))
    if lead:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(text)
    mngr = _checkpoint_manager(workdir)
    restored = _restore(mngr, state)
    if restored is not None:
      state = restored
  if mesh is not None:
    state_sharding = pipeline.param_sharding(state, mesh)   # replicated on a data-only mesh
    state = jax.device_put(state, state_sharding)

  # "epsilon" is always an upper bound per plan.unit: with an estimating
  # accountant (Edgeworth) it is the PLD epsilon of the noise used, and the
  # estimate is logged beside it as epsilon_<accountant>_estimate.
  def eps_at(step: int, accountant: str) -> float:
    if not cfg.private:
      return math.inf
    step = flatness.releases(step, mode=sam.mode if sam is not None else None,
                             active_steps=sam.active_steps if sam is not None else None)
    if lmo_params is not None:
      from dpjax.accounting.lmo import lmo_epsilon
      return lmo_epsilon(lmo_params, q, step, cfg.delta) if step else 0.0
    return accounting.epsilon_spent(sigma, q, step, cfg.delta, accountant, cfg.mechanism,
                                    **plan.accounting_kwargs())

  def eps_fields(step: int) -> Dict[str, Any]:
    out = {"epsilon": eps_at(step, accounting.bound_accountant(cfg.accountant)),
           "privacy_unit": plan.unit}
    if cfg.private and cfg.accountant in accounting.ESTIMATES:
      out[f"epsilon_{cfg.accountant}_estimate"] = eps_at(step, cfg.accountant)
    return out

  eval_fn = make_eval_fn(task) if task.splits else None
  metrics_path = os.path.join(workdir, "metrics.jsonl") if workdir and lead else None
  start = int(state.step)
  end = cfg.steps if stop_at_step is None else min(cfg.steps, stop_at_step)
  header = {"event": "start", "task": task.name, "private": bool(cfg.private),
            "noise_multiplier": sigma, "sampling_rate": q, "expected_batch_size": expected,
            "steps": cfg.steps, "resumed_from": start, "privacy_unit": plan.unit,
            "user_sampling": plan.sampling, "max_examples_per_user": plan.G,
            "lmo": lmo_params.as_dict() if lmo_params is not None else None,
            "dp_sam": None if sam is None else {"rho": sam.rho, "mode": sam.mode,
                                                "active_steps": sam.active_steps},
            "releases": _releases(cfg, sam) if cfg.private else 0}
  _log(metrics_path, header)

  bar = _progress(range(start, end), progress and lead, initial=start, total=cfg.steps)
  zeros = jax.tree.map(jnp.zeros_like, state.params)   # replicated like the params
  window: Dict[str, float] = {}
  t0, seen = time.perf_counter(), 0
  last: Dict[str, Any] = {}
  for step in bar:
    at = state.params
    if sam is not None and sam.mode == "charged" and step < sam.active_steps:
      asum = zeros   # an independent Poisson draw (stream offset by cfg.steps)
      for pb in sampler.batches(step + cfg.steps):
        asum, _ = accumulate(asum, state.params, *host_batch(pb))
      at = perturb_charged(state.params, state.opt_state, asum, step)
    elif sam is not None and sam.mode == "free":
      at = perturb_free(state.params, state.opt_state)
    gsum = zeros
    for pb in sampler.batches(step):
      gsum, stats = accumulate(gsum, at, *host_batch(pb))
      for k, v in stats.items():
        window[k] = window.get(k, 0.0) + float(v)
      seen += int(pb.example_mask.sum() if per_user else pb.mask.sum())
      window["count"] = window.get("count", 0.0) + float(pb.mask.sum())
    state = apply(state, gsum)
    done = step + 1
    if done % cfg.log_every == 0 or done == end:
      cnt = max(window.pop("count", 0.0), 1.0)
      rec = {"step": done, **{f"train_{k}": v / cnt for k, v in window.items()},
             **eps_fields(done), "delta": cfg.get("delta"),
             "examples_per_s": seen / max(time.perf_counter() - t0, 1e-9)}
      if eval_fn is not None and "dev" in task.splits:
        rec.update({f"dev_{k}": v for k, v in
                    evaluate(task, state.params, "dev", cfg.physical_batch_size, eval_fn).items()})
      _log(metrics_path, rec)
      last = rec
      window = {}
      if hasattr(bar, "set_postfix"):
        bar.set_postfix({k: f"{rec[k]:.3g}" for k in
                         ("train_loss", "dev_accuracy", "epsilon") if k in rec})
    if mngr is not None and (done % cfg.get("checkpoint_every", 10**9) == 0 or done == end):
      _save(mngr, state)

  final = dict(last)
  final["step"] = int(state.step)
  final.update(eps_fields(int(state.step)))
  if int(state.step) == cfg.steps and eval_fn is not None:
    for split in task.splits:
      for k, v in evaluate(task, state.params, split, cfg.physical_batch_size, eval_fn).items():
        final[f"{split}_{k}"] = v
    _log(metrics_path, dict(final, event="final"))
  if metrics_path and int(state.step) == cfg.steps:
    _plot_curves(metrics_path, os.path.join(workdir, "curves.png"))
  return RunResult(state.params, final, workdir, sigma if cfg.private else None)


def _log(path: Optional[str], rec: Dict[str, Any]) -> None:
  if path is None:
    return
  with open(path, "a") as f:
    f.write(json.dumps(rec, default=float) + "\n")


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
