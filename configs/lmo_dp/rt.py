"""LMO-DP vs Gaussian (`experiments/lmo_dp.py`): the quickstart with an L1 clip norm of 1 for the
Laplace-type noise, evaluated once at the end. The script sets the mechanism, (eps, delta), the
seed and, for LMO, the searched parameters of each cell.
"""

import os

from dpjax.training.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), "..", "quickstart.py"))
  c.l1_clip_norm = 1.0
  c.log_every = c.steps  # evaluate once, at the end
  return c
