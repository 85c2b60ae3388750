"""DistilDP's synthetic text: the label histogram that sets the prompts, and generation.

The histogram of the private labels is the one data-dependent release besides
the teacher: public, or released here with its own noise (`dp_label_histogram`)
and composed with the teacher's budget (`budget_report`). Generation from the
DP teacher is post-processing.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dpjax.core.accounting import calibrate_noise
from dpjax.core.accounting import epsilon as eps_of
from dpjax.core.accounting import events as ev
from dpjax.core.accounting.ledger import Ledger
from dpjax.models.generate import generate, left_pad

PyTree = Any


# --- the private label histogram --------------------------------------------


def histogram_noise(mechanism: str, epsilon: float, delta: float) -> float:
  """Noise scale for a histogram of one label per example (add/remove: L1 = L2 = 1).

  Laplace: b = 1 / epsilon (pure DP). Gaussian: the smallest sigma whose
  exact (epsilon, delta) profile (dp-accounting's PLD of one Gaussian step,
  pessimistic) meets the target.

  Args:
    mechanism: "laplace" or "gaussian".
    epsilon: the histogram's epsilon.
    delta: its delta (Gaussian).

  Returns:
    The Laplace scale or the Gaussian sigma.
  """
  if not (epsilon > 0 and math.isfinite(epsilon)):
    raise ValueError(f"epsilon must be finite and > 0, got {epsilon}")
  if mechanism == "laplace":
    return 1.0 / epsilon
  if mechanism != "gaussian":
    raise ValueError(f"mechanism must be 'gaussian' or 'laplace', got {mechanism!r}")
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta}")
  return calibrate_noise(
    epsilon, delta, 1.0, 1, accountant="pld", mechanism="gaussian", rel_tol=0.001
  )


def dp_label_histogram(
  labels: Sequence[Any],
  classes: Sequence[Any],
  epsilon: float,
  delta: float,
  *,
  mechanism: str = "gaussian",
  rng: Optional[np.random.Generator] = None,
) -> Dict[str, Any]:
  """Noisy counts of each class (one label per example), clipped at 0.

  Returns {"counts": {class: noisy count}, "proportions", "mechanism",
  "noise", "epsilon", "delta"}; the proportions are post-processing.

  Args:
    labels: one label per private example.
    classes: the classes counted.
    epsilon: the histogram's epsilon.
    delta: its delta.
    mechanism: "gaussian" or "laplace".
    rng: the noise generator (default: one seeded from the OS).

  Returns:
    The dict above.
  """
  rng = rng or np.random.default_rng()
  labels = list(labels)
  unknown = set(labels) - set(classes)
  if unknown:
    raise ValueError(f"labels outside the declared classes: {sorted(map(str, unknown))[:5]}")
  noise = histogram_noise(mechanism, epsilon, delta)
  true = np.array([labels.count(c) for c in classes], np.float64)
  z = (
    rng.laplace(0, noise, len(classes))
    if mechanism == "laplace"
    else rng.normal(0, noise, len(classes))
  )
  noisy = np.maximum(true + z, 0.0)
  total = noisy.sum()
  props = noisy / total if total > 0 else np.full(len(classes), 1.0 / len(classes))
  return {
    "counts": dict(zip(classes, noisy.tolist())),
    "proportions": dict(zip(classes, props.tolist())),
    "mechanism": mechanism,
    "noise": noise,
    "epsilon": epsilon,
    "delta": delta if mechanism == "gaussian" else 0.0,
  }


def prompt_counts(proportions: Dict[Any, float], total: int) -> Dict[Any, int]:
  """Split `total` generations over classes by largest remainders (sums to total).

  Args:
    proportions: {class: share}.
    total: the generations wanted.

  Returns:
    {class: count}.
  """
  if total < 0:
    raise ValueError(f"total must be >= 0, got {total}")
  keys = list(proportions)
  p = np.array([proportions[k] for k in keys], np.float64)
  if np.any(p < 0) or p.sum() <= 0:
    raise ValueError("proportions must be >= 0 with a positive sum")
  raw = p / p.sum() * total
  out = np.floor(raw).astype(int)
  for i in np.argsort(-(raw - out), kind="stable")[: total - out.sum()]:
    out[i] += 1
  return dict(zip(keys, out.tolist()))


def histogram_event(mechanism: str, noise: float):
  """The DpEvent of one noisy histogram release (sensitivity 1, every example counted).

  Args:
    mechanism: "laplace" or "gaussian".
    noise: its scale (`histogram_noise`).

  Returns:
    A dp-accounting event.
  """
  return ev.laplace_step(noise, 1.0) if mechanism == "laplace" else ev.gaussian_step(noise, 1.0)


def budget_report(
  teacher: Any, histogram: Optional[Dict[str, Any]], delta: float
) -> Dict[str, Any]:
  """Who spends epsilon: the teacher's DP-SGD and the histogram, composed by PLD.

  `teacher`: the teacher run's `Ledger` (`RunResult.ledger`), or a sequence of
  dp-accounting DpEvents of its training. Generation, the synthetic set and
  the student add nothing (post-processing).

  Args:
    teacher: the teacher's Ledger, or its DpEvents.
    histogram: `dp_label_histogram`'s output, or None.
    delta: the delta of the composed guarantee.

  Returns:
    {"teacher", "histogram", "generation" (0), "student" (0), "total": epsilons;
    "delta"}.
  """
  import dp_accounting

  events = [teacher.event()] if isinstance(teacher, Ledger) else list(teacher)
  teacher = dp_accounting.ComposedDpEvent(events)
  parts = [teacher]
  out = {
    "teacher": eps_of(teacher, delta, "pld"),
    "generation": 0.0,
    "student": 0.0,
    "histogram": 0.0,
    "delta": delta,
  }
  if histogram is not None:
    h = histogram_event(histogram["mechanism"], histogram["noise"])
    parts.append(h)
    out["histogram"] = eps_of(h, delta, "pld")
  out["total"] = eps_of(dp_accounting.ComposedDpEvent(parts), delta, "pld")
  return out


# --- synthetic generation ----------------------------------------------------


def synthesize(
  cfg,
  params,
  prompts: Dict[Any, List[int]],
  counts: Dict[Any, int],
  key: jax.Array,
  *,
  batch_size: int,
  max_new_tokens: int,
  top_k: int = 50,
  top_p: float = 0.9,
  temperature: float = 1.0,
  progress: bool = True,
) -> Dict[str, Any]:
  """Sample `counts[c]` continuations of control-code prompt `prompts[c]` per class.

  Batched and jitted (`dpjax.models.generate`, KV cache); every batch has
  the same shape (the last one padded with repeats and trimmed). Batch i
  uses key fold_in(key, i): a fixed key gives the same text. Returns
  {"label": [...], "tokens": [[...], ...] (prompt excluded, cut at EOS),
  "tokens_per_s" (decoded tokens, padding rows included, per second of the
  whole loop, compilation included), "seconds"}.

  Args:
    cfg: the decoder's config.
    params: its parameters.
    prompts: {class: prompt token ids}.
    counts: {class: continuations wanted}.
    key: the sampling key.
    batch_size: rows per generation batch.
    max_new_tokens: the tokens per continuation.
    top_k: see `dpjax.models.generate.sample_logits`.
    top_p: see `dpjax.models.generate.sample_logits`.
    temperature: see `dpjax.models.generate.sample_logits`.
    progress: show a progress bar.

  Returns:
    The dict above.
  """
  if batch_size < 1 or max_new_tokens < 1:
    raise ValueError("batch_size and max_new_tokens must be >= 1")
  missing = set(counts) - set(prompts)
  if missing:
    raise ValueError(f"no prompt for classes {sorted(map(str, missing))}")
  jobs = [c for c in counts for _ in range(int(counts[c]))]
  P = max(len(prompts[c]) for c in counts) if counts else 1
  labels, outs = [], []
  generated = 0
  t0 = time.perf_counter()
  starts = range(0, len(jobs), batch_size)
  if progress:
    starts = tqdm(starts, desc="generate", dynamic_ncols=True)
  for bi, s in enumerate(starts):
    chunk = jobs[s : s + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    ids, mask = left_pad([prompts[c] for c in padded], cfg.pad_token_id, P)
    toks, _ = generate(
      cfg,
      params,
      jnp.asarray(ids),
      jnp.asarray(mask),
      jax.random.fold_in(key, bi),
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
    )
    toks = np.asarray(toks)[: len(chunk)]
    for c, row in zip(chunk, toks):
      row = row.tolist()
      if cfg.eos_token_id is not None and cfg.eos_token_id in row:
        row = row[: row.index(cfg.eos_token_id)]
      while row and row[-1] == cfg.pad_token_id:
        row.pop()
      labels.append(c)
      outs.append(row)
    generated += batch_size * max_new_tokens
  seconds = time.perf_counter() - t0
  return {
    "label": labels,
    "tokens": outs,
    "seconds": seconds,
    "tokens_per_s": generated / max(seconds, 1e-9),
  }
