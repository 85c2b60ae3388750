"""DP-Flat ablation, full mode (`experiments/dp_flat.py --mode full`): the weights of MiniLM's top
2 layers trained (ghost clipping, Adam 1e-3 for the layers, 0.01 for the head), 40 steps of 256.
"""

import os

from dpjax.training.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), "..", "quickstart.py"))
  c.task.train_layers = 2
  c.clipping_method = "ghost"
  c.learning_rates = {"layer_": 1e-3}  # the head keeps the base rate, 0.01
  c.batch_size = 256
  c.physical_batch_size = 128
  c.steps = c.log_every = c.checkpoint_every = 40
  return c
