"""DP-Flat ablation, prefix mode (`experiments/dp_flat.py`): the quickstart's MiniLM on RT with
its top 2 layers frozen and an 8-token key/value prefix trained in each, 40 steps of 256.

`experiments/dp_flat.py` sets the variant (SAM, sparse prefixes, weight distillation), the
target epsilon and the seed of each grid cell on top of this file.
"""

import os

from dpjax.training.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), "..", "quickstart.py"))
  c.task.train_layers = 2
  c.task.prefix_tokens = 8
  c.batch_size = 256
  c.physical_batch_size = 128
  c.steps = c.log_every = c.checkpoint_every = 40
  return c
