"""DistilDP on Shakespeare, full version (GPU): SmolLM2-135M teacher -> 6-layer student.

Teacher: the `smollm2-135m` GGUF asset (30 layers, BPE tokenizer), DP-fine-
tuned per example on genre-prefixed speeches; its noise is calibrated so that
teacher + DP genre histogram compose to `total_epsilon`. Student: its first
6 layers (same width and vocabulary), trained on the synthetic text only.
Sized for one GPU; on a CPU use `configs/distil_shakespeare.py`.
"""

import importlib.util
import os

import ml_collections


def _cpu():
  """The CPU-scale config next to this file (loaded by path: works from any directory)."""
  spec = importlib.util.spec_from_file_location(
    "distil_shakespeare",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "distil_shakespeare.py"),
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  c = _cpu()
  task = c.teacher.task.to_dict()
  task.update(model="smollm2-135m", seq_len=128, pretrain_steps=0)
  c.teacher.task = ml_collections.ConfigDict(task)
  c.teacher.update(
    batch_size=512, physical_batch_size=32, steps=200, learning_rate=3e-4, clipping_method="ghost"
  )
  c.generation.update(num_samples=8192, batch_size=128)
  c.student = ml_collections.ConfigDict(
    dict(
      model=dict(num_layers=6),
      init_from_public=True,
      lam=0.4,
      temperature=1.0,
      alpha=0.0,
      steps=1000,
      batch_size=64,
      learning_rate=3e-4,
      seed=0,
    )
  )
  return c
