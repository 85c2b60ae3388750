"""Task builders: a config's `task` section -> a `dpjax.training.task.Task`.

A task bundles the initial parameters, the per-example loss and the data
splits. Builders are looked up by `cfg.task.name` in `TASKS`; each lives in
its own module (`synthetic`, `text_classification`, `shakespeare`, `causal_lm`).
"""

from __future__ import annotations

from typing import Callable, Dict

from dpjax.tasks import causal_lm, shakespeare, synthetic, text_classification
from dpjax.training import spec as spec_lib
from dpjax.training.task import Task

TASKS: Dict[str, Callable] = {
  "synthetic": synthetic.synthetic,
  "text_classification": text_classification.text_classification,
  "shakespeare_lm": shakespeare.shakespeare_lm,
  "user_mean": synthetic.user_mean,
  "causal_lm": causal_lm.causal_lm,
}


def build_task(cfg) -> Task:
  """The task named by `cfg.task.name`, built from the config's task section.

  The builder receives the config with every top-level key present (its
  default where the config sets none; a validated `Spec`, as the CLI passes,
  as it is: values are checked once, by `validate`, not here, so a task can
  be built from a section the run completes later, e.g. DistilDP's teacher)
  and reads its task section through `task_section` with the task's
  declared defaults.

  Args:
    cfg: a train config, or its validated `Spec`.

  Returns:
    The Task (raises ValueError naming the known tasks for an unknown name).
  """
  spec = spec_lib.with_defaults(cfg)
  name = spec.task.name
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
  return TASKS[name](spec)
