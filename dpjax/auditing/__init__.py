"""Privacy checked from the attacker's side: empirical lower bounds on epsilon.

`estimators` turns canary scores into lower bounds (threshold test,
one-run audit, Gaussian-DP mu); `step_audit` audits one private step of a
plan as training runs it; `one_run` audits a whole training run with
canaries (`dpjax audit`).
"""

from dpjax.auditing.estimators import (
  EpsilonBound,
  GDPEstimate,
  clopper_pearson,
  gdp_epsilon,
  gdp_mu,
  max_tpr,
  one_run_epsilon,
  threshold_epsilon,
)

__all__ = [
  "EpsilonBound",
  "GDPEstimate",
  "clopper_pearson",
  "gdp_epsilon",
  "gdp_mu",
  "max_tpr",
  "one_run_epsilon",
  "threshold_epsilon",
]
