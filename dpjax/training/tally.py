"""What the loop sums between reads, on the devices, and reads only at log and checkpoint steps.

`Tally` keeps the training statistics since the last log row and the
dropped-unit counts since the last read (three device scalars, whatever the
steps between: `note_dropped`); `check_dropped` reads them and stops a run
whose step dropped every sampled unit (`NonFiniteData`).
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Dict

import jax
import jax.numpy as jnp

from dpjax.training.compiled_step import Sums, add_trees


class Tally:
  """What the loop sums between reads, on the devices: the stats since the last log row,
  and the dropped-unit counts since the last read (`note_dropped`)."""

  def __init__(self):
    self.window, self.count, self.seen = None, 0.0, 0
    self.unchecked, self.units_unchecked = NO_DROPS, 0.0
    self.dropped_total = self.units_total = 0.0
    self.t0 = time.perf_counter()

  def add(self, sums: Sums, done: int) -> None:
    """Adds one step's sums (on the devices: nothing is read).

    Args:
      sums: the step's `Sums`.
      done: the steps run, this one included.
    """
    self.window = sums.stats if self.window is None else add_trees(self.window, sums.stats)
    self.count += sums.units
    self.seen += sums.examples
    self.unchecked = note_dropped(self.unchecked, sums.stats["dropped_units"], sums.units, done)
    self.units_unchecked += sums.units

  def read_dropped(self, done: int) -> None:
    """Reads the dropped-unit counts before a step is saved or logged (stops if all dropped).

    Args:
      done: the steps run.
    """
    self.dropped_total += check_dropped(self.unchecked, done)
    self.units_total += self.units_unchecked
    self.unchecked, self.units_unchecked = NO_DROPS, 0.0

  def read_window(self) -> Dict[str, Any]:
    """The mean training stats since the last log row (the one read of them), and resets."""
    totals = {k: float(v) for k, v in self.window.items()}
    dropped = totals.pop("dropped_units")
    out = {f"train_{k}": v / max(self.count, 1.0) for k, v in totals.items()}
    out["dropped_units"] = int(dropped)
    self.window, self.count = None, 0.0
    return out

  def examples_per_s(self) -> float:
    """Training examples per second since the tally began."""
    return self.seen / max(time.perf_counter() - self.t0, 1e-9)

  def warn_if_dropped(self) -> None:
    """Warns (once, at the end) when more than `DROPPED_WARN_FRACTION` of the units were dropped."""
    if self.units_total and self.dropped_total > DROPPED_WARN_FRACTION * self.units_total:
      warnings.warn(
        f"{int(self.dropped_total)} of {int(self.units_total)} sampled units "
        f"({self.dropped_total / self.units_total:.1%}) had a non-finite loss or gradient and "
        "were dropped (dropped_units in metrics.jsonl)",
        UserWarning,
        stacklevel=5,
      )


# Dropped-unit counts kept on the devices between reads, so that a run that logs
# rarely holds three scalars, not one array per step: (dropped units since the
# last read, the first step since then whose every sampled unit was dropped (0:
# none), that step's sampled units).
NO_DROPS = (0.0, 0, 0.0)


@jax.jit
def note_dropped(unchecked: tuple, dropped: jax.Array, units: float, step: int) -> tuple:
  """Adds one step's dropped units to `unchecked` (on the devices: nothing is read).

  Args:
    unchecked: `NO_DROPS` or what this returned before.
    dropped: the step's dropped units (a device scalar).
    units: the step's sampled units.
    step: the step's number (1-based).

  Returns:
    (dropped since the last read, the first all-dropped step or 0, its units).
  """
  since, bad_step, bad_units = unchecked
  bad = (units > 0) & (dropped >= units) & (bad_step == 0)
  return since + dropped, jnp.where(bad, step, bad_step), jnp.where(bad, units, bad_units)


def check_dropped(unchecked: tuple, done: int) -> float:
  """Reads the dropped-unit counts of the steps since the last read; stops at an all-dropped step.

  Args:
    unchecked: `NO_DROPS` or what `note_dropped` returned.
    done: the steps run (for the message).

  Returns:
    The units dropped over those steps.
  """
  since, bad_step, bad_units = (float(x) for x in unchecked)
  if bad_step:
    step = int(bad_step)
    raise NonFiniteData(
      f"step {step}: every one of the {int(bad_units)} sampled units had a non-finite "
      "loss or gradient and was dropped; check the data and the learning rate "
      f"(the run stopped at step {done}, before saving or logging any step past {step - 1})"
    )
  return since


class NonFiniteData(ValueError):
  """Every unit a step sampled had a non-finite loss or gradient."""


DROPPED_WARN_FRACTION = 0.01  # warn when more of the sampled units were dropped
