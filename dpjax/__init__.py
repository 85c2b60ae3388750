"""dpjax: differentially private fine-tuning of language models in JAX.

The names users chain: `clipped_grad` (per-unit clipped gradient sums;
`method="ghost"` computes them as in `dpjax.ghost`; `group_mean` makes the
loss of a user's examples), the
noise transforms in `dpjax.mechanisms`, `normalize`, the accountants in
`dpjax.accounting`, DP-Flat's pieces in `dpjax.flatness` and DistilDP's in
`dpjax.distill`.
"""

from dpjax import accounting, distill, flatness, ghost, mechanisms
from dpjax.clipping import ClippedGradAux, clipped_grad, group_mean
from dpjax.mechanisms import normalize

__version__ = "0.1.0"

__all__ = ["ClippedGradAux", "accounting", "clipped_grad", "distill", "flatness",
           "ghost", "group_mean", "mechanisms", "normalize"]
