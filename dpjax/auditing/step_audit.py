"""White-box audit of one private step, run through the plan's own functions.

A worst-case canary (Nasr et al. 2021, arXiv 2101.04535, the "Dirac"
canary) is a unit whose gradient is a huge multiple of the first basis
vector, so that clipping sends exactly the sensitivity along one coordinate
while every other unit contributes nothing. Each trial releases one step of
the plan (the clipped sum through `make_grad_fn`, the same clipped-gradient
construction the plan uses, then `PrivacyPlan.noise_transform`, the
mechanism training applies) with and without the canary, the canary
entering as the plan's sampler would let it: with probability q for a unit
sampled by Poisson (examples, or ULS users), as Binomial(G, q) of its G
examples under ELS, independently again for charged DP-SAM's ascent
release. The released first coordinate (summed over a step's releases) is
the score; `estimators.threshold_epsilon` turns the two score samples into
a lower bound on the step's epsilon, to set beside the accountant's claim.

For Gaussian and Laplace noise the score is the likelihood ratio's
sufficient statistic, so the audit is as strong as any test of these
releases. For LMO noise the attacker does not see b (the accountant assumes
it does): the bound stays valid, only weaker.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.auditing import estimators
from dpjax.core import accounting
from dpjax.core.clipping import GroupUnits
from dpjax.training import loop
from dpjax.training.plan import PrivacyPlan, make_grad_fn

DIM = 4  # coordinates released per trial; only the first carries the canary
CANARY_SCALE = 1e3  # the canary's gradient norm, in clip norms (clipping binds)


@dataclasses.dataclass(frozen=True)
class StepAudit:
  """The claimed epsilon of one step beside what the audit of that step shows.

  Attributes:
    mechanism: the plan's noise ("gaussian", "laplace", "lmo").
    unit: "example" or "user".
    sampling: None, "els" or "uls".
    noise_multiplier: sigma (0 for LMO).
    sampling_rate: q.
    releases: privatised gradients per step (2 with charged DP-SAM).
    trials: releases with the canary, and as many without.
    delta: the delta of both numbers.
    claimed_epsilon: the accountant's epsilon of one step (an upper bound).
    lower: the audit's lower bound (`estimators.threshold_epsilon`).
    gdp: the Gaussian-DP mu of the two score samples (`estimators.gdp_mu`).
  """

  mechanism: str
  unit: str
  sampling: Optional[str]
  noise_multiplier: float
  sampling_rate: float
  releases: int
  trials: int
  delta: float
  claimed_epsilon: float
  lower: estimators.EpsilonBound
  gdp: estimators.GDPEstimate

  def to_json(self) -> dict:
    """The audit as a JSON-ready dict.

    Returns:
      The fields, the bound and the GDP estimate as nested dicts.
    """
    return dataclasses.asdict(self)


def _linear_loss(params, example, frozen):
  del frozen
  return jnp.dot(params["w"], example["x"]), {}


def _clipped_canary(spec, plan: PrivacyPlan) -> jax.Array:
  """The clipped sum of a batch holding only the canary: the sensitivity along e_0."""
  grad_fn = make_grad_fn(spec, _linear_loss, plan.per_user)
  sens = grad_fn.sensitivity()
  if abs(sens - plan.grad_fn.sensitivity()) > 1e-9 * sens:
    raise AssertionError("the audit's clipping differs from the plan's")  # make_grad_fn changed
  x = jnp.zeros(DIM).at[0].set(CANARY_SCALE * sens)
  params = {"w": jnp.zeros(DIM)}
  if plan.per_user:
    g = plan.max_examples_per_user
    batch = GroupUnits({"x": jnp.tile(x, (1, g, 1))}, jnp.ones((1, g)))
  else:
    batch = {"x": x[None]}
  summed, _ = grad_fn(params, batch, None, mask=jnp.ones(1))
  return summed["w"]


def _inclusions(plan: PrivacyPlan, rng: np.random.Generator, n: int) -> np.ndarray:
  """How many copies of the canary's clipped gradient each of n releases holds."""
  q = float(plan.sampling_rate)
  if plan.sampling == "els":  # each of the user's G examples sampled on its own
    return rng.binomial(plan.max_examples_per_user, q, n).astype(np.float32)
  return (rng.random(n) < q).astype(np.float32)


