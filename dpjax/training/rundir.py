"""The run directory: checkpoints with the ledger, the lock, strict JSON files.

A run directory holds `config.json` (the validated spec, no secret),
`metrics.jsonl` (strict JSON: non-finite numbers are null plus a
`<key>_nonfinite` flag; one row per logged step, replayed steps replace
their rows), orbax checkpoints (the state, and beside it in the same atomic
step the privacy ledger and the run's secret entropy), `privacy.json` (the
ledger and its epsilon) and `curves.png`; `.lock` is held (flock) by the
process using it and names it. The directory is owner-only (0700) and the
run writes its files owner-only. A checkpoint that fails to restore is
moved to `damaged-checkpoints/`, never deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import socket
import sys
import time
from typing import Any, Dict, Optional

import jax
import numpy as np

from dpjax.core.accounting.ledger import Ledger
from dpjax.training import spec as spec_lib
from dpjax.training.plan import ResumeRefused, Secret

PyTree = Any


def resumable_keys(allow_privacy_change: bool):
  """The config keys a resume may change (run control; privacy keys when allowed).

  Args:
    allow_privacy_change: include the privacy keys.

  Returns:
    A set of key names.
  """
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


def check_same_run(workdir: str, new: Dict[str, Any], allow_privacy_change: bool) -> None:
  """Refuses to resume a checkpoint written under a different config.

  Args:
    workdir: the run directory (its config.json is compared).
    new: the new resolved config.
    allow_privacy_change: let privacy keys differ (the ledger records the change).
  """
  path = os.path.join(workdir, "config.json")
  if not (os.path.isfile(path) and os.path.isdir(os.path.join(workdir, "checkpoints"))):
    return
  with open(path) as f:
    old = _flat(json.load(f))
  new = _flat(new)
  free = resumable_keys(allow_privacy_change)
  diff = sorted(k for k in set(old) | set(new) if k not in free and old.get(k) != new.get(k))
  if diff:
    changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:5])
    raise ResumeRefused(
      f"{workdir} holds a checkpoint of a run with a different config "
      f"({changes}); resume with the same config or use a new workdir"
    )


def _host_copy(x):
  """A multi-device array this process holds whole, as a host array; anything else as it is.

  orbax writes an array replicated over several devices by slicing it per
  replica under `jax.sharding.set_mesh`, which jax before 0.7 has no context
  manager for; a host copy (what orbax makes anyway before writing) avoids
  that path. An array split over several processes stays a jax.Array.
  """
  if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1 and x.is_fully_addressable:
    return np.asarray(x)
  return x


class Checkpoints:
  """Orbax checkpoints of the state with the ledger and the secret beside it (one atomic step).

  Saves are asynchronous: `save` returns once the arrays are copied off the
  devices (so the step may donate them) and the files are written in the
  background; a step directory appears, finalised, only when all of it is on
  disk, so a crash mid-write leaves the previous checkpoint as the newest.
  `wait` blocks until the pending save is on disk.
  """

  def __init__(self, workdir: str):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.path = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.mngr = ocp.CheckpointManager(
      self.path,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=2, create=True, enable_async_checkpointing=True
      ),
    )

  @staticmethod
  def latest_meta(workdir: str) -> Optional[Dict[str, Any]]:
    """The ledger, secret and step of the newest intact checkpoint in `workdir`, or None.

    A checkpoint whose privacy metadata cannot be read is set aside
    (`set_aside`, one line on stderr naming both) and the next newest is
    tried; when none is left, the run is refused. A directory holding no
    finalised checkpoint and none set aside (a crash inside the first save,
    which comes before any step) is no checkpoint.

    Args:
      workdir: the run directory.

    Returns:
      {"step", "ledger", "secret", "stream" (of the segment that wrote it: 0 in
      checkpoints that predate streams), "end" (the step that run was to stop
      at, or None)}, or None without a checkpoint.
    """
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
      return None
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(os.path.abspath(path))
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
      if not os.path.isdir(os.path.join(path, str(step), "meta")):
        raise ResumeRefused(
          f"{path} holds a checkpoint (step {step}) without a privacy ledger; "
          "its budget cannot be composed: use a new workdir"
        )
      try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return {
          "step": int(step),
          "ledger": Ledger.from_json(meta["ledger"]),
          "secret": Secret.from_json(meta["secret"]),
          "stream": int(meta.get("stream", 0)),
          "end": meta.get("end"),
        }
      except Exception as e:  # noqa: BLE001 - any unreadable metadata: try the older one
        set_aside(workdir, step, e)
    damaged = os.path.join(workdir, DAMAGED)
    if not (os.path.isdir(damaged) and os.listdir(damaged)):
      return None  # only unfinished saves (a crash in the first one): nothing was released
    raise ResumeRefused(
      f"no intact checkpoint is left in {path} (the damaged ones are in "
      f"{os.path.join(workdir, DAMAGED)}): the ledger cannot be continued; use a new workdir"
    )

  def save(
    self,
    state,
    ledger: Ledger,
    secret: Secret,
    *,
    stream: int = 0,
    end: Optional[int] = None,
    wait: bool = False,
  ) -> None:
    """Saves the train state with its ledger and secret (one orbax step).

    Args:
      state: the TrainState.
      ledger: everything released up to `state.step`.
      secret: the run's entropy.
      stream: the stream of the segment whose noise key the state holds
        (`dpjax.training.plan.segment_stream`).
      end: the step this run stops at (no step runs past a checkpoint there).
      wait: block until the step is on disk (the first save of a run: the
        secret is kept before anything is released).
    """
    ocp = self._ocp
    meta = {
      "ledger": ledger.to_json(),
      "secret": secret.to_json(),
      "step": int(state.step),
      "stream": str(int(stream)),
      "end": None if end is None else int(end),
    }
    state = jax.tree.map(_host_copy, state)
    self.mngr.save(
      int(state.step),
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )
    if wait:
      self.wait()

  def wait(self) -> None:
    """Blocks until the pending save, if any, is finalised on disk."""
    self.mngr.wait_until_finished()

  def restore(self, target: PyTree, step: Optional[int] = None) -> PyTree:
    """The newest checkpoint's train state, read straight into `target`'s placement.

    Args:
      target: a TrainState of `jax.ShapeDtypeStruct`s (or arrays) with the
        structure, shapes, dtypes and shardings to restore into; each array
        is read onto its own devices (a parameter split over a mesh's
        "model" axis is never assembled on one device first).
      step: the checkpoint's step (None: the newest).

    Returns:
      The restored state.
    """
    ocp = self._ocp
    step = self.mngr.latest_step() if step is None else step
    try:
      return self.mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
      )["state"]
    except Exception as e:  # noqa: BLE001 - a damaged file of any kind: the caller falls back
      raise DamagedCheckpoint(step, e) from e


DAMAGED = "damaged-checkpoints"  # where checkpoints that fail to restore are set aside


class DamagedCheckpoint(RuntimeError):
  """A checkpoint that failed to restore (a truncated or corrupted file)."""

  def __init__(self, step: int, error: BaseException):
    self.step, self.error = int(step), error
    super().__init__(f"checkpoint step {step} fails to restore: {_short(error)}")


def _short(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:120]}{'...' if len(text) > 120 else ''}"


def set_aside(workdir: str, step: int, error: BaseException) -> str:
  """Moves a damaged checkpoint out of `checkpoints/` (never deletes it) and says so in one line.

  Args:
    workdir: the run directory.
    step: the damaged checkpoint's step.
    error: why it failed.

  Returns:
    Where it now is (`<workdir>/damaged-checkpoints/<step>[.n]`).
  """
  src = os.path.join(workdir, "checkpoints", str(step))
  dst_dir = os.path.join(workdir, DAMAGED)
  os.makedirs(dst_dir, mode=0o700, exist_ok=True)
  dst, n = os.path.join(dst_dir, str(step)), 1
  while os.path.exists(dst):
    dst, n = os.path.join(dst_dir, f"{step}.{n}"), n + 1
  os.replace(src, dst)
  older = [int(d) for d in os.listdir(os.path.dirname(src)) if d.isdigit() and int(d) < step]
  then = f"resuming from step {max(older)}" if older else "no older checkpoint"
  print(
    f"dpjax: warning: checkpoint step {step} is damaged ({_short(error)}); set aside in {dst}, "
    f"{then}",
    file=sys.stderr,
    flush=True,
  )
  return dst


class RunLock:
  """`<workdir>/.lock`: one process per run directory, held by an OS lock on the file.

  The lock is `flock` on the file, which the OS releases when its process
  ends however it ends: a lock file left by a dead process (or naming a PID
  that was reused since) is free, and two processes can never both hold it
  (taking it is one atomic call; the file is checked to still be the one
  locked, since a releasing process removes it). The file names the holder's
  PID, host and process start time for the message. A PID reused by another
  process after a crash or reboot therefore never blocks a run: the lock is
  the OS's, not the PID's (so no start-time comparison is needed to call a
  lock stale). Only a filesystem that does not honour `flock` across hosts
  can keep a dead host's lock; the message says how to remove it.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self.held = False
    self._fd: Optional[int] = None

  def acquire(self) -> None:
    """Takes the lock; raises RunLocked if a live process holds it."""
    if os.path.isdir(self.path):
      raise RunLocked(
        f"{self.path} is a directory, not a lock file: remove it (nothing of dpjax's is in it) "
        "or use another workdir"
      )
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        who = os.read(fd, 256).decode(errors="replace").split(maxsplit=2) or ["?"]
        os.close(fd)
        on = f" on {who[1]}" if len(who) > 1 else ""
        since = f" (started {who[2]})" if len(who) > 2 else ""
        raise RunLocked(
          f"{os.path.dirname(self.path)} is in use by process {who[0]}{on}{since}: its lock "
          f"{self.path} is held by that live process and freed when it ends; wait for it or "
          "use another workdir (only if no such process runs, e.g. its host crashed on a "
          f"shared filesystem without flock, remove {self.path})"
        ) from None
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:  # removed by its releasing holder: lock the new one
        same = False
      if same:
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()} {_process_start()}".encode())
    self._fd, self.held = fd, True

  def release(self) -> None:
    """Removes the lock file and releases the lock, if this process holds it."""
    if self.held:
      self.held = False
      try:
        os.remove(self.path)  # while still locked: a waiter then finds another file
      except FileNotFoundError:
        pass
      os.close(self._fd)  # releases the flock
      self._fd = None


