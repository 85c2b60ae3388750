"""dpjax: differentially private fine-tuning of language models in JAX.

The names users chain: `clipped_grad` (per-unit clipped gradient sums), the
noise transforms in `dpjax.mechanisms`, `normalize`, the accountants in
`dpjax.accounting`, and DP-Flat's transforms in `dpjax.flatness`
(`dpjax.distill` holds DistilDP; it imports the data stack, so it is not
imported here).
"""

from dpjax import accounting, flatness, mechanisms
from dpjax.clipping import ClippedGradAux, clipped_grad
from dpjax.mechanisms import normalize

__version__ = "0.1.0"

__all__ = ["ClippedGradAux", "accounting", "clipped_grad", "flatness", "mechanisms",
           "normalize"]
