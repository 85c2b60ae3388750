"""Full DP fine-tuning of every MiniLM weight on RT sentences at eps = 3 (for a GPU).

Same data, privacy and accounting as `quickstart.py`; all 6 layers, the
embeddings and the head are clipped, noised and updated.
"""

import os

from dpjax.training.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), "quickstart.py"))
  c.task.max_length = 64
  c.task.train_layers = 6
  c.task.train_embeddings = True
  c.batch_size = 1024
  c.physical_batch_size = 256
  c.steps = 100
  c.optimizer = "adamw"
  c.learning_rate = 5e-4
  c.weight_decay = 0.01
  c.warmup_steps = 10
  c.log_every = 10
  return c
