"""The one root finder of the accountants: where a privacy curve drops below a level.

`epsilon(delta)` of a curve known through `delta(epsilon)` (the Edgeworth
estimate and bound, group privacy's example-level curve) is the smallest
epsilon past which the curve stays at or below delta. Noise calibration has
its own bisection (`calibrate.calibrate_scale`), on the noise scale.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy import optimize


def last_crossing(excess: Callable[[float], float], x_max: float, samples: int = 257) -> float:
  """Smallest x >= 0 past which `excess(x) <= 0`, or inf if it is not reached by `x_max`.

  The bracket doubles from 1 until `excess` is <= 0; a function that need not
  be monotone (a truncated expansion) is scanned on `samples` grid points for
  its last sign change, which brentq refines.

  Example:
    >>> round(last_crossing(lambda x: 2.0 - x, x_max=10.0), 9)
    2.0

  Args:
    excess: the function whose last sign change is wanted.
    x_max: where the search gives up.
    samples: grid points of the scan.

  Returns:
    The crossing point (0 when `excess(0) <= 0`, inf past `x_max`).
  """
  if excess(0.0) <= 0:
    return 0.0
  hi = 1.0
  while excess(hi) > 0:
    hi *= 2.0
    if hi > x_max:
      return math.inf
  grid = np.linspace(0.0, hi, samples)
  vals = np.array([excess(x) for x in grid])
  i = int(np.nonzero(vals > 0)[0][-1])
  if i == len(grid) - 1:
    return float(hi)
  return float(optimize.brentq(excess, float(grid[i]), float(grid[i + 1]), xtol=1e-12, rtol=1e-10))
