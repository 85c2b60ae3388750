"""Task builders: a config's `task` section -> a `dpjax.train.Task`.

A task bundles the initial parameters, the per-example loss and the data
splits. Builders are looked up by `cfg.task.name` in `TASKS`.
"""

from __future__ import annotations

from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.train import Task

TASKS: Dict[str, Callable] = {}


def register(name: str):
  def deco(fn):
    TASKS[name] = fn
    return fn
  return deco


def build_task(cfg) -> Task:
  name = cfg.task.name
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
  return TASKS[name](cfg)


def _mlp_loss(params, ex, frozen):
  del frozen
  h = jnp.tanh(ex["x"] @ params["hidden"]["w"] + params["hidden"]["b"])
  logits = h @ params["head"]["w"] + params["head"]["b"]
  loss = -jax.nn.log_softmax(logits)[ex["label"]]
  return loss, {"accuracy": (jnp.argmax(logits) == ex["label"]).astype(jnp.float32)}


@register("synthetic")
def synthetic(cfg) -> Task:
  """A Gaussian-mixture classification problem with an MLP: for tests and smoke runs.

  Generated from `cfg.task.data_seed`; classes are separable at a margin the
  private run can find, so accuracy says whether training works.
  """
  t = cfg.task
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
      "hidden": {"w": jax.random.normal(k1, (t.dim, t.hidden)) / np.sqrt(t.dim),
                 "b": jnp.zeros(t.hidden)},
      "head": {"w": jax.random.normal(k2, (t.hidden, t.num_classes)) / np.sqrt(t.hidden),
               "b": jnp.zeros(t.num_classes)},
  }
  return Task("synthetic", params, {}, _mlp_loss, train, splits)
