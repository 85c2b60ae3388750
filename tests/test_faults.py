"""Faults an operator meets: signals, damaged files, torn rows; each ends in one line and a run
that resumes from what is intact."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

TRAIN = [
  sys.executable,
  "-m",
  "dpjax.cli",
  "train",
  "configs/synthetic.py",
  "--no-progress",
  "--set",
  "target_epsilon=None",
  "--set",
  "noise_multiplier=5.0",
  "--set",
  "task.num_train=600",
  "--set",
  "batch_size=60",
  "--set",
  "log_every=1",
  "--set",
  "checkpoint_every=1000",
]


def _steps_logged(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  rows = [json.loads(l) for l in open(path) if l.strip()]
  return max([r["step"] for r in rows if "event" not in r], default=0)


def _started(workdir: str, logged: int) -> subprocess.Popen:
  """A `dpjax train` of 20,000 steps in a subprocess, once it has logged `logged` steps."""
  proc = subprocess.Popen(
    TRAIN + ["--workdir", workdir, "--set", "steps=20000"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 120
  while _steps_logged(workdir) < logged and time.time() < deadline and proc.poll() is None:
    time.sleep(0.2)
  if _steps_logged(workdir) < logged:
    proc.kill()
    pytest.fail(f"no {logged} steps logged: {proc.communicate()[1][-2000:]}")
  return proc


@pytest.mark.parametrize(
  "signum, code",
  [
    (signal.SIGTERM, 143),
    pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),
  ],  # the same path
)
def test_a_signal_finishes_the_step_saves_it_and_says_how_to_resume(tmp_path, signum, code):
  w = str(tmp_path / "w")
  proc = _started(w, logged=3)
  try:
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == code, err
  last = err.strip().splitlines()[-1]
  assert "Traceback" not in err, err
  assert last.startswith(f"dpjax: stopped by {signal.Signals(signum).name} after step "), last
  step = int(last.split("after step ")[1].split()[0])
  assert f"resume with: {' '.join(TRAIN[2:3])}" not in last  # the command, not python -m
  assert "dpjax train configs/synthetic.py --workdir" in last and "steps=20000" in last
  # The step it stopped after is checkpointed with its ledger, and privacy.json says so.
  assert str(step) in os.listdir(os.path.join(w, "checkpoints"))
  privacy = json.load(open(os.path.join(w, "privacy.json")))
  assert privacy["steps"] == step == _steps_logged(w)
  assert privacy["ledger"][0]["steps"] == step
  # It resumes from there.
  out = subprocess.run(
    TRAIN + ["--workdir", w, "--set", f"steps={step + 2}"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr
  starts = [json.loads(l) for l in open(os.path.join(w, "metrics.jsonl")) if '"start"' in l]
  assert starts[-1]["resumed_from"] == step


@pytest.mark.slow  # a third interpreter start; the first signal's tests run by default
def test_a_second_signal_stops_at_once_and_leaves_the_last_complete_checkpoint(tmp_path):
  w = str(tmp_path / "w")
  proc = _started(w, logged=2)
  try:
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode in (-signal.SIGTERM, 143)
  # Whatever was saved is whole: the newest checkpoint restores, and the run resumes from it.
  from dpjax.training.rundir import Checkpoints

  at = Checkpoints.latest_meta(w)["step"]
  out = subprocess.run(
    TRAIN + ["--workdir", w, "--set", f"steps={at + 1}"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr


def _small(**overrides):
  from test_loop import small_config

  return small_config(**dict(dict(steps=6), **overrides))


def _train(cfg, w, **kw):
  from dpjax.tasks import build_task
  from dpjax.training.loop import train

  return train(cfg, build_task(cfg), str(w), progress=False, **kw)


def _starts(w):
  return [json.loads(l) for l in open(w / "metrics.jsonl") if '"start"' in l]


def _largest_file(d):
  files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["state", pytest.param("meta", marks=pytest.mark.slow)])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_older_one_resumes(
  tmp_path, capfd, damage
):
  w = tmp_path / "w"
  _train(_small(), w)
  if damage == "state":  # a truncated array file
    f = _largest_file(w / "checkpoints" / "6" / "state")
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)
  else:  # garbage privacy metadata
    (w / "checkpoints" / "6" / "meta" / "metadata").write_text("{garbage")
  capfd.readouterr()
  res = _train(_small(steps=9), w)
  err = capfd.readouterr().err
  assert "dpjax: warning: checkpoint step 6 is damaged" in err and "resuming from step 3" in err
  assert os.path.isdir(w / "damaged-checkpoints" / "6")  # set aside, never deleted
  assert _starts(w)[-1]["resumed_from"] == 3
  assert res.privacy["steps"] == 9 and res.ledger.steps == 9


def test_no_intact_checkpoint_is_one_line(tmp_path):
  from dpjax.training.plan import ResumeRefused

  w = tmp_path / "w"
  _train(_small(steps=3), w)
  for step in os.listdir(w / "checkpoints"):
    (w / "checkpoints" / step / "meta" / "metadata").write_text("{garbage")
  with pytest.raises(ResumeRefused, match="no intact checkpoint is left"):
    _train(_small(steps=6), w)


def test_only_an_unfinished_first_save_is_no_checkpoint(tmp_path):
  # A crash inside a run's first save (before any step) leaves checkpoints/ with
  # orbax's temporary directory only: nothing was released, so it is no
  # checkpoint (not "no intact checkpoint is left"); under jax.distributed this
  # is also what a process saw that read the directory while process 0 was
  # finalising its save (now kept apart by a barrier at each run's end).
  from dpjax.training.rundir import Checkpoints

  w = tmp_path / "w"
  os.makedirs(w / "checkpoints" / "0.orbax-checkpoint-tmp-1")
  assert Checkpoints.latest_meta(str(w)) is None
  assert _train(_small(steps=3), w).ledger.steps == 3


def test_a_torn_last_metrics_row_is_dropped_and_said(tmp_path, capfd):
  w = tmp_path / "w"
  _train(_small(), w, stop_at_step=3)
  with open(w / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "train_lo')  # a crash mid-write
  capfd.readouterr()
  _train(_small(), w)
  assert "last line of" in capfd.readouterr().err
  rows = [json.loads(l) for l in open(w / "metrics.jsonl")]  # every line parses again
  assert [r["step"] for r in rows if "event" not in r] == [3, 6]
  # A broken line that is not the last is not guessed at: one line naming it.
  lines = open(w / "metrics.jsonl").read().splitlines()
  lines[1] = lines[1][:10]
  (w / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match="metrics.jsonl line 2 is not JSON"):
    _train(_small(steps=9), w)


def _cli_train(w, *sets):
  from dpjax import cli

  argv = TRAIN[3:] + ["--workdir", str(w)]
  for s in sets:
    argv += ["--set", s]
  return cli.main(argv)


def test_a_read_only_workdir_is_one_line_before_the_task_is_built(tmp_path, capsys, monkeypatch):
  import errno

  from dpjax import cli
  from dpjax.training import rundir

  def read_only(path):
    raise OSError(errno.EROFS, "Read-only file system", str(path))

  built = []
  monkeypatch.setattr(rundir, "make_private_dir", read_only)
  monkeypatch.setattr(cli, "build_task", lambda cfg: built.append(cfg))
  w = tmp_path / "ro"
  assert _cli_train(w, "steps=3") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"dpjax: error: Read-only file system: {w}"), err
  assert not built and not w.exists()


def test_a_full_disk_mid_run_is_one_line_and_the_rerun_resumes_exactly(
  tmp_path, capsys, monkeypatch
):
  import errno

  from dpjax.training import rundir

  clean = tmp_path / "clean"
  assert _cli_train(clean, "steps=6", "log_every=2", "checkpoint_every=2") == 0
  w = tmp_path / "w"
  real, calls = rundir.write_json_atomic, []

  def full(path, rec):
    calls.append(path)
    if len(calls) == 2:  # privacy.json at the second log row
      raise OSError(errno.ENOSPC, "No space left on device", path)
    return real(path, rec)

  monkeypatch.setattr(rundir, "write_json_atomic", full)
  capsys.readouterr()
  assert _cli_train(w, "steps=6", "log_every=2", "checkpoint_every=2") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("dpjax: error: No space left on device: ") and "rerun" in err[-1]
  assert "Traceback" not in "\n".join(err)
  monkeypatch.setattr(rundir, "write_json_atomic", real)
  assert _cli_train(w, "steps=6", "log_every=2", "checkpoint_every=2") == 0
  got, want = (json.load(open(d / "privacy.json")) for d in (w, clean))
  assert got["steps"] == want["steps"] == 6
  assert got["epsilon"] == pytest.approx(want["epsilon"], rel=1e-12)


def test_per_example_gradients_larger_than_the_machine_are_one_line(tmp_path, capsys, monkeypatch):
  # The synthetic task trains 676 parameters: 128 per-example float32 copies are 346,112
  # bytes. With 300,000 bytes available the physical batch of 128 is refused before any
  # file is written (110 is the most that fits); a microbatch of 64 runs.
  from dpjax.training import task

  monkeypatch.setattr(task, "available_memory", lambda: 300_000)
  w = tmp_path / "w"
  assert _cli_train(w, "steps=2") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert (
    len(err) == 1 and "physical_batch_size=128 holds 128 per-example gradients of 676" in err[0]
  )
  assert "set microbatch_size to at most 110" in err[0] and not w.exists()
  assert _cli_train(w, "steps=2", "microbatch_size=64") == 0
