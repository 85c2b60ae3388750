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


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_saves_it_and_says_how_to_resume(tmp_path, signum, code):
  w = str(tmp_path / "w")
  proc = subprocess.Popen(
    TRAIN + ["--workdir", w, "--set", "steps=100000"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.time() + 120
    while _steps_logged(w) < 3 and time.time() < deadline and proc.poll() is None:
      time.sleep(0.2)
    assert _steps_logged(w) >= 3, proc.stderr.read() if proc.poll() is not None else "slow"
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
  assert "dpjax train configs/synthetic.py --workdir" in last and "steps=100000" in last
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


def test_a_second_signal_stops_at_once_and_leaves_the_last_complete_checkpoint(tmp_path):
  w = str(tmp_path / "w")
  proc = subprocess.Popen(
    TRAIN + ["--workdir", w, "--set", "steps=100000"],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.time() + 120
    while _steps_logged(w) < 2 and time.time() < deadline and proc.poll() is None:
      time.sleep(0.2)
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