def _process_start() -> str:
  """This process's start time (UTC, ISO 8601, seconds), from /proc where there is one."""
  t = time.time()
  try:
    with open("/proc/self/stat") as f:  # field 22 (after the parenthesised name): clock ticks
      ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
      boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    t = boot + ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError, StopIteration):
    pass  # the time the lock was taken instead
  return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class RunLocked(RuntimeError):
  """Another live process holds the run directory."""


def make_private_dir(path: str) -> bool:
  """Creates `path` (and parents) owner-only, or makes an existing one owner-only.

  The run directory holds the noise secret (in the checkpoints) and what is
  derived from private data: nobody but its owner may read it.

  Args:
    path: the directory.

  Returns:
    True when this call created it.
  """
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(
      f"workdir {path} is a file, not a directory: name a directory (new or a run's)"
    )
  created = not os.path.isdir(path)
  os.makedirs(path, mode=0o700, exist_ok=True)
  if os.stat(path).st_mode & 0o077:
    os.chmod(path, 0o700)
  return created


def check_writable(path: str) -> None:
  """Raises OSError (naming `path`) unless a run can write there; leaves nothing behind.

  Called before a task is built, so a read-only, full or foreign directory
  is one line and not a traceback after minutes of work.

  Args:
    path: the run directory (created owner-only if missing, removed again).
  """
  created = make_private_dir(path)
  probe = os.path.join(path, f".probe-{os.getpid()}")
  try:
    with open(probe, "w") as f:
      f.write("x" * 4096)
      f.flush()
      os.fsync(f.fileno())
  finally:
    if os.path.exists(probe):
      os.remove(probe)
    if created and not os.listdir(path):
      os.rmdir(path)


