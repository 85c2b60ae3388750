"""EW-Tune on RT sentences: the quickstart, with its noise calibrated by a chosen accountant.

`--set accountant=edgeworth` calibrates sigma with the Edgeworth estimate
(a warning says it is not a bound); the run then reports the PLD epsilon of
that sigma as `epsilon` and the estimate beside it. `experiments/ew_tune.py
finetune` runs rdp / pld / edgeworth over seeds.
"""

import os

from dpjax.training.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), "quickstart.py"))
  c.accountant = "edgeworth"
  return c
