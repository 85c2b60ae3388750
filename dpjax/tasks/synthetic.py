"""Synthetic tasks for tests, smoke runs and the user-level experiments (no files needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.training.task import Task, task_section


def _mlp_loss(params, ex, frozen):
  del frozen
  h = jnp.tanh(ex["x"] @ params["hidden"]["w"] + params["hidden"]["b"])
  logits = h @ params["head"]["w"] + params["head"]["b"]
  loss = -jax.nn.log_softmax(logits)[ex["label"]]
  return loss, {"accuracy": (jnp.argmax(logits) == ex["label"]).astype(jnp.float32)}


DEFAULTS = {"num_users": None}  # the task section's optional keys (user_ids when set)


def synthetic(cfg) -> Task:
  """A Gaussian-mixture classification problem with an MLP: for tests and smoke runs.

  Generated from `cfg.task.data_seed`; classes are separable at a margin the
  private run can find, so accuracy says whether training works.

  Args:
    cfg: a train config whose task section names "synthetic".

  Returns:
    The Task.
  """
  t = task_section(cfg.task, DEFAULTS)
  rng = np.random.default_rng(t.data_seed)
  centers = rng.normal(size=(t.num_classes, t.dim)) * 0.4

  def split(n):
    y = rng.integers(0, t.num_classes, n)
    x = centers[y] + rng.normal(size=(n, t.dim))
    return {"x": x.astype(np.float32), "label": y.astype(np.int32)}

  train = split(t.num_train)
  splits = {"dev": split(t.num_eval), "test": split(t.num_eval)}
  k1, k2 = jax.random.split(jax.random.PRNGKey(t.data_seed))
  params = {
    "hidden": {
      "w": jax.random.normal(k1, (t.dim, t.hidden)) / np.sqrt(t.dim),
      "b": jnp.zeros(t.hidden),
    },
    "head": {
      "w": jax.random.normal(k2, (t.hidden, t.num_classes)) / np.sqrt(t.hidden),
      "b": jnp.zeros(t.num_classes),
    },
  }
  user_ids = None
  if t.num_users:
    # Skewed user sizes (Zipf-like), as real user data is: a few users hold many examples.
    weights = 1.0 / np.arange(1, t.num_users + 1)
    user_ids = rng.choice(t.num_users, size=t.num_train, p=weights / weights.sum())
  return Task(
    "synthetic",
    params,
    {},
    _mlp_loss,
    train,
    splits,
    user_ids,
    info={"num_classes": int(t.num_classes)},
  )


def user_mean(cfg) -> Task:
  """Private mean estimation over users (the toy of arXiv 2407.07737), in seconds on CPU.

  `num_users` users each hold `examples_per_user` vectors in R^dim around
  their own mean mu_u = mu + user_spread * z_u; with `diverse` their examples
  scatter around mu_u (unit spread), otherwise all of a user's examples are
  identical. Loss 0.5 ||theta - x||^2; the "test" split holds mu itself, so
  its `loss` is 0.5 ||theta - mu||^2, the estimation error.

  Args:
    cfg: a train config whose task section names "user_mean".

  Returns:
    The Task.
  """
  t = cfg.task
  rng = np.random.default_rng(t.data_seed)
  mu = rng.normal(size=t.dim)
  mu *= t.mean_norm / np.linalg.norm(mu)
  user_means = mu + t.user_spread * rng.normal(size=(t.num_users, t.dim)) / np.sqrt(t.dim)
  x = np.repeat(user_means, t.examples_per_user, axis=0)
  if t.diverse:
    x = x + rng.normal(size=x.shape) / np.sqrt(t.dim)
  user_ids = np.repeat(np.arange(t.num_users), t.examples_per_user)

  def loss_fn(p, ex, frozen):
    del frozen
    loss = 0.5 * jnp.sum((p["theta"] - ex["x"]) ** 2)
    return loss, {}

  return Task(
    "user-mean",
    {"theta": jnp.zeros(t.dim)},
    {},
    loss_fn,
    {"x": x.astype(np.float32)},
    {"test": {"x": mu[None].astype(np.float32)}},
    user_ids,
  )