def remove_unstarted(path: str) -> None:
  """Removes what a run that never checkpointed left in `path` (made by that run).

  The frozen features of its data (`features/`) are private-data-derived:
  a run that stopped before its first checkpoint (bad input found late, an
  interrupt while building) leaves none of them, and no empty directory.
  A directory holding a checkpoint is left as it is.

  Args:
    path: the run directory this invocation created.
  """
  if not os.path.isdir(path) or os.path.isdir(os.path.join(path, "checkpoints")):
    return
  shutil.rmtree(os.path.join(path, "features"), ignore_errors=True)
  if not os.listdir(path):
    os.rmdir(path)


@contextlib.contextmanager
def owner_only_files():
  """Within: files and directories this process creates are owner-only (umask 077).

  Orbax writes checkpoint files from background threads with the process's
  umask; the secret and arrays derived from private data are among them.
  The previous umask is restored on exit.

  Yields:
    Nothing.
  """
  old = os.umask(0o077)
  try:
    yield
  finally:
    os.umask(old)


def read_json(path: str) -> Optional[Dict[str, Any]]:
  """A JSON file's content, or None when the file does not exist.

  Args:
    path: the file.

  Returns:
    The parsed JSON, or None.
  """
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json_atomic(path: str, rec: Dict[str, Any]) -> None:
  """Writes `rec` as strict JSON through a temporary file, so a reader never sees half.

  Args:
    path: the file.
    rec: the record (non-finite floats become None, see `strict_json`).
  """
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(json.dumps(strict_json(rec), indent=2, allow_nan=False) + "\n")
  os.replace(tmp, path)


