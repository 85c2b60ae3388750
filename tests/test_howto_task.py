"""How to add a task: your own data and model, trained privately by `dpjax.train`.

docs/howto-task.md shows this file as it is, so the page is what this test runs.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import dpjax
from dpjax.core import accounting


def logistic_task(n=2000, dim=8, seed=0) -> dpjax.Task:
  """A linear classifier on two Gaussian blobs: data, parameters, a per-example loss."""
  rng = np.random.default_rng(seed)

  def split(m):
    y = rng.integers(0, 2, m)
    x = rng.normal(size=(m, dim)) + 1.5 * (2 * y[:, None] - 1) / np.sqrt(dim)
    return {"x": x.astype(np.float32), "label": y.astype(np.int32)}

  def loss_fn(params, ex, frozen):  # ONE example, no batch axis
    logit = ex["x"] @ params["w"] + params["b"]
    loss = jnp.logaddexp(0.0, logit) - ex["label"] * logit
    return loss, {"accuracy": ((logit > 0) == (ex["label"] == 1)).astype(jnp.float32)}

  return dpjax.Task(
    name="logistic",
    params={"w": jnp.zeros(dim), "b": jnp.zeros(())},  # what is clipped, noised, trained
    frozen={},  # passed to the loss, never trained (e.g. a pretrained backbone)
    loss_fn=loss_fn,
    train=split(n),  # the private data
    splits={"dev": split(500), "test": split(500)},  # held out: metrics only
  )


def test_your_own_task_trains_privately_and_reports_its_epsilon():
  config = {
    "task": {"name": "logistic"},  # recorded in config.json; the Task itself is passed below
    "noise_multiplier": 1.0,
    "l2_clip_norm": 1.0,
    "batch_size": 100,  # expected batch: Poisson rate q = 100 / 2000
    "physical_batch_size": 128,
    "steps": 60,
    "learning_rate": 0.1,
    "log_every": 20,
  }
  result = dpjax.train(config, logistic_task(), None, progress=False)  # a workdir to keep it
  # The epsilon of 60 Poisson-sampled Gaussian steps, as dp-accounting composes them.
  want = accounting.epsilon(accounting.dpsgd_event(1.0, 100 / 2000, 60), 1e-5)
  assert result.final_metrics["epsilon"] == pytest.approx(want, rel=1e-9)
  assert result.final_metrics["test_accuracy"] > 0.75  # chance is 0.5
  assert result.final_metrics["step"] == 60 and result.params["w"].shape == (8,)
