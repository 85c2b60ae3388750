"""One process of the multi-process test (`test_distributed.py`); not a test module.

    python distributed_worker.py PROCESS_ID NUM_PROCESSES PORT OUT WORKDIR NOISE_SEED

Runs the small synthetic config for 4 steps (interrupted after 2 and resumed
when WORKDIR is not "-"), on a data mesh over every device of every process,
and writes the final parameters as this process sees them to OUT (JSON).
"""

import json
import os
import sys

import jax
import numpy as np


def small_config(noise_seed, data_devices, model_devices=1, steps=4, every=2):
  """The small synthetic config of the sharded-run tests (sigma 1, log and save every `every`).

  Args:
    noise_seed: the noise seed, or None (a fresh secret).
    data_devices: the data axis (1 under jax.distributed: all devices).
    model_devices: the model axis.
    steps: the run's steps.
    every: log_every and checkpoint_every.

  Returns:
    The config.
  """
  from dpjax.training.config import CONFIG_DIR, load_config

  cfg = load_config(os.path.join(CONFIG_DIR, "synthetic.py"))
  cfg.task.num_train, cfg.task.num_eval = 400, 64
  cfg.steps, cfg.batch_size, cfg.physical_batch_size = steps, 40, 16
  cfg.target_epsilon, cfg.noise_multiplier, cfg.noise_seed = None, 1.0, noise_seed
  cfg.log_every, cfg.checkpoint_every = every, every
  cfg.data_devices, cfg.model_devices = data_devices, model_devices
  return cfg


def main(argv):
  pid, nproc, port, out, workdir, seed = argv
  pid, nproc = int(pid), int(nproc)
  if nproc > 1:
    jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid)
  from dpjax.tasks import build_task
  from dpjax.training.loop import train

  # data_devices 1 under jax.distributed: the default, all devices of all processes
  cfg = small_config(None if seed == "-" else int(seed), 2 if nproc == 1 else 1)
  task = build_task(cfg)
  workdir = None if workdir == "-" else workdir
  if workdir:
    train(cfg, task, workdir, progress=False, stop_at_step=2)
  result = train(cfg, task, workdir, progress=False)
  params = {
    jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0)).tolist()
    for path, leaf in jax.tree_util.tree_leaves_with_path(result.params)
  }
  rec = {
    "process": jax.process_index(),
    "processes": jax.process_count(),
    "devices": jax.device_count(),
    "mesh_devices": len(jax.tree.leaves(result.params)[0].sharding.device_set),
    "params": params,
    "epsilon": result.final_metrics.get("epsilon"),
    "dev_accuracy": result.final_metrics.get("dev_accuracy"),
  }
  with open(out, "w") as f:
    json.dump(rec, f)


if __name__ == "__main__":
  main(sys.argv[1:])
