"""Privacy accounting: events, accountants, calibration, the run's ledger.

Layers, each importing only the ones before it: `events` (DpEvent builders and
the leaf-accountant base) -> the accountants of dpjax's own releases
(`edgeworth`, `lmo`, `step_pld`) -> `accountants` (by name; epsilon and delta
of any event) -> `user_level` -> `calibrate` (the one noise search) ->
`ledger` (what a run released). `calibrate` and `ledger` find a mechanism's
events through `dpjax.core.mechanisms` (which builds on `events`, `lmo` and
`user_level`).
"""

from dpjax.core.accounting.accountants import (
  ACCOUNTANTS,
  ESTIMATES,
  bound_accountant,
  check_accountable,
  delta,
  epsilon,
)
from dpjax.core.accounting.calibrate import calibrate_noise, calibrate_scale, epsilon_spent
from dpjax.core.accounting.edgeworth import EdgeworthAccountant
from dpjax.core.accounting.events import (
  compose,
  dpsgd_event,
  fixed_batch_event,
  gaussian_step,
  laplace_step,
)
from dpjax.core.checks import check_unit

__all__ = [
  "ACCOUNTANTS",
  "ESTIMATES",
  "EdgeworthAccountant",
  "bound_accountant",
  "calibrate_noise",
  "check_accountable",
  "calibrate_scale",
  "check_unit",
  "compose",
  "delta",
  "dpsgd_event",
  "epsilon",
  "epsilon_spent",
  "fixed_batch_event",
  "gaussian_step",
  "laplace_step",
]
