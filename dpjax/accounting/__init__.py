"""Privacy accounting: events, epsilon/delta, calibration."""

from dpjax.accounting.calibrate import (ACCOUNTANTS, ESTIMATES, bound_accountant,
                                        calibrate_noise, check_unit, delta, epsilon,
                                        epsilon_spent)
from dpjax.accounting.edgeworth import EdgeworthAccountant
from dpjax.accounting.events import (compose, dpsgd_event, fixed_batch_event, gaussian_step,
                                     laplace_step)

__all__ = [
    "ACCOUNTANTS", "ESTIMATES", "EdgeworthAccountant", "bound_accountant", "calibrate_noise",
    "check_unit", "compose", "delta", "dpsgd_event", "epsilon", "epsilon_spent",
    "fixed_batch_event", "gaussian_step", "laplace_step",
]
