"""The optax optimizer of a config's `optimizer` / `learning_rate` keys."""

from __future__ import annotations

from typing import Optional

import jax
import optax

from dpjax.methods import dp_adam


def make_optimizer(
  name: str,
  learning_rate: float,
  weight_decay: float = 0.0,
  warmup_steps: int = 0,
  total_steps: int = 0,
  learning_rates: dict | None = None,
  noise_variance: Optional[float] = 0.0,
) -> optax.GradientTransformation:
  """The optax optimizer of a config's `optimizer` / `learning_rate` keys.

  `learning_rates` maps a prefix of a top-level parameter name to its own
  learning rate (e.g. {"layer_": 1e-3} for encoder layers beside a head at
  `learning_rate`); the longest matching prefix wins, the rest use `learning_rate`.

  Args:
    name: "adamw", "adam", "adam_bc" (DP-AdamBC, `dpjax.methods.dp_adam`) or
      "sgd" (momentum 0.9).
    learning_rate: the peak learning rate.
    weight_decay: AdamW's decoupled weight decay.
    warmup_steps: warm-up steps of a warm-up + cosine schedule (0: constant).
    total_steps: the run's steps (the cosine ends there at 0.1 x the peak).
    learning_rates: {parameter-name prefix: learning rate}, or None.
    noise_variance: the per-coordinate noise variance of the updates
      (`PrivacyPlan.noise_variance`), which "adam_bc" removes; None: it is
      given with each update (`update(..., noise_variance=Phi_t)`).

  Returns:
    The optax optimizer.
  """
  if learning_rates:
    rates = {str(k): float(v) for k, v in learning_rates.items()}
    for k, v in rates.items():
      if not k or not v > 0:
        raise ValueError(
          f"learning_rates needs non-empty name prefixes and positive rates, got {k!r}: {v}"
        )
    # label "" = the default group (an empty prefix is refused above, so it cannot collide)
    txs = {
      "": make_optimizer(
        name, learning_rate, weight_decay, warmup_steps, total_steps, noise_variance=noise_variance
      )
    }
    txs.update(
      {
        k: make_optimizer(
          name, v, weight_decay, warmup_steps, total_steps, noise_variance=noise_variance
        )
        for k, v in rates.items()
      }
    )

    def labels(params):
      if not isinstance(params, dict):
        raise ValueError("learning_rates needs a dict of parameters (top-level names)")

      def label(top):
        hits = [k for k in rates if top.startswith(k)]
        return max(hits, key=len) if hits else ""

      return {top: jax.tree.map(lambda _, l=label(top): l, sub) for top, sub in params.items()}

    return optax.multi_transform(txs, labels)
  if warmup_steps > 0 and total_steps > warmup_steps:
    lr = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps, total_steps, end_value=learning_rate * 0.1
    )
  else:
    lr = learning_rate
  if name == "adamw":
    return optax.adamw(lr, weight_decay=weight_decay)
  if name == "adam":
    return optax.adam(lr)
  if name == "sgd":
    return optax.sgd(lr, momentum=0.9)
  if name == "adam_bc":
    return dp_adam.dp_adam_bc(lr, noise_variance)
  raise ValueError(f"optimizer must be 'adamw', 'adam', 'adam_bc' or 'sgd', got {name!r}")


def fixed_noise_variance(spec, plan) -> Optional[float]:
  """DP-AdamBC's Phi when it is fixed for the run.

  Args:
    spec: the validated spec.
    plan: its privacy plan.

  Returns:
    Phi; None when it comes with each update (adaptive clipping); 0 for the
    other optimizers, which do not read it (BandMF's and BLT's cost a pass over
    C^-1's coefficients).
  """
  if spec.optimizer != "adam_bc":
    return 0.0
  return None if plan.adaptive is not None else plan.noise_variance()
