"""dpjax: differentially private fine-tuning of language models in JAX.

The names users chain: `clipped_grad` (per-unit clipped gradient sums, by
vmap or `method="ghost"`; `group_mean` makes the loss of a user's examples),
the noise transforms in `dpjax.mechanisms`, `normalize`, the accountants in
`dpjax.accounting`, DP-Flat's pieces in `dpjax.flatness`, DistilDP's run in
`dpjax.distill`, and `dpjax.train`, the training loop built from them.

The layout (each layer imports only the ones below it; `tests/test_layout.py`
checks it): `core` (clipping, mechanisms, sampling, accounting, checks) ->
`models`, `data` (nothing private) -> `methods` (paper methods as transforms
and events) -> `training` (spec, plan, step, loop) -> `tasks` -> `pipelines`
(multi-stage runs) -> `cli`.
"""

import os as _os
import sys as _sys

# transformers' "PyTorch was not found" advice, printed on its import without torch: dpjax runs
# its models in JAX and needs torch only for what its extras say (a user's own setting wins)
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from dpjax.core import accounting, mechanisms
from dpjax.core.clipping import ClippedGradAux, clipped_grad, group_mean
from dpjax.core.mechanisms import normalize
from dpjax.methods import flatness
from dpjax.pipelines import distill
from dpjax.training.loop import train
from dpjax.training.task import Task

__version__ = "0.1.0"

# The short paths are importable modules too (`import dpjax.mechanisms`,
# `from dpjax.accounting import epsilon`): the same module objects.
for _short, _module in {
  "accounting": accounting,
  "mechanisms": mechanisms,
  "flatness": flatness,
  "distill": distill,
}.items():
  _sys.modules.setdefault(f"{__name__}.{_short}", _module)
del _short, _module

__all__ = [
  "ClippedGradAux",
  "Task",
  "accounting",
  "clipped_grad",
  "distill",
  "flatness",
  "group_mean",
  "mechanisms",
  "normalize",
  "train",
]
