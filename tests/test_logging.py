"""What a run tells while it runs: the plan first, a line per log step, timestamps, TensorBoard."""

import datetime
import json
import os
import struct

import pytest

from dpjax import cli


def _events(path):
  """Scalars of a TensorBoard event file, read from its TFRecord framing: tag -> [(step, value)]."""
  from tensorboardX.proto import event_pb2

  out = {}
  with open(path, "rb") as f:
    data = f.read()
  i = 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i : i + 8])
    ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
    i += 12 + n + 4  # length, its crc, the record, its crc
    for v in ev.summary.value:
      if v.HasField("simple_value"):
        out.setdefault(v.tag, []).append((ev.step, v.simple_value))
  return out


def test_plain_lines_timestamps_and_tensorboard(tmp_path, capsys):
  pytest.importorskip("tensorboardX")
  w = tmp_path / "run"
  argv = ["train", "configs/synthetic.py", "--workdir", str(w), "--no-progress"]
  argv += ["--set", "steps=40", "--set", "metric_writers=jsonl,tensorboard"]
  assert cli.main(argv) == 0
  err = capsys.readouterr().err.splitlines()
  rows = [json.loads(line) for line in open(w / "metrics.jsonl")]
  privacy = json.load(open(w / "privacy.json"))
  start, logged = rows[0], [r for r in rows if "event" not in r]
  # the plan, before the first step's line
  plan = [i for i, line in enumerate(err) if line.startswith("privacy plan: ")]
  steps = [i for i, line in enumerate(err) if " step " in line and "/40 " in line]
  assert len(plan) == 1 and len(steps) == 2 and plan[0] < steps[0]
  line = err[plan[0]]
  assert f"sigma {start['noise_multiplier']:.4g}" in line
  assert f"Poisson q {start['sampling_rate']:.4g}" in line
  assert "target eps 3 at delta 1e-05 per example" in line and "40 steps" in line
  assert "accountant pld" in line
  # one line per logged row, with its time and epsilon
  for i, r in zip(steps, logged):
    stamp, rest = err[i].split(" ", 1)
    assert stamp == r["time"] and rest.startswith(f"step {r['step']}/40 ")
    assert f"epsilon={r['epsilon']:.4g}" in rest
  times = [datetime.datetime.fromisoformat(r["time"]) for r in rows]
  assert all(t.tzinfo is not None for t in times) and times == sorted(times)
  assert logged[-1]["epsilon"] == pytest.approx(privacy["epsilon"], rel=1e-12)
  # TensorBoard holds the same scalars by step
  (name,) = os.listdir(w / "tensorboard")
  tb = _events(w / "tensorboard" / name)
  assert [s for s, _ in tb["epsilon"]] == [20, 40]
  for (step, value), r in zip(tb["epsilon"], logged):
    assert step == r["step"] and value == pytest.approx(r["epsilon"], rel=1e-6)
  assert tb["final/test_accuracy"][0][1] == pytest.approx(rows[-1]["test_accuracy"], rel=1e-6)


def test_bad_metric_writer_is_one_line_before_any_compute(tmp_path, capsys):
  w = tmp_path / "run"
  argv = ["train", "configs/synthetic.py", "--workdir", str(w), "--set", "metric_writers=mlflow"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [
    "dpjax: error: metric_writers must be comma-separated names from jsonl, tensorboard, wandb "
    "(tensorboard needs tensorboardX, wandb needs wandb), got 'mlflow'"
  ]
  assert not w.exists()


def test_weights_and_biases_offline_gets_the_metrics_rows(tmp_path, monkeypatch, capsys):
  wandb = pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no account: files under WORKDIR
  monkeypatch.setenv("WANDB_SILENT", "true")
  logged = []
  real_init = wandb.init

  def init(**kw):  # the real offline run, its log calls seen
    run = real_init(**kw)
    log = run.log
    run.log = lambda row, step=None: logged.append((step, dict(row))) or log(row, step=step)
    return run

  monkeypatch.setattr(wandb, "init", init)
  w = tmp_path / "run"
  argv = ["train", "configs/synthetic.py", "--workdir", str(w), "--no-progress"]
  argv += ["--set", "steps=4", "--set", "log_every=2", "--set", "metric_writers=jsonl,wandb"]
  assert cli.main(argv) == 0
  rows = [json.loads(line) for line in open(w / "metrics.jsonl")]
  rows = [r for r in rows if "step" in r and "event" not in r and r["step"] > 0]
  assert [s for s, _ in logged] == [r["step"] for r in rows] == [2, 4]
  for (_, got), row in zip(logged, rows):
    assert got["epsilon"] == pytest.approx(row["epsilon"]) and "step" not in got
  assert list((w / "wandb").glob("offline-run-*/run-*.wandb"))  # the offline run's file
