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

This module is the run (`run`, its config and checks); the student's loss and
task are `distill_student`'s, the histogram and the generation
`distill_text`'s (each named here too).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Sequence

import jax
import ml_collections
import numpy as np

from dpjax.core.checks import MAX_RELEASES, MAX_TARGET_EPSILON
from dpjax.models.decoder import init_params
from dpjax.pipelines.distill_student import (
  apply_projection,
  distillation_loss,
  init_projection,
  student_task,
  truncate_decoder,
)
from dpjax.pipelines.distill_text import (
  budget_report,
  dp_label_histogram,
  histogram_event,
  histogram_noise,
  prompt_counts,
  synthesize,
)
from dpjax.tasks import build_task
from dpjax.tasks.shakespeare import DEFAULTS as SHAKESPEARE_DEFAULTS
from dpjax.training import spec as spec_lib
from dpjax.training.loop import train
from dpjax.training.rundir import check_writable, make_private_dir
from dpjax.training.task import task_section

__all__ = [  # the run's pieces, named here too: `dpjax.distill.<name>`
  "apply_projection",
  "budget_report",
  "check_config",
  "distillation_loss",
  "dp_label_histogram",
  "histogram_event",
  "histogram_noise",
  "init_projection",
  "prompt_counts",
  "run",
  "student_task",
  "synthesize",
  "teacher_config",
  "truncate_decoder",
  "with_defaults",
]

PyTree = Any


# --- the three-stage pipeline -------------------------------------------------


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
