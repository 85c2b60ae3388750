"""Black-box audit of a whole training run with canaries, in one run (`dpjax audit`).

Steinke, Nasr and Jagielski 2023 (arXiv 2305.08846): m canaries are made,
each is added to the private training data independently with probability
1/2, the real plan trains ONCE on the result, and each canary is scored by
its loss under the final parameters (lower loss: more likely trained on).
`estimators.one_run_epsilon` turns the scores and the coin flips into a
lower bound on the run's epsilon per unit, to set beside the accountant's
claim. A canary is one unit (for user-level runs, a new user with one
example), so the claim it is compared with is the run's own.

Canaries: for a classification task (a "label" field and
`task.info["num_classes"]`), copies of random training examples with a
wrong label; for a language-model task (an "input_ids" field and
`task.info["decoder"]`), sequences of uniformly random tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, Optional

import jax
import numpy as np

from dpjax.auditing import estimators
from dpjax.training import loop
from dpjax.training import spec as spec_lib
from dpjax.training.rundir import strict_json, write_json_atomic
from dpjax.training.task import Task

AUDIT_FILE = "audit.json"
CANARY_FILE = "audit_canaries.json"  # which canaries a run directory was trained with
LOW_FPR = 0.05  # where the empirical and the claimed TPR are compared


@dataclasses.dataclass(frozen=True)
class CanarySet:
  """m canaries and which of them the run was given.

  Attributes:
    examples: the canaries, a dict of `[m, ...]` arrays laid out like `task.train`.
    included: `[m]` booleans, each True with probability 1/2, independently.
  """

  examples: Dict[str, np.ndarray]
  included: np.ndarray


def make_canaries(task: Task, m: int, seed: int) -> CanarySet:
  """Canaries for `task` (see the module docstring) and their coin flips.

  Args:
    task: the task whose training data the canaries join.
    m: how many canaries (>= 2).
    seed: the seed of the canaries and of the coin flips (the audit's own,
      not the run's noise).

  Returns:
    The `CanarySet`.
  """
  if int(m) != m or m < 2:
    raise ValueError(f"canaries must be an integer >= 2, got {m}")
  rng = np.random.default_rng([int(seed), 0xCA4A])
  train, info = task.train, task.info or {}
  n = len(next(iter(train.values())))
  idx = rng.choice(n, int(m), replace=m > n)
  examples = {k: np.array(v[idx]) for k, v in train.items()}
  if "label" in train and "num_classes" in info:
    k = int(info["num_classes"])
    shift = rng.integers(1, k, int(m))  # never the example's own label
    examples["label"] = ((train["label"][idx] + shift) % k).astype(train["label"].dtype)
  elif "input_ids" in train and "decoder" in info:
    vocab = int(info["decoder"].vocab_size)
    examples["input_ids"] = rng.integers(0, vocab, train["input_ids"][idx].shape).astype(
      train["input_ids"].dtype
    )
    if "attention_mask" in examples:
      examples["attention_mask"] = np.ones_like(examples["attention_mask"])
  else:
    raise ValueError(
      f"task {task.name!r} has no canary rule: one needs a 'label' field with "
      "task.info['num_classes'], or 'input_ids' with task.info['decoder']"
    )
  return CanarySet(examples, rng.random(int(m)) < 0.5)


def with_canaries(task: Task, canaries: CanarySet) -> Task:
  """`task` with the included canaries appended to its training data.

  Args:
    task: the task.
    canaries: the canaries and their coin flips.

  Returns:
    The task (for user-level tasks every canary is a user of its own).
  """
  inc = canaries.included
  train = {k: np.concatenate([v, canaries.examples[k][inc]]) for k, v in task.train.items()}
  user_ids = task.user_ids
  if user_ids is not None:
    ids = np.asarray(user_ids)
    if ids.dtype.kind in "iu":
      new = ids.max() + 1 + np.arange(int(inc.sum()), dtype=ids.dtype)
    else:
      new = np.array([f"canary/{i}" for i in range(int(inc.sum()))], dtype=object)
      ids = ids.astype(object)
    user_ids = np.concatenate([ids, new])
  return task._replace(train=train, user_ids=user_ids)


def canary_scores(task: Task, params, canaries: CanarySet, chunk: int = 256) -> np.ndarray:
  """Minus each canary's loss under `params` (higher: more likely trained on).

  Args:
    task: the task (its loss and frozen parameters).
    params: the trained parameters.
    canaries: the canaries.
    chunk: canaries per jitted call.

  Returns:
    `[m]` scores.
  """
  loss = jax.jit(jax.vmap(lambda ex: task.loss_fn(params, ex, task.frozen)[0]))
  m = len(canaries.included)
  out = [
    np.asarray(loss({k: v[i : i + chunk] for k, v in canaries.examples.items()}))
    for i in range(0, m, chunk)
  ]
  return -np.concatenate(out).astype(np.float64)


def _tpr_at(scores: np.ndarray, included: np.ndarray, fpr: float) -> Optional[float]:
  out = scores[~included]
  if len(out) < 1 / fpr or not included.any():
    return None
  t = np.quantile(out, 1.0 - fpr, method="higher")
  return float(np.mean(scores[included] > t))


def _claim_workdir(workdir: str, canaries: Dict[str, int]) -> None:
  """Marks `workdir` as an audit of these canaries; refuses a run directory of anything else.

  A checkpoint in `workdir` is resumed only when it was written by an audit
  with the same canaries (same count and seed): resuming a run trained
  without them, or with others, would mix two datasets in one ledger.
  """
  path = os.path.join(workdir, CANARY_FILE)
  if os.path.exists(path):
    with open(path) as f:
      had = json.load(f)
    if had != canaries:
      raise ValueError(
        f"{workdir} audits other canaries ({had}), not {canaries}: use a new workdir"
      )
    return
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ValueError(f"{workdir} holds a run trained without canaries: use a new workdir")
  os.makedirs(workdir, exist_ok=True)
  write_json_atomic(path, canaries)


def audit_run(
  cfg,
  task: Task,
  workdir: Optional[str],
  *,
  canaries: int,
  confidence: float = 0.95,
  seed: int = 0,
  progress: bool = True,
  accept_other_plan: bool = False,
) -> Dict[str, Any]:
  """Trains `cfg` once on `task` with canaries and audits the run.

  The canaries join the training data, which changes its size, so the
  sampling rate and a calibrated noise multiplier of the audited run can
  differ from the configured run's; that is refused, naming both, unless
  `accept_other_plan` (the record then holds the audited run's claim).

  Args:
    cfg: a private train config.
    task: the task.
    workdir: the run directory (audit.json is written beside privacy.json), or None.
    canaries: m, the number of canaries.
    confidence: the probability that the lower bound holds.
    seed: the seed of the canaries and their coin flips.
    progress: show the training progress bar.
    accept_other_plan: audit even when the canaries change the plan.

  Returns:
    The audit record (what audit.json holds).
  """
  spec = spec_lib.validate(spec_lib.with_defaults(cfg))  # bad input fails before any compute
  if not spec.private:
    raise ValueError("private=False: the run claims no epsilon, there is nothing to audit")
  cs = make_canaries(task, canaries, seed)
  audited = with_canaries(task, cs)
  _, want, _ = loop.prepare(cfg, task)  # the configured run
  _, got, _ = loop.prepare(cfg, audited)  # the run the canaries make
  changed = [
    f"{name} {a:.4g} -> {b:.4g}"
    for name, a, b in (
      ("sampling rate", want.sampling_rate, got.sampling_rate),
      ("noise multiplier", want.noise_multiplier, got.noise_multiplier),
    )
    if not math.isclose(a, b, rel_tol=1e-9)
  ]
  if changed and not accept_other_plan:
    n = len(next(iter(task.train.values())))
    raise ValueError(
      f"the audited run is not the configured one: {int(cs.included.sum())} canaries join the "
      f"{n} training examples ({', '.join(changed)}); audit it anyway with "
      "--accept-other-plan (accept_other_plan=True), or use fewer canaries"
    )
  if workdir:
    _claim_workdir(workdir, {"canaries": int(canaries), "seed": int(seed)})
  run = loop.train(cfg, audited, workdir, progress=progress)
  scores = canary_scores(task, run.params, cs)
  claim = run.privacy
  bound = estimators.one_run_epsilon(scores, cs.included, claim["delta"], confidence=confidence)
  tpr = _tpr_at(scores, cs.included, LOW_FPR)
  record = {
    "claimed": {
      "epsilon": claim["epsilon"],
      "delta": claim["delta"],
      "privacy_unit": claim["privacy_unit"],
      "accountant": claim["accountant"],
    },
    "canaries": int(len(cs.included)),
    "included": int(cs.included.sum()),
    "lower_bound": {
      "epsilon": bound.epsilon,
      "confidence": bound.confidence,
      "method": "one-run audit (arXiv 2305.08846, Theorem 5.2)",
      **bound.details,
    },
    "tpr_at_fpr": {
      "fpr": LOW_FPR,
      "tpr": tpr,
      "max_tpr_claimed": estimators.max_tpr(
        run.ledger.event(), LOW_FPR, accountant=claim["accountant"]
      ),
    },
    "seed": int(seed),
  }
  if workdir:
    write_json_atomic(os.path.join(workdir, AUDIT_FILE), record)
  return json.loads(json.dumps(strict_json(record)))
