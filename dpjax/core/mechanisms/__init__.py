"""Privatizers as optax transforms, and the mechanism objects the plan and ledger hold.

Each mechanism takes the SUM of clipped per-unit gradients (from
`dpjax.clipped_grad`) and adds noise scaled to its sensitivity, exactly once
per `update`. Chain it before `normalize` and the optimizer:

    tx = optax.chain(gaussian(0.8, 1.0, key), normalize(1024), optax.adam(1e-3))

One module per kind of noise, each with its transforms and its `Mechanism`
object (`base`: the protocol and the registry): `gaussian_noise` (DP-SGD's,
arXiv 1607.00133, and correlated across steps: BandMF, arXiv 2306.08153,
and BLT, arXiv 2408.08868), `laplace_noise` (the L1 analogue), `lmo_noise`
(LMO-DP, arXiv 2405.18776), `adaptive` (the quantile-clipped Gaussian, arXiv
1905.03871); `draws` holds the exact full-range draws they all add.
A new kind of noise is a `Mechanism` subclass passed to `register`.
"""

from dpjax.core.mechanisms.adaptive import (
  AdaptiveGaussian,
  QuantileClipState,
  effective_noise_multiplier,
  gradient_noise_multiplier,
  quantile_clipped_gaussian,
)
from dpjax.core.mechanisms.base import Mechanism, from_json, get, names, register, unregister
from dpjax.core.mechanisms.draws import (
  EXPONENT_BITS,
  EXPONENT_WORDS,
  MAX_EXPONENTIAL,
  MAX_GAUSSIAN,
  NoiseState,
  cos_sin_turns,
  exponential_from_bits,
  find_state,
  normalize,
  secret_key,
  standard_exponential,
  standard_laplace,
  standard_normal,
  threefry_words,
)
from dpjax.core.mechanisms.gaussian_noise import (
  BLT,
  BandedNoiseState,
  BandMF,
  BLTNoiseState,
  Gaussian,
  banded_gaussian,
  blt_gaussian,
  gaussian,
)
from dpjax.core.mechanisms.laplace_noise import Laplace, laplace
from dpjax.core.mechanisms.lmo_noise import LMO, lmo

__all__ = [
  "AdaptiveGaussian",
  "BLT",
  "BandMF",
  "BLTNoiseState",
  "BandedNoiseState",
  "EXPONENT_BITS",
  "EXPONENT_WORDS",
  "Gaussian",
  "LMO",
  "Laplace",
  "MAX_EXPONENTIAL",
  "MAX_GAUSSIAN",
  "Mechanism",
  "NoiseState",
  "QuantileClipState",
  "banded_gaussian",
  "blt_gaussian",
  "cos_sin_turns",
  "effective_noise_multiplier",
  "exponential_from_bits",
  "find_state",
  "secret_key",
  "from_json",
  "gaussian",
  "get",
  "gradient_noise_multiplier",
  "laplace",
  "lmo",
  "names",
  "normalize",
  "quantile_clipped_gaussian",
  "register",
  "standard_exponential",
  "standard_laplace",
  "standard_normal",
  "threefry_words",
  "unregister",
]
