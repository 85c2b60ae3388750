"""DistilDP (Flemings & Annavaram 2024, arXiv 2403.00932): private distillation via synthetic text.

Only the teacher touches the private data: it is DP-fine-tuned (control code
"<label>\\t" before each example), then generates synthetic text prompted
by each control code in proportion to a label histogram, and a smaller
student is trained on that synthetic text alone with

    L = (1 - lam) CE(student, synthetic tokens)
        + lam * T^2 * KL(teacher_T || student_T)
        + alpha * MSE(proj(student hidden), teacher hidden).

Generation and distillation are post-processing of the DP teacher. The
label histogram that sets the prompt counts is data-dependent: it is either
public or released here with its own noise (`dp_label_histogram`) and
composed with the teacher's budget (`budget_report`). Nothing else spends
epsilon.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from dpjax.core.accounting import calibrate_noise
from dpjax.core.accounting import epsilon as eps_of
from dpjax.core.accounting import events as ev
from dpjax.core.accounting.ledger import Ledger
from dpjax.core.checks import MAX_RELEASES, MAX_TARGET_EPSILON
from dpjax.models.decoder import Decoder, causal_lm_loss, init_params
from dpjax.models.generate import generate, left_pad
from dpjax.tasks import build_task
from dpjax.tasks.shakespeare import DEFAULTS as SHAKESPEARE_DEFAULTS
from dpjax.training import spec as spec_lib
from dpjax.training.loop import train
from dpjax.training.rundir import check_writable, make_private_dir
from dpjax.training.task import Task, task_section

PyTree = Any


# --- the distillation loss ---------------------------------------------------


def _target_weights(attention_mask):
  """[..., T-1]: position t predicts t+1; counted when both tokens are real."""
  m = attention_mask.astype(jnp.float32)
  return m[..., 1:] * m[..., :-1]


def distillation_loss(
  student_logits,
  teacher_logits,
  input_ids,
  attention_mask,
  *,
  lam: float = 0.4,
  temperature: float = 1.0,
  alpha: float = 0.0,
  student_hidden=None,
  teacher_hidden=None,
  projection: Optional[Callable] = None,
):
  """DistilDP's loss for ONE sequence or a batch (leading axes broadcast).

  logits `[..., T, V]`, ids/mask `[..., T]`. CE and KL are token means over
  the counted next-token positions (padding on either side never counts);
  the hidden-state MSE is a mean over real tokens and width. `projection`
  maps the student width to the teacher's when they differ. Returns
  (loss, {"ce", "kl", "mse"}) with the means over the whole input.

  Args:
    student_logits: [..., T, V].
    teacher_logits: [..., T, V].
    input_ids: [..., T].
    attention_mask: [..., T].
    lam: the weight of the KL term (1 - lam on the CE).
    temperature: the softmax temperature of the KL term.
    alpha: the weight of the hidden-state MSE.
    student_hidden: the student's last hidden states (with alpha > 0).
    teacher_hidden: the teacher's.
    projection: student width -> teacher width, or None.

  Returns:
    (loss, {"ce", "kl", "mse"}).
  """
  if not 0.0 <= lam <= 1.0:
    raise ValueError(f"lam must be in [0, 1], got {lam}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if alpha < 0:
    raise ValueError(f"alpha must be >= 0, got {alpha}")
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
      f"student logits {student_logits.shape} and teacher logits "
      f"{teacher_logits.shape} differ (same tokenizer needed)"
    )
  w = _target_weights(attention_mask)
  count = jnp.maximum(jnp.sum(w), 1.0)
  s = student_logits[..., :-1, :].astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_logits[..., :-1, :].astype(jnp.float32))
  logp = jax.nn.log_softmax(s, axis=-1)
  nll = -jnp.take_along_axis(logp, input_ids[..., 1:, None], axis=-1)[..., 0]
  ce = jnp.sum(nll * w) / count
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
  kl_tok = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  kl = jnp.sum(kl_tok * w) / count
  mse = jnp.zeros(())
  if alpha > 0:
    if student_hidden is None or teacher_hidden is None:
      raise ValueError("alpha > 0 needs student_hidden and teacher_hidden")
    h = student_hidden.astype(jnp.float32)
    if projection is not None:
      h = projection(h)
    th = jax.lax.stop_gradient(teacher_hidden.astype(jnp.float32))
    if h.shape != th.shape:
      raise ValueError(
        f"hidden states differ in shape ({h.shape} vs {th.shape}): pass a projection"
      )
    m = attention_mask.astype(jnp.float32)[..., None]
    mse = jnp.sum(jnp.square(h - th) * m) / (jnp.maximum(jnp.sum(m), 1.0) * h.shape[-1])
  loss = (1.0 - lam) * ce + lam * temperature**2 * kl + alpha * mse
  return loss, {"ce": ce, "kl": kl, "mse": mse}


def init_projection(key: jax.Array, student_width: int, teacher_width: int) -> Dict[str, Any]:
  """A learned linear map student width -> teacher width (for the hidden-state term).

  Args:
    key: the PRNG key.
    student_width: the student's hidden size.
    teacher_width: the teacher's hidden size.

  Returns:
    {"kernel": [student_width, teacher_width], "bias": [teacher_width]}.
  """
  scale = 1.0 / math.sqrt(student_width)
  return {
    "kernel": scale * jax.random.normal(key, (student_width, teacher_width)),
    "bias": jnp.zeros(teacher_width),
  }


def apply_projection(proj: Dict[str, Any], h):
  """The map of `init_projection` applied to hidden states.

  Args:
    proj: the projection's parameters.
    h: [..., student_width].

  Returns:
    [..., teacher_width].
  """
  return h @ proj["kernel"] + proj["bias"]


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


# --- the three-stage pipeline -------------------------------------------------


def truncate_decoder(params: PyTree, num_layers: int) -> PyTree:
  """The first `num_layers` blocks of a decoder, with its embeddings and final norm.

  Args:
    params: the decoder's parameters.
    num_layers: the blocks kept.

  Returns:
    The truncated parameter tree.
  """
  have = sorted(int(k.split("_")[1]) for k in params if k.startswith("layer_"))
  if num_layers > len(have):
    raise ValueError(f"cannot keep {num_layers} layers of a {len(have)}-layer decoder")
  return {
    k: v
    for k, v in params.items()
    if not k.startswith("layer_") or int(k.split("_")[1]) < num_layers
  }


def student_task(
  teacher_cfg,
  teacher_params,
  student_cfg,
  student_init,
  data,
  splits,
  *,
  lam: float,
  temperature: float,
  alpha: float,
  key: jax.Array,
):
  """A `train.Task` that distils `teacher_params` into a student on `data` (synthetic text).

  Trainable: the student (and a width projection when alpha > 0 and the
  widths differ); frozen: the teacher. Eval metrics are the student's own
  next-token `nll_sum` / `tokens` on the (real, held-out) splits.

  Args:
    teacher_cfg: the teacher's DecoderConfig.
    teacher_params: its (DP-trained) parameters.
    student_cfg: the student's DecoderConfig.
    student_init: the student's initial parameters.
    data: the synthetic training text and the real eval splits.
    splits: the split names.
    lam: see `distillation_loss`.
    temperature: see `distillation_loss`.
    alpha: see `distillation_loss`.
    key: the key of the projection's initialisation.

  Returns:
    The Task.
  """
  teacher, student = Decoder(teacher_cfg), Decoder(student_cfg)
  params = {"student": student_init}
  project = alpha > 0 and student_cfg.hidden_size != teacher_cfg.hidden_size
  if project:
    params["projection"] = init_projection(key, student_cfg.hidden_size, teacher_cfg.hidden_size)

  def loss_fn(p, ex, frozen):
    ids, mask = ex["input_ids"][None], ex["attention_mask"][None]
    s_logits, _, s_hidden = student.apply({"params": p["student"]}, ids, mask, return_hidden=True)
    t_logits, _, t_hidden = teacher.apply(
      {"params": frozen["teacher"]}, ids, mask, return_hidden=True
    )
    proj = (lambda h: apply_projection(p["projection"], h)) if project else None
    loss, _ = distillation_loss(
      s_logits,
      t_logits,
      ids,
      mask,
      lam=lam,
      temperature=temperature,
      alpha=alpha,
      student_hidden=s_hidden[-1],
      teacher_hidden=t_hidden[-1],
      projection=proj,
    )
    total, count = causal_lm_loss(s_logits, ids, mask, reduction="sum")
    return loss, {"nll_sum": total[0], "tokens": count[0]}

  return Task("distil-student", params, {"teacher": teacher_params}, loss_fn, data, splits)


def _section(where: str, keys: Sequence[spec_lib.Key], given) -> None:
  """Checks one section of a distill config against its declared keys (one line per error)."""
  if not isinstance(given, (dict, ml_collections.ConfigDict)):
    raise spec_lib.SpecError(f"{where} must be a section (a dict), got {given!r}")
  names = [k.name.split(".")[-1] for k in keys]
  unknown = sorted(set(given) - set(names))
  if unknown:
    raise spec_lib.SpecError(f"{where} takes {', '.join(names)}; got unknown {unknown[0]!r}")
  for k, name in zip(keys, names):
    if name in given:
      spec_lib.check_value(k, given[name])
    elif k.default is None and not k.optional:
      raise spec_lib.SpecError(f"{k.name} is missing (it has no default)")


def _key(name, kind, check=None, *, default=None, choices=None, optional=False) -> spec_lib.Key:
  """A key of a distill section; `default` None: the config must set it."""
  return spec_lib.Key(
    name,
    default,
    kind,
    doc="",
    check=check[0] if check else None,
    allowed=check[1] if check else "",
    optional=optional,
    choices=choices,
  )


_POS = (lambda v: v > 0 and math.isfinite(v), "finite and > 0")
_GE1 = (lambda v: v >= 1, ">= 1")
_NUM, _INT, _DICT = (int, float), (int,), (dict, ml_collections.ConfigDict)
TOP_KEYS = (
  _key(
    "total_epsilon",
    _NUM,
    (lambda v: 0 < v <= MAX_TARGET_EPSILON, f"in (0, {MAX_TARGET_EPSILON:g}]"),
  ),
  _key("delta", _NUM, (lambda v: 0 < v < 1, "in (0, 1)")),
  _key("teacher", _DICT),
  _key("histogram", _DICT, optional=True),  # None: uniform prompts, no histogram released
  _key("generation", _DICT),
  _key("student", _DICT),
)
HISTOGRAM_KEYS = (
  _key("histogram.epsilon", _NUM, _POS),
  _key("histogram.mechanism", (str,), choices=("gaussian", "laplace")),
)
GENERATION_KEYS = (
  _key("generation.num_samples", _INT, _GE1),
  _key("generation.batch_size", _INT, _GE1),
  _key("generation.top_k", _INT, (lambda v: v >= 0, ">= 0 (0: no top-k)")),
  _key("generation.top_p", _NUM, (lambda v: 0 < v <= 1, "in (0, 1]")),
  _key("generation.temperature", _NUM, _POS),
  _key("generation.seed", _INT),
)
STUDENT_KEYS = (
  _key("student.model", _DICT),
  _key("student.init_from_public", (bool,), default=True),
  _key("student.lam", _NUM, (lambda v: 0 <= v <= 1, "in [0, 1]")),
  _key("student.temperature", _NUM, _POS),
  _key("student.alpha", _NUM, (lambda v: v >= 0 and math.isfinite(v), "finite and >= 0")),
  _key("student.steps", _INT, (lambda v: 1 <= v <= MAX_RELEASES, f"in [1, {MAX_RELEASES:g}]")),
  _key("student.batch_size", _INT, _GE1),
  _key("student.learning_rate", _NUM, _POS),
  _key("student.seed", _INT),
)
# The `DecoderConfig` fields a student may change (same family and tokenizer as the teacher).
STUDENT_SIZES = (
  "hidden_size",
  "num_layers",
  "num_heads",
  "intermediate_size",
  "num_kv_heads",
  "head_dim",
)


def with_defaults(cfg) -> ml_collections.ConfigDict:
  """`cfg` with every declared key that has a default present: what a missing key means, once.

  `histogram` None (uniform prompts, no histogram released) and the student's
  keys with a default (`STUDENT_KEYS`: `init_from_public` True).

  Args:
    cfg: a `dpjax distill` config (its sections already checked as sections).

  Returns:
    A copy with the defaults filled.
  """
  out = ml_collections.ConfigDict(
    cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg), type_safe=False
  )
  for k in TOP_KEYS:
    if k.optional and k.name not in out:
      out[k.name] = None
  for k in STUDENT_KEYS:
    name = k.name.split(".")[-1]
    if k.default is not None and name not in out.student:
      out.student[name] = k.default
  return out


def teacher_config(cfg) -> ml_collections.ConfigDict:
  """The teacher's train config: `cfg.teacher` with the distill budget.

  Args:
    cfg: the `dpjax distill` config.

  Returns:
    `cfg.teacher` with its noise calibrated so that teacher + histogram meet
    `total_epsilon` at `delta`.
  """
  tcfg = ml_collections.ConfigDict(cfg.teacher.to_dict(), type_safe=False)
  tcfg.delta = cfg.delta
  tcfg.target_epsilon = cfg.total_epsilon
  tcfg.noise_multiplier = None
  return tcfg


def check_config(cfg) -> spec_lib.Spec:
  """Checks every value of a `dpjax distill` config before anything is fetched or built.

  The teacher section is a train config (`dpjax.training.spec`); the others
  are declared here (`TOP_KEYS`, `HISTOGRAM_KEYS`, `GENERATION_KEYS`,
  `STUDENT_KEYS`; `student.model` overrides `STUDENT_SIZES` of the
  teacher's `DecoderConfig`). Errors are one line (`SpecError`).

  Args:
    cfg: the config.

  Returns:
    The teacher's validated train spec (`teacher_config`).
  """
  if "teacher" not in cfg:
    raise spec_lib.SpecError(
      "not a distill config: it has no teacher section (a train config runs with `dpjax train`)"
    )
  _section("the distill config", TOP_KEYS, cfg)
  _section("student", STUDENT_KEYS, cfg.student)
  cfg = with_defaults(cfg)
  spec = spec_lib.validate(spec_lib.with_defaults(teacher_config(cfg)))
  if not task_section(spec.task, SHAKESPEARE_DEFAULTS).control_code:
    raise spec_lib.SpecError("teacher.task.control_code must be True (prompts by label)")
  hist = cfg.histogram
  if hist is not None:
    _section("histogram", HISTOGRAM_KEYS, hist)
  if hist and hist["epsilon"] >= cfg.total_epsilon:
    raise spec_lib.SpecError(
      f"histogram.epsilon must be below total_epsilon={cfg.total_epsilon:g} (the teacher "
      f"spends the rest), got {hist['epsilon']!r}"
    )
  _section("generation", GENERATION_KEYS, cfg.generation)
  for name, v in dict(cfg.student.model).items():
    if name not in STUDENT_SIZES:
      raise spec_lib.SpecError(
        f"student.model sets the sizes of the teacher's decoder that the student changes "
        f"({', '.join(STUDENT_SIZES)}); got {name!r}"
      )
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise spec_lib.SpecError(f"student.model.{name} must be an integer >= 1, got {v!r}")
  model = dict(cfg.student.model)
  if cfg.student.init_from_public and "hidden_size" not in model:
    if "num_layers" not in model:  # the student is the teacher's first num_layers blocks
      raise spec_lib.SpecError(
        "student.model.num_layers is missing: a student initialised from the public "
        "pretrained decoder keeps its first num_layers blocks"
      )
  return spec


def run(cfg, run_dir: str, *, progress: bool = True, task=None) -> Dict[str, Any]:
  """`dpjax distill`: teacher DP fine-tune -> synthetic text -> student, resumable.

  `task`: the teacher's task when the caller already built it from
  `cfg.teacher` (`build_task(cfg.teacher)`); built here otherwise.

  Each stage writes under `run_dir` (teacher/ checkpoints, synthetic/ a
  `datasets` directory + info.json, student/ checkpoints, report.json) and
  is skipped when its output exists. The teacher's noise is calibrated so
  that teacher + DP histogram meet `cfg.total_epsilon` together.

  Args:
    cfg: the `dpjax distill` config.
    run_dir: the run directory.
    progress: show progress bars.
    task: the teacher's task, or None.

  Returns:
    The report (also written to report.json).
  """
  import json
  import os

  import datasets

  tcfg = check_config(cfg)  # the teacher's Spec, checked once, before anything is fetched
  cfg = with_defaults(cfg)
  check_writable(run_dir)  # a read-only or full disk: one line, before the teacher is built
  make_private_dir(run_dir)

  # Stage 1: the DP teacher (the only reader of the private data, with the histogram).
  if task is None:
    task = build_task(tcfg)
  hist_cfg = cfg.histogram
  h_event = None
  if hist_cfg:
    h_event = histogram_event(
      hist_cfg.mechanism, histogram_noise(hist_cfg.mechanism, hist_cfg.epsilon, cfg.delta)
    )
  # The teacher's plan calibrates its noise so that its ledger and the
  # histogram compose to total_epsilon (`teacher_config`).
  teacher_res = train(
    tcfg, task, os.path.join(run_dir, "teacher"), progress=progress, extra_event=h_event
  )
  teacher_cfg, encode = task.info["decoder"], task.info["encode"]

  # Stage 2: synthetic text (post-processing), prompt counts from the DP histogram.
  syn_dir, info_path = (
    os.path.join(run_dir, "synthetic"),
    os.path.join(run_dir, "synthetic_info.json"),
  )
  g = cfg.generation
  if os.path.exists(info_path):
    with open(info_path) as f:
      info = json.load(f)
    syn = datasets.load_from_disk(syn_dir)
  else:
    codes = list(task.info["control_codes"])
    labels = [codes[i] for i in task.train["control"] if i < len(codes)]
    if hist_cfg:
      hist = dp_label_histogram(
        labels,
        codes,
        hist_cfg.epsilon,
        cfg.delta,
        mechanism=hist_cfg.mechanism,
        rng=np.random.default_rng(g.seed),
      )
      props = hist["proportions"]
    else:
      hist, props = None, {c: 1.0 for c in codes}  # uniform: no data read
    counts = prompt_counts(props, g.num_samples)
    prompts = {}
    for c in codes:
      e = encode([c + "\t"], tcfg.task.seq_len)
      prompts[c] = e["input_ids"][0][e["attention_mask"][0] > 0].tolist()
    gen = synthesize(
      teacher_cfg,
      teacher_res.params,
      prompts,
      counts,
      jax.random.PRNGKey(g.seed),
      batch_size=g.batch_size,
      max_new_tokens=tcfg.task.seq_len - max(len(p) for p in prompts.values()),
      top_k=g.top_k,
      top_p=g.top_p,
      temperature=g.temperature,
      progress=progress,
    )
    full = [prompts[c] + t for c, t in zip(gen["label"], gen["tokens"])]
    syn = datasets.Dataset.from_dict({"label": gen["label"], "input_ids": full})
    syn.save_to_disk(syn_dir)
    info = {
      "histogram": hist,
      "counts": counts,
      "num_samples": len(full),
      "tokens_per_s": gen["tokens_per_s"],
      "seconds": gen["seconds"],
    }
    with open(info_path, "w") as f:
      json.dump(info, f, indent=2, default=float)

  # Stage 3: the student, on synthetic text only.
  L = tcfg.task.seq_len
  ids = np.zeros((len(syn), L), np.int32)
  mask = np.zeros((len(syn), L), np.int32)
  for i, row in enumerate(syn["input_ids"]):
    row = row[:L]
    ids[i, : len(row)] = row
    mask[i, : len(row)] = 1
  s = cfg.student
  # The student: the teacher's architecture with `student.model` overrides
  # (fewer layers, or another width).
  scfg_model = dataclasses.replace(teacher_cfg, **dict(s.model))
  if scfg_model.hidden_size == teacher_cfg.hidden_size and s.init_from_public:
    init = truncate_decoder(task.params, s.model.num_layers)  # public pretraining
  else:
    init = init_params(scfg_model, jax.random.PRNGKey(s.seed), L)
  splits = {k: {c: v[c] for c in ("input_ids", "attention_mask")} for k, v in task.splits.items()}
  stask = student_task(
    teacher_cfg,
    teacher_res.params,
    scfg_model,
    init,
    {"input_ids": ids, "attention_mask": mask},
    splits,
    lam=s.lam,
    temperature=s.temperature,
    alpha=s.alpha,
    key=jax.random.PRNGKey(s.seed),
  )
  student_cfg = ml_collections.ConfigDict(
    dict(
      task=dict(name="distil_student", model=dict(s.model)),  # built here, not by build_task
      private=False,
      steps=s.steps,
      batch_size=s.batch_size,
      physical_batch_size=s.batch_size,
      optimizer="adam",
      learning_rate=s.learning_rate,
      weight_decay=0.0,
      warmup_steps=0,
      seed=s.seed,
      log_every=s.steps,
      checkpoint_every=s.steps,
      privacy_unit="example",
      accountant="pld",
      mechanism="gaussian",
    )
  )
  student_res = train(student_cfg, stask, os.path.join(run_dir, "student"), progress=progress)

  report = {
    "budget": budget_report(teacher_res.ledger, info["histogram"], cfg.delta),
    "privacy_unit": "example",
    "teacher_noise_multiplier": teacher_res.noise_multiplier,
    "teacher_ledger": teacher_res.ledger.to_json(),
    "teacher_test_perplexity": _ppl(teacher_res.final_metrics, "test"),
    "student_test_perplexity": _ppl(student_res.final_metrics, "test"),
    "synthetic_samples": info["num_samples"],
    "generation_tokens_per_s": info["tokens_per_s"],
  }
  with open(os.path.join(run_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2, default=float)
  return report


def _ppl(metrics: Dict[str, Any], split: str) -> float:
  return float(math.exp(metrics[f"{split}_nll_sum"] / metrics[f"{split}_tokens"]))
