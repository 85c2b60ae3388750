"""The driver's hooks (`Callback`) and the built-in ones: metrics.jsonl, privacy.json,
checkpoints, the progress bar or log lines, TensorBoard; and the one-line privacy plan.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Any, Dict

import numpy as np
from tqdm.auto import tqdm

from dpjax.training import rundir
from dpjax.training.plan import AUTO_BATCH_CAP, AUTO_BATCH_DIVISOR, PrivacyPlan
from dpjax.training.step import TrainState


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


def now() -> str:
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
  noise = plan.mechanism.describe()
  follows = ""
  if spec.batch_size is None and spec.sampling_rate is None:  # said: the user set no batch
    follows = f" = N / {AUTO_BATCH_DIVISOR}, at most {AUTO_BATCH_CAP}: batch_size=None"
  parts = [
    f"privacy plan: target eps {target} at delta {plan.delta:g} per {unit}",
    noise,
    "fixed batches"
    if plan.sampling_rate is None
    else f"Poisson q {plan.sampling_rate:.4g} (expected batch {plan.expected_batch_size:g}"
    f"{follows})",
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


def _numbers(rec: Dict[str, Any]) -> Dict[str, float]:
  """A metrics row's finite numbers, its step left out: what the metric writers plot."""
  return {
    k: v
    for k, v in rec.items()
    if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and k != "step"
  }


class WandbWriter(Callback):
  """Weights & Biases: the run header as the W&B run's config, each numeric metric by step.

  Needs the optional `wandb` (`pip install 'dpjax[wandb]'`); the spec refuses
  `metric_writers=...wandb` without it before any compute. The project is
  `WANDB_PROJECT` (default "dpjax"), the run named after the run directory;
  `WANDB_MODE=offline` keeps everything under WORKDIR/wandb (`wandb sync`
  uploads it later). The rows are those of metrics.jsonl: training, dev and
  test metrics computed on your data without noise (monitoring, not a DP
  release), so a W&B project holding them is as private as the data.
  """

  def __init__(self, workdir: str):
    import wandb  # optional dependency

    self.run = wandb.init(
      project=os.environ.get("WANDB_PROJECT", "dpjax"),
      name=os.path.basename(os.path.abspath(workdir)),
      dir=workdir,
    )

  def on_start(self, header):
    self.run.config.update(rundir.strict_json(header), allow_val_change=True)

  def on_log(self, step, rec, state):
    self.run.log(_numbers(rec), step=int(step))

  def on_end(self, final, state):
    self.run.summary.update({f"final/{k}": v for k, v in _numbers(final).items()})
    self.run.finish()


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
    for k, v in _numbers(rec).items():
      self.writer.add_scalar(prefix + k, v, step)
    self.writer.flush()

  def on_log(self, step, rec, state):
    self._scalars("", step, rec)

  def on_end(self, final, state):
    self._scalars("final/", final["step"], final)
    self.writer.close()
