"""dpjax: differentially private fine-tuning of language models in JAX.

The names users chain: `clipped_grad` (per-unit clipped gradient sums), the
noise transforms in `dpjax.mechanisms`, `normalize`, and the accountants in
`dpjax.accounting`.
"""

from dpjax import accounting, mechanisms
from dpjax.clipping import ClippedGradAux, clipped_grad
from dpjax.mechanisms import normalize

__version__ = "0.1.0"

__all__ = ["ClippedGradAux", "accounting", "clipped_grad", "mechanisms", "normalize"]
