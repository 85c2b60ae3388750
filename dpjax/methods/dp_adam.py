"""DP-Adam with the noise removed from the second moment (DP-AdamBC, arXiv 2312.14334).

Adam's second moment of a privatised gradient g~ = g + z (z the noise of
the normalised sum, i.i.d. per coordinate with variance Phi) estimates
E[g^2] + Phi: with DP noise Phi dominates, the update m / sqrt(v) becomes
m / sqrt(Phi), a constant rescaling, and DP-Adam behaves like DP-SGD with
momentum (Tang, Shpilevskiy, Lecuyer 2023). DP-AdamBC subtracts the known
Phi from the bias-corrected second moment:

    theta -= lr * m_hat / sqrt(max(v_hat - Phi, gamma))

Phi is public (the noise multiplier, the sensitivity and the expected batch
size are), so the correction is post-processing of the released gradients:
no privacy cost. `dpjax.training` gives each plan's Phi
(`PrivacyPlan.noise_variance`) to `optimizer="adam_bc"`.

When the variance moves from step to step (adaptive clipping: Phi_t =
(sigma_g C_t / B)^2 with C_t a function of earlier releases), v_hat
estimates E[g^2] + the same bias-corrected moving average of Phi_t, so that
average is what is removed: `noise_variance=None` takes Phi_t per update
(`update(..., noise_variance=Phi_t)`) and keeps the average in its state.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from dpjax.core.checks import check_positive


class ScaleByAdamBCState(NamedTuple):
  """Adam's moments and step count, and the moving average of a per-step noise variance."""

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  phi: jax.Array  # b2-average of the Phi_t given per update (0 with a fixed Phi)


def scale_by_adam_bc(
  noise_variance: Optional[float], b1: float = 0.9, b2: float = 0.999, gamma: float = 1e-8
) -> optax.GradientTransformationExtraArgs:
  """Adam's scaling with the noise variance removed from the second moment.

  Examples:
    >>> tx = scale_by_adam_bc(noise_variance=0.0)   # no noise: Adam with eps -> sqrt(gamma)
    >>> state = tx.init(jnp.zeros(2))
    >>> u, state = tx.update(jnp.array([1.0, -2.0]), state)
    >>> [round(float(x), 4) for x in u]
    [1.0, -1.0]
    >>> tx = scale_by_adam_bc(noise_variance=None)  # Phi_t given with each update
    >>> u, state = tx.update(jnp.array([1.0, -2.0]), tx.init(jnp.zeros(2)), noise_variance=0.0)
    >>> [round(float(x), 4) for x in u]
    [1.0, -1.0]

  Args:
    noise_variance: Phi, the variance of each coordinate of the noise in
      the updates this transform receives (after normalisation), >= 0; or
      None: Phi_t is given to every `update` as `noise_variance=` and its
      b2-average (bias-corrected, as v's) is removed.
    b1: the first moment's decay.
    b2: the second moment's decay.
    gamma: the floor of the corrected second moment (> 0), Adam's eps^2.

  Returns:
    An optax transform; its updates are m_hat / sqrt(max(v_hat - Phi, gamma)).
  """
  if noise_variance is not None:
    check_positive(noise_variance, "noise_variance", allow_zero=True)
  check_positive(gamma, "gamma")
  for name, b in (("b1", b1), ("b2", b2)):
    if not 0.0 <= b < 1.0:
      raise ValueError(f"{name} must be in [0, 1), got {b}")

  def init_fn(params):
    zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
    return ScaleByAdamBCState(jnp.zeros([], jnp.int32), zeros, zeros, jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    del params
    given = extra_args.get("noise_variance")
    if (noise_variance is None) != (given is not None):
      raise ValueError(
        "scale_by_adam_bc(noise_variance=None) needs update(..., noise_variance=Phi_t), "
        "and a fixed noise_variance takes none"
      )
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, updates)
    nu = jax.tree.map(
      lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, updates
    )
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    phi = state.phi
    if noise_variance is None:  # E[v_hat] = E[g^2] + the same average of Phi_t
      phi = b2 * phi + (1 - b2) * jnp.asarray(given, jnp.float32)
      phi_hat = phi / c2
    else:
      phi_hat = noise_variance
    out = jax.tree.map(
      lambda m, v, g: ((m / c1) / jnp.sqrt(jnp.maximum(v / c2 - phi_hat, gamma))).astype(g.dtype),
      mu,
      nu,
      updates,
    )
    return out, ScaleByAdamBCState(count, mu, nu, phi)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dp_adam_bc(
  learning_rate,
  noise_variance: Optional[float],
  b1: float = 0.9,
  b2: float = 0.999,
  gamma: float = 1e-8,
) -> optax.GradientTransformation:
  """DP-AdamBC: `scale_by_adam_bc` then the (negated) learning rate.

  Args:
    learning_rate: a float or an optax schedule.
    noise_variance: Phi, see `scale_by_adam_bc`.
    b1: the first moment's decay.
    b2: the second moment's decay.
    gamma: the floor of the corrected second moment.

  Returns:
    The optimizer.
  """
  return optax.chain(
    scale_by_adam_bc(noise_variance, b1, b2, gamma), optax.scale_by_learning_rate(learning_rate)
  )