def strict_json(x: Any) -> Any:
  """`x` with every non-finite float replaced by None and a `<key>_nonfinite` flag beside it.

  Args:
    x: a JSON-like value.

  Returns:
    A value `json.dumps(..., allow_nan=False)` accepts.
  """
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


def truncate_metrics(path: str, step: int) -> None:
  """Drops rows of steps after `step` (they are replayed) and earlier final rows.

  Args:
    path: metrics.jsonl.
    step: the step resumed from.
  """
  if not os.path.isfile(path):
    return
  keep = []
  lines = [line for line in open(path) if line.strip()]
  for i, line in enumerate(lines):
    try:
      rec = json.loads(line)
    except ValueError:
      if i < len(lines) - 1:
        raise ValueError(
          f"{path} line {i + 1} is not JSON (only a last line can be torn by a crash); "
          "repair or remove that line"
        ) from None
      print(
        f"dpjax: warning: the last line of {path} was torn (a crash mid-write) and is dropped",
        file=sys.stderr,
        flush=True,
      )
      continue
    if rec.get("event") == "final" or ("event" not in rec and rec.get("step", 0) > step):
      continue
    keep.append(line if line.endswith("\n") else line + "\n")
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def log_jsonl(path: Optional[str], rec: Dict[str, Any]) -> None:
  """Appends `rec` as one strict JSON line to `path` (nothing when `path` is None).

  Args:
    path: the file, or None.
    rec: the record.
  """
  if path is None:
    return
  with open(path, "a") as f:
    f.write(json.dumps(strict_json(rec), allow_nan=False) + "\n")


def plot_curves(metrics_path: str, out_path: str) -> None:
  """loss, dev accuracy and epsilon against step, from metrics.jsonl.

  Args:
    metrics_path: metrics.jsonl.
    out_path: the PNG written.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  recs = [json.loads(l) for l in open(metrics_path)]
  recs = [r for r in recs if "step" in r and "event" not in r]
  if not recs:
    return
  panels = [
    ("train_loss", "train loss"),
    ("dev_accuracy", "dev accuracy"),
    ("epsilon", "epsilon spent"),
  ]
  panels = [(k, t) for k, t in panels if any(k in r for r in recs)]
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
  for ax, (k, title) in zip(np.atleast_1d(axes), panels):
    pts = [(r["step"], r[k]) for r in recs if k in r and r[k] is not None and math.isfinite(r[k])]
    if pts:
      ax.plot(*zip(*pts), marker=".")
    ax.set_title(title)
    ax.set_xlabel("step")
  fig.suptitle(curves_title(os.path.basename(os.path.dirname(os.path.abspath(out_path))), recs))
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)


def curves_title(run: str, recs) -> str:
  """`curves.png`'s title: the run, its steps, and the epsilon spent at its delta and unit.

  Args:
    run: the run's name (its directory).
    recs: the metrics rows (with "step").

  Returns:
    E.g. "quickstart-20261206: 300 steps, (2.994, 1e-05)-DP per example".
  """
  last = recs[-1]
  spent = [r for r in recs if r.get("epsilon") is not None]
  if not spent:
    return f"{run}: {last['step']} steps, not private"
  r = spent[-1]  # a row with epsilon has its delta and unit (the loop writes them together)
  guarantee = f"({r['epsilon']:.4g}, {r['delta']:g})-DP per {r['privacy_unit']}"
  return f"{run}: {last['step']} steps, {guarantee}"


# The trained parameters of a finished run that `dpjax export` reads (causal_lm runs).
TRAINED = "trained.npz"


def save_trained(workdir: str, params) -> None:
  """The trained parameters as `RUN_DIR/trained.npz` (keys: '/'-joined paths).

  Args:
    workdir: the run directory.
    params: the trained tree.
  """
  flat = {
    jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
    for k, v in jax.tree_util.tree_leaves_with_path(params)
  }
  tmp = os.path.join(workdir, TRAINED + ".tmp.npz")
  np.savez(tmp, **flat)
  os.replace(tmp, os.path.join(workdir, TRAINED))


def load_trained(workdir: str):
  """The tree `save_trained` wrote.

  Args:
    workdir: the run directory.

  Returns:
    The nested dict of arrays.
  """
  path = os.path.join(workdir, TRAINED)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no trained parameters (a finished causal_lm run writes them)")
  tree: dict = {}
  with np.load(path) as z:
    for key in z.files:
      node = tree
      *head, last = key.split("/")
      for h in head:
        node = node.setdefault(h, {})
      node[last] = z[key]
  return tree
