"""Multi-process and sharded runs: two `jax.distributed` processes equal one; sharded restore."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dpjax.core.accounting.ledger import Ledger
from dpjax.training import rundir
from dpjax.training import sharding as shard_lib
from dpjax.training.plan import Secret
from dpjax.training.step import TrainState
from tests import distributed_worker

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _workers(tmp_path, nproc, devices_each, workdir, seed, tag):
  """Runs `nproc` worker processes to the end; their JSON records in process order."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  port = _free_port()
  outs = [str(tmp_path / f"{tag}{i}.json") for i in range(nproc)]
  procs = [
    subprocess.Popen(
      [sys.executable, WORKER, str(i), str(nproc), str(port), outs[i], workdir, seed],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(nproc)
  ]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return [json.load(open(o)) for o in outs]


def _max_diff(a, b):
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


@pytest.mark.skipif(
  tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 7),
  reason="multi-process checkpoints need jax >= 0.7 (refused with one line before)",
)
def test_two_processes_equal_one_process_and_share_one_fresh_secret(tmp_path):
  # Two jax.distributed processes of one CPU device each (data parallelism over
  # both by default), interrupted after 2 of 4 steps and resumed from their shared
  # orbax checkpoint, against one process on two devices: the same run.
  two = _workers(tmp_path, 2, 1, str(tmp_path / "two"), "3", "two")
  (one,) = _workers(tmp_path, 1, 2, str(tmp_path / "one"), "3", "one")
  assert [r["processes"] for r in two] == [2, 2] and one["processes"] == 1
  assert all(r["mesh_devices"] == 2 for r in two + [one])
  assert _max_diff(two[0]["params"], two[1]["params"]) == 0.0
  assert _max_diff(two[0]["params"], one["params"]) <= 1e-6
  assert two[0]["epsilon"] == pytest.approx(one["epsilon"], rel=1e-12)
  assert two[0]["dev_accuracy"] == one["dev_accuracy"]
  # No noise_seed: each process draws OS entropy, and process 0's is broadcast;
  # with a secret per process the samplers disagree and the processes diverge
  # (or hang in mismatched collectives). It is also the control: another noise
  # moves the parameters.
  a, b = _workers(tmp_path, 2, 1, "-", "-", "fresh")
  assert _max_diff(a["params"], b["params"]) == 0.0
  assert _max_diff(a["params"], one["params"]) > 1e-3


def test_restore_reads_each_array_onto_its_target_shards(tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs 8 virtual devices (set in conftest)")
  mesh = shard_lib.make_mesh(jax.devices()[:8], model=4)
  rng = np.random.default_rng(0)
  tree = {"w": rng.normal(size=(8, 12)).astype(np.float32), "b": np.arange(3.0, dtype=np.float32)}
  shardings = shard_lib.param_sharding(tree, mesh)
  saved = jax.device_put(tree, shardings)
  ckpt = rundir.Checkpoints(str(tmp_path))
  state = TrainState(saved, {"mu": saved}, jax.numpy.asarray(5, jax.numpy.int32))
  ckpt.save(state, Ledger(), Secret.from_seed(1), wait=True)
  step_sharding = shard_lib.replicated(mesh)
  params = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )
  target = TrainState(
    params, {"mu": params}, jax.ShapeDtypeStruct((), jax.numpy.int32, sharding=step_sharding)
  )
  restored = rundir.Checkpoints(str(tmp_path)).restore(target)
  for got in (restored.params, restored.opt_state["mu"]):
    assert got["w"].sharding == shardings["w"] and "model" in str(got["w"].sharding.spec)
    assert got["w"].addressable_shards[0].data.shape == (8, 3)  # a quarter per device
    for k in tree:
      np.testing.assert_array_equal(np.asarray(got[k]), tree[k])
  assert int(restored.step) == 5


def test_a_run_resumed_on_a_model_sharded_mesh_equals_one_run(tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs 8 virtual devices (set in conftest)")
  from dpjax.tasks import build_task
  from dpjax.training.loop import train

  cfg = distributed_worker.small_config(5, 2, 4, steps=6, every=3)
  task = build_task(cfg)
  whole = train(cfg, task, str(tmp_path / "whole"), progress=False)
  train(cfg, task, str(tmp_path / "cut"), progress=False, stop_at_step=3)
  resumed = train(cfg, task, str(tmp_path / "cut"), progress=False)
  assert resumed.final_metrics["step"] == 6
  split = [x for x in jax.tree.leaves(resumed.params) if "model" in str(x.sharding.spec)]
  assert split and all(len(x.sharding.device_set) == 8 for x in split)
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed.final_metrics["epsilon"] == whole.final_metrics["epsilon"]