def audit_plan(
  spec,
  plan: PrivacyPlan,
  *,
  trials: int = 1_000_000,
  confidence: float = 0.95,
  seed: int = 0,
  chunk: int = 1 << 16,
) -> StepAudit:
  """Audits one step of `plan` (a private plan of `spec`, at step 0).

  Args:
    spec: the validated spec the plan was made from.
    plan: the plan (`dpjax.training.loop.prepare`); its noise transform is
      what is audited.
    trials: the releases with the canary (and as many without).
    confidence: the probability that the lower bound holds.
    seed: the seed of the audit's noise keys and canary inclusions (public:
      the audit, not training, draws them).
    chunk: releases computed per jitted call.

  Returns:
    The `StepAudit`.
  """
  if not plan.private:
    raise ValueError("a non-private plan releases its gradients in the clear: nothing to audit")
  if plan.start_step != 0 or plan.prior.segments:
    raise ValueError("audit a fresh plan (start_step 0, empty ledger)")
  if trials < 1000:
    raise ValueError(f"trials must be >= 1000, got {trials}")
  if plan.adaptive is not None:
    raise ValueError(
      "the step audit covers a fixed clip norm; adaptive_clipping also releases a noised "
      "count (audit with adaptive_clipping=None at the same noise_multiplier)"
    )
  canary = _clipped_canary(spec, plan)
  releases = 1 + plan.ascent_releases(0, 1)
  claimed = plan.ledger_at(1).epsilon(plan.delta, accounting.bound_accountant(plan.accountant))

  @jax.jit
  def released(keys, counts):  # keys [n, 2], counts [n]: the first coordinate released
    def one(key, count):
      tx = plan.noise_transform(key)
      grads = {"w": count * canary}
      out, _ = tx.update(grads, tx.init(grads))
      return out["w"][0]

    return jax.vmap(one)(keys, counts)

  rng = np.random.default_rng(seed)
  root = jax.random.PRNGKey(seed)
  scores = {}
  for world, with_canary in (("in", True), ("out", False)):
    total = np.zeros(trials)
    for r in range(releases):
      key = jax.random.fold_in(jax.random.fold_in(root, int(with_canary)), r)
      parts = []
      for start in range(0, trials, chunk):
        n = min(chunk, trials - start)
        keys = jax.random.split(jax.random.fold_in(key, start), n)
        counts = _inclusions(plan, rng, n) if with_canary else np.zeros(n, np.float32)
        parts.append(np.asarray(released(keys, jnp.asarray(counts))))
      total += np.concatenate(parts)
    scores[world] = total
  lower = estimators.threshold_epsilon(
    scores["in"], scores["out"], plan.delta, confidence=confidence
  )
  gdp = estimators.gdp_mu(scores["in"], scores["out"], confidence=confidence, seed=seed)
  return StepAudit(
    mechanism=plan.mechanism.name,
    unit=plan.unit,
    sampling=plan.sampling,
    noise_multiplier=float(plan.noise_multiplier),
    sampling_rate=float(plan.sampling_rate),
    releases=int(releases),
    trials=int(trials),
    delta=float(plan.delta),
    claimed_epsilon=float(claimed),
    lower=lower,
    gdp=gdp,
  )


def step_audit(cfg, task, **kwargs) -> StepAudit:
  """Audits one step of the private plan `dpjax.train(cfg, task)` would run.

  Args:
    cfg: a train config (privacy keys as for training).
    task: the task (its data set q, the users and G; its model is not used).
    **kwargs: `audit_plan`'s keyword arguments (trials, confidence, seed, chunk).

  Returns:
    The `StepAudit`.
  """
  spec, plan, _ = loop.prepare(cfg, task)
  return audit_plan(spec, plan, **kwargs)
