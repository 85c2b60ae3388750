"""Regenerates the tables of experiments/RESULTS.md from the recorded rows.

A generated table sits between two markers in RESULTS.md:

    <!-- report: dp_flat epsilon=3 mode=prefix steps=40 batch_size=256 -->
    | ... the table ... |
    <!-- /report -->

The first word names a renderer below, the rest are its arguments; the rows
come from `experiments/results/*.jsonl` (`rows.py`). `python
experiments/report.py` rewrites every marked table; `--check` rewrites
nothing and exits 1, naming the tables, when any differs from its rows (CI
runs it, so a table cannot drift from what was measured).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import rows as rows_lib  # experiments/rows.py, beside this script

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
BLOCK = re.compile(r"(<!-- report: (?P<head>[^>]*?) -->\n)(?P<body>.*?)(<!-- /report -->)", re.S)

RENDERERS: Dict[str, Callable[..., str]] = {}


def renderer(fn):
  RENDERERS[fn.__name__] = fn
  return fn


def _ms(xs, fmt: str) -> str:
  """mean ± population std."""
  return f"{np.mean(xs):{fmt}} ± {np.std(xs):{fmt}}" if len(xs) else "-"


def _g(x: float) -> str:
  """Like :g, without exponent zero-padding (1e-5, not 1e-05)."""
  return f"{x:g}".replace("e-0", "e-").replace("e+0", "e+")


def _paired(acc: Dict, base: Dict, scale: float = 100.0, fmt: str = "+.2f") -> str:
  """Per-seed differences, in points by default: "+0.57, -0.28, ..." ({seed: value} each)."""
  return ", ".join(f"{scale * (acc[k] - base[k]):{fmt}}" for k in sorted(acc) if k in base)


def _table(header: List[str], lines: List[List[str]]) -> str:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(cells) + " |" for cells in lines]
  return "\n".join(out) + "\n"


# --- DP-Flat -----------------------------------------------------------------

DP_FLAT_VARIANTS = ("plain", "+sam", "+sam-charged", "+sparse", "+wd", "all", "non-private")


@renderer
def dp_flat(
  epsilon: str, mode: str = "prefix", steps: str = "40", batch_size: str = "256", layer_lr: str = ""
) -> str:
  """One epsilon of the DP-Flat ablation: accuracy, paired differences, sharpness."""
  eps, steps_, batch = float(epsilon), int(steps), int(batch_size)
  lr = float(layer_lr) if layer_lr else None
  radius = {"prefix": "0.05 x ||theta||", "full": "0.001 x ||theta_k|| per tensor"}[mode]
  recorded = [
    r
    for r in rows_lib.load("dp_flat")
    if r.get("mode", "prefix") == mode
    and r["steps"] == steps_
    and r["batch_size"] == batch
    and r.get("layer_lr") == lr
    and r.get("sharpness_radius", "0.05 x ||theta||") == radius
  ]
  latest = rows_lib.dedupe(
    recorded,
    lambda r: {
      "variant": r["variant"],
      "seed": r["seed"],
      "epsilon_target": None if r["variant"] == "non-private" else r["epsilon_target"],
    },
  )
  rows = list(latest.values())

  def at(v):
    return {
      r["seed"]: r
      for r in rows
      if r["variant"] == v and (v == "non-private" or r["epsilon_target"] == eps)
    }

  prefixes = mode != "full"
  plain = at("plain")
  header = [
    "variant",
    "seeds",
    "test acc (%)",
    "paired diff. vs plain (points)",
    "max loss increase",
    "top Hessian eigenvalue",
  ] + (["prefixes kept"] if prefixes else [])
  lines = []
  for v in DP_FLAT_VARIANTS:
    got = at(v)
    if not got:
      continue
    seeds = sorted(got)
    acc = [100 * got[k]["test_accuracy"] for k in seeds]
    diff = _paired(_test(got), _test(plain)) if v != "plain" else "-"
    cells = [
      v,
      ",".join(map(str, seeds)),
      _ms(acc, ".2f"),
      diff or "-",
      _ms([got[k]["max_increase"] for k in seeds], ".3f"),
      _ms([got[k]["top_eigenvalue"] for k in seeds], ".3f"),
    ]
    if prefixes:
      kept = {
        "all"
        if got[k].get("prefix_layers") is None
        else f"{sum(got[k]['prefix_layers'])} of {len(got[k]['prefix_layers'])} (mask "
        + "".join("1" if b else "0" for b in got[k]["prefix_layers"])
        + ")"
        for k in seeds
      }
      cells.append(" / ".join(sorted(kept)))
    lines.append(cells)
  return _table(header, lines)


# --- utility at equal budget --------------------------------------------------

UTILITY_METHODS = (
  "dp-sgd",
  "automatic",
  "adaptive",
  "bandmf",
  "blt",
  "adam-bc",
  "bandmf+automatic",
  "automatic+adam-bc",
  "adaptive+adam-bc",
)


def _utility_metric(task: str) -> str:
  """The row key each utility task is judged by: test accuracy, or perplexity for the byte LM."""
  return "test_perplexity" if task == "shakespeare" else "test_accuracy"


def _test(by_seed: Dict, key: str = "test_accuracy") -> Dict:
  """{seed: row} -> {seed: the row's `key`}."""
  return {k: r[key] for k, r in by_seed.items()}


def _non_private(task: str) -> Dict[int, float]:
  """seed -> test score of the task's non-private run: the utility grid's own rows, else
  those its task's experiment recorded (DP-Flat's for rt-top2, the quickstart's)."""
  own = rows_lib.dedupe(
    [r for r in rows_lib.load("utility") if r["task"] == task and r["method"] == "non-private"],
    lambda r: {"seed": r["seed"]},
  )
  if own:
    return {r["seed"]: r[_utility_metric(task)] for r in own.values()}
  if task == "rt-top2":
    rows = [
      r
      for r in rows_lib.load("dp_flat")
      if r.get("mode") == "full"
      and r["variant"] == "non-private"
      and r["steps"] == 40
      and r["batch_size"] == 256
      and r.get("layer_lr") == 1e-3
    ]
    latest = rows_lib.dedupe(rows, lambda r: {"seed": r["seed"]})
    return {r["seed"]: r["test_accuracy"] for r in latest.values()}
  rows = [r for r in rows_lib.load("quickstart") if r["variant"] == "non-private"]
  latest = rows_lib.dedupe(rows, lambda r: {"run": r["run"]})
  return {r["run"]: r["test_accuracy"] for r in latest.values()}


def _peer_runs(task: str, eps: float) -> Dict[str, Dict[int, dict]]:
  """The peer library's rows (`opacus_rt.py`) of a task and target: {method: {seed: row}}."""
  peers = rows_lib.dedupe(
    [r for r in rows_lib.load("opacus_rt") if r["task"] == task and r["epsilon_target"] == eps],
    lambda r: {"seed": r["seed"], "method": r["method"]},
  )
  out: Dict[str, Dict[int, dict]] = {}
  for r in sorted(peers.values(), key=lambda r: r["method"]):
    out.setdefault(r["method"], {})[r["seed"]] = r
  return out


@renderer
def utility(task: str, epsilon: str) -> str:
  """Every method at one target epsilon: accuracy, paired differences, the gap closed."""
  eps = float(epsilon)
  key = _utility_metric(task)
  scale, fmt = (1.0, ".3f") if key == "test_perplexity" else (100.0, ".2f")
  latest = rows_lib.dedupe(
    [r for r in rows_lib.load("utility") if not r.get("planned")],
    lambda r: {k: r[k] for k in ("task", "method", "epsilon_target", "seed", "clip")},
  )
  rows = [r for r in latest.values() if r["task"] == task and r["epsilon_target"] == eps]
  tune = {r["clip"] for r in rows if r["method"] == "dp-sgd" and r["seed"] != 0}
  clip = tune.pop() if len(tune) == 1 else None  # the tuned clip: what seeds 1, 2 ran at

  def at(method):
    return {
      r["seed"]: r
      for r in rows
      if r["method"] == method and (clip is None or r["clip"] == clip or "automatic" in method)
    }

  base = at("dp-sgd")
  free = _non_private(task)
  free_mean = float(np.mean(list(free.values()))) if free else float("nan")
  base_mean = float(np.mean([r[key] for r in base.values()])) if base else float("nan")
  lines = []
  for method in UTILITY_METHODS:
    got = at(method)
    if not got:
      continue
    seeds = sorted(got)
    acc = [scale * got[k][key] for k in seeds]
    diff = _paired(_test(got, key), _test(base, key), scale, "+" + fmt)
    closed = (np.mean([got[k][key] for k in seeds]) - base_mean) / (free_mean - base_mean)
    lines.append(
      [
        method,
        ",".join(map(str, seeds)),
        _ms(acc, fmt),
        "-" if method == "dp-sgd" else diff,
        "-"
        if method == "dp-sgd" or not np.isfinite(closed)
        else f"{int(round(100 * closed)):+d} %",
        f"{max(got[k]['epsilon'] for k in seeds):.3f}",
        _ms([got[k]["noise_multiplier"] for k in seeds], ".3f"),
        str(got[seeds[0]]["bands"]),
      ]
    )
  for method, got in _peer_runs(task, eps).items():
    seeds = sorted(got)
    acc = [100 * got[k]["test_accuracy"] for k in seeds]
    diff = _paired(_test(got), _test(base))
    lines.append(
      [
        method,
        ",".join(map(str, seeds)),
        _ms(acc, ".2f"),
        diff or "-",
        "-",
        f"{max(got[k]['epsilon'] for k in seeds):.3f} "
        f"({max(got[k]['pld_epsilon'] for k in seeds):.3f} PLD)",
        _ms([got[k]["noise_multiplier"] for k in seeds], ".3f"),
        "1",
      ]
    )
  if free:
    seeds = sorted(free)
    lines.append(
      [
        "non-private",
        ",".join(map(str, seeds)),
        _ms([scale * free[k] for k in seeds], fmt),
        _paired(free, _test(base, key), scale, "+" + fmt) or "-",
        "+100 %",
        "inf",
        "-",
        "-",
      ]
    )
  header = [
    "method",
    "seeds",
    "test perplexity" if task == "shakespeare" else "test acc (%)",
    "paired diff. vs DP-SGD" + ("" if task == "shakespeare" else " (points)"),
    "gap to non-private closed",
    "epsilon",
    "sigma",
    "bands",
  ]
  how = "tuned on dev" if task == "rt-top2" else "the config's"
  note = f"\nDP-SGD clip ({how}): {clip:g}\n" if clip is not None else ""
  return _table(header, lines) + note


@renderer
def utility_planned(task: str, epsilon: str) -> str:
  """DP-SGD and adaptive clipping at the study's point and at `dpjax plan`'s (`--budget`)."""
  eps = float(epsilon)
  key = _utility_metric(task)
  scale, fmt = (1.0, ".3f") if key == "test_perplexity" else (100.0, ".2f")
  rows = [
    r
    for r in rows_lib.load("utility")
    if r["task"] == task and r["epsilon_target"] == eps and r["method"] in ("dp-sgd", "adaptive")
  ]
  planned = [r for r in rows if r.get("planned")]
  clips = {r["clip"] for r in planned}
  latest = rows_lib.dedupe(
    [r for r in rows if r.get("planned") or r["clip"] in clips],
    lambda r: {
      **{k: r[k] for k in ("method", "seed", "clip", "steps", "batch_size")},
      "planned": bool(r.get("planned")),
    },
  )
  study = {
    r["seed"]: r for r in latest.values() if r["method"] == "dp-sgd" and not r.get("planned")
  }
  free = _non_private(task)
  free_mean = float(np.mean(list(free.values()))) if free else float("nan")
  base_mean = float(np.mean([r[key] for r in study.values()])) if study else float("nan")
  groups: Dict[tuple, Dict[int, dict]] = {}
  for r in latest.values():
    point = (r["steps"] * r["batch_size"], bool(r.get("planned")), r["steps"], r["batch_size"])
    groups.setdefault(point + (r["method"],), {})[r["seed"]] = r
  lines = []
  order = ("dp-sgd", "adaptive")
  for (budget, is_planned, steps, batch, method), got in sorted(
    groups.items(), key=lambda kv: kv[0][:4] + (order.index(kv[0][4]),)
  ):
    seeds = sorted(got)
    base = method == "dp-sgd" and not is_planned  # the study's DP-SGD: the reference
    mean = float(np.mean([got[k][key] for k in seeds]))
    closed = (mean - base_mean) / (free_mean - base_mean)
    lines.append(
      [
        f"{budget:,}",
        "plan" if is_planned else "study",
        f"{steps} x {batch}",
        method,
        ",".join(map(str, seeds)),
        _ms([scale * got[k][key] for k in seeds], fmt),
        "-" if base else _paired(_test(got, key), _test(study, key), scale, "+" + fmt) or "-",
        "-" if base or not np.isfinite(closed) else f"{int(round(100 * closed)):+d} %",
        f"{max(got[k]['epsilon'] for k in seeds):.3f}",
        f"{got[seeds[0]]['noise_multiplier']:.3f}",
      ]
    )
  for method, got in _peer_runs(task, eps).items():
    seeds = sorted(got)
    first = got[seeds[0]]
    lines.append(
      [f"{first['steps'] * first['batch_size']:,}", "study"]
      + [f"{first['steps']} x {first['batch_size']}", method, ",".join(map(str, seeds))]
      + [_ms([100 * got[k]["test_accuracy"] for k in seeds], ".2f")]
      + [_paired(_test(got), _test(study)) or "-", "-"]
      + [f"{max(got[k]['epsilon'] for k in seeds):.3f}", f"{got[seeds[0]]['noise_multiplier']:.3f}"]
    )
  if free:
    seeds = sorted(free)
    lines.append(
      ["-", "-", "-", "non-private", ",".join(map(str, seeds))]
      + [_ms([scale * free[k] for k in seeds], fmt)]
      + [_paired(free, _test(study, key), scale, "+" + fmt) or "-"]
      + ["+100 %", "inf", "-"]
    )
  header = [
    "gradient evaluations",
    "point",
    "steps x expected batch",
    "method",
    "seeds",
    "test perplexity" if key == "test_perplexity" else "test acc (%)",
    "paired diff. vs the study's DP-SGD" + ("" if key == "test_perplexity" else " (points)"),
    "gap to non-private closed",
    "epsilon",
    "sigma",
  ]
  return _table(header, lines)


# --- LMO-DP ------------------------------------------------------------------


@renderer
def lmo_search() -> str:
  """The least noise per target: the best shape and the range over the mixture shapes."""
  index = rows_lib.dedupe(
    rows_lib.load("lmo_search"),
    lambda r: {"eps": r["target_epsilon"], "delta": r["delta"], "q": r["q"], "steps": r["steps"]},
  )
  rows = sorted(index.values(), key=lambda r: (-r["delta"], r["target_epsilon"]))
  lines = []
  for r in rows:
    mix = [s["noise"] for s in r["shapes"] if s["shape"] != "laplace"]
    best = "point mass (Laplace)" if r["best"]["shape"] == "laplace" else r["best"]["shape"]
    lines.append(
      [
        _g(r["delta"]),
        _g(r["target_epsilon"]),
        best,
        f"{r['best']['noise']:.3f}",
        f"{min(mix):.3f} - {max(mix):.3f}",
      ]
    )
  return _table(
    ["delta", "target eps", "best shape", "LMO E|Z| / C1", "mixture shapes E|Z| / C1 (min - max)"],
    lines,
  )


@renderer
def lmo_train() -> str:
  """Test accuracy of Gaussian vs LMO noise at each (delta, target)."""
  index = rows_lib.dedupe(
    rows_lib.load("lmo_train"),
    lambda r: {k: r[k] for k in ("mechanism", "target_epsilon", "delta", "seed")},
  )
  rows = list(index.values())
  keys = sorted({(r["delta"], r["target_epsilon"]) for r in rows}, key=lambda k: (-k[0], k[1]))
  lines = []
  for delta, eps in keys:
    cell = {}
    for mech in ("gaussian", "lmo"):
      rs = [
        r
        for r in rows
        if r["mechanism"] == mech and r["target_epsilon"] == eps and r["delta"] == delta
      ]
      if rs:
        cell[mech] = (
          _ms([100 * r["test_accuracy"] for r in rs], ".2f"),
          f"{rs[0]['noise_abs']:.3f}",
          f"{max(r['epsilon'] for r in rs):.3f}",
        )
    g, m = cell.get("gaussian", ("-",) * 3), cell.get("lmo", ("-",) * 3)
    lines.append([_g(delta), _g(eps), g[0], m[0], g[1], m[1], f"{g[2]} / {m[2]}"])
  return _table(
    [
      "delta",
      "target eps",
      "Gaussian (%)",
      "LMO (%)",
      "Gaussian E|Z| / C2",
      "LMO E|Z| / C1",
      "eps (Gaussian / LMO)",
    ],
    lines,
  )


# --- user-level DP -----------------------------------------------------------


USER_MEAN_SPEC = ("sampling", "G", "target_epsilon", "seed", "diverse", "steps")
USER_SHAKESPEARE_SPEC = ("sampling", "G", "target_epsilon", "seed")


def user_settings(groups) -> List[tuple]:
  """(sampling, G) columns: G = 1 makes ELS and ULS the same mechanism, so it is run once."""
  groups = [int(g) for g in (groups.split(",") if isinstance(groups, str) else groups)]
  out = [("uls", 1)] if 1 in groups else []
  return out + [(s, g) for g in groups if g > 1 for s in ("els", "uls")]


@renderer
def user_mean(groups: str = "1,4,16") -> str:
  """Squared error ||theta - mu||^2 (= 2 x the test loss): mean ± std over seeds, per scheme."""
  settings = user_settings(groups)
  index = rows_lib.dedupe(
    rows_lib.load("user_level_mean"), lambda r: {k: r[k] for k in USER_MEAN_SPEC}
  )
  rows = list(index.values())
  keys = sorted({(r["steps"], not r["diverse"], r["target_epsilon"]) for r in rows})
  lines = []
  for steps, identical, eps in keys:
    cells = [str(steps), "identical" if identical else "diverse", f"{eps:g}"]
    for s, g in settings:
      xs = [
        2 * r["test_loss"]
        for r in rows
        if r["steps"] == steps
        and r["diverse"] != identical
        and r["target_epsilon"] == eps
        and r["sampling"] == s
        and r["G"] == g
      ]
      cells.append(_ms(xs, ".4f"))
    lines.append(cells)
  header = ["steps", "users' examples", "user eps"] + [f"{s.upper()} G={g}" for s, g in settings]
  return _table(header, lines)


@renderer
def user_shakespeare(groups: str = "1,8,32") -> str:
  """Test perplexity on unseen characters per scheme (mean over seeds); each row's best in bold."""
  settings = user_settings(groups)
  index = rows_lib.dedupe(
    rows_lib.load("user_level_shakespeare"), lambda r: {k: r[k] for k in USER_SHAKESPEARE_SPEC}
  )
  rows = list(index.values())
  lines = []
  for eps in sorted({r["target_epsilon"] for r in rows}):
    vals = []
    for s, g in settings:
      xs = [
        r["test_perplexity"]
        for r in rows
        if r["target_epsilon"] == eps and r["sampling"] == s and r["G"] == g
      ]
      vals.append(float(np.mean(xs)) if xs else math.nan)
    best = np.nanmin(vals)
    lines.append(
      [f"{eps:g}"]
      + [("-" if math.isnan(v) else (f"**{v:.3f}**" if v == best else f"{v:.3f}")) for v in vals]
    )
  header = ["user eps"] + [("G = 1" if g == 1 else f"{s.upper()} G = {g}") for s, g in settings]
  return _table(header, lines)


# --- DistilDP ----------------------------------------------------------------

DISTIL_ROWS = (
  ("teacher", "teacher (DP, 2 layers)", "+ histogram"),
  ("DistilDP", "**student, DistilDP**", "total"),
  ("direct DP", "student, direct DP", ""),
  ("DPKD", "student, DPKD", "total"),
  ("DPKD teacher", "DPKD's teacher", "total"),
  ("non-private", "student, non-private", ""),
)


@renderer
def distil_dp(seed: str = "0") -> str:
  """Test perplexity (and epsilon spent) of each model, one column per budget."""
  index = rows_lib.dedupe(
    [r for r in rows_lib.load("distil_dp") if r["seed"] == int(seed)],
    lambda r: {"epsilon": r["epsilon"], "seed": r["seed"]},
  )
  runs = sorted(index.values(), key=lambda r: r["epsilon"])
  lines = []
  for key, label, note in DISTIL_ROWS:
    cells = [label]
    for run in runs:
      ppl, e = run["rows"][key]
      ppl_s = f"**{ppl:.3f}**" if key == "DistilDP" else f"{ppl:.3f}"
      e_s = "inf" if not math.isfinite(e) else f"{e:.3f}"
      cells.append(f"{ppl_s} ({e_s}{' ' + note if note and math.isfinite(e) else ''})")
    lines.append(cells)
  return _table(["model"] + [f"eps {r['epsilon']:g}: test ppl (eps spent)" for r in runs], lines)


# --- quickstart and EW-Tune --------------------------------------------------


def _pct(xs, bold: bool = False) -> str:
  """mean ± std % (each value), or the one value %."""
  if len(xs) == 1:
    return f"{xs[0]:.2f} %"
  head = f"{_ms(xs, '.2f')} %"
  return f"{'**' + head + '**' if bold else head} ({', '.join(f'{x:.2f}' for x in xs)})"


@renderer
def quickstart() -> str:
  """`dpjax train` repeated (secret noise each run) and its non-private twin."""
  index = rows_lib.dedupe(
    rows_lib.load("quickstart"), lambda r: {"variant": r["variant"], "run": r["run"]}
  )
  rows = sorted(index.values(), key=lambda r: r["run"])
  lines = []
  for variant, label, command in (
    ("dp", "DP, secret noise (default)", "`dpjax train`"),
    ("non-private", "non-private, same config", "`dpjax train --set private=False`"),
  ):
    rs = [r for r in rows if r["variant"] == variant]
    if not rs:
      continue
    test = [100 * r["test_accuracy"] for r in rs]
    dev = [100 * r["dev_accuracy"] for r in rs]
    eps = max(r["epsilon"] for r in rs)
    lines.append(
      [
        label,
        command,
        str(len(rs)),
        _pct(test, bold=variant == "dp"),
        _pct(dev),
        "inf" if not math.isfinite(eps) else f"{eps:.3f}",
      ]
    )
  return _table(["run", "command", "runs", "test accuracy", "dev accuracy", "epsilon"], lines)


@renderer
def ew_tune_table() -> str:
  """The noise each accountant calibrates, and the PLD epsilon that noise really gives."""
  index = rows_lib.dedupe(
    rows_lib.load("ew_tune_table"),
    lambda r: {k: r[k] for k in ("task", "q", "steps", "delta", "target_epsilon")},
  )
  order = ["sst2", "qnli", "qqp", "mnli"]
  rows = sorted(
    index.values(), key=lambda r: (order.index(r["task"]), -r["delta"], r["target_epsilon"])
  )
  lines = []
  for r in rows:
    cells = [
      r["task"],
      f"{r['q']:.4f}",
      str(r["steps"]),
      f"{r['delta']:g}",
      f"{r['target_epsilon']:g}",
    ]
    for acc in ("rdp", "pld", "edgeworth"):
      sigma = r.get(f"sigma_{acc}")
      e = r.get(f"epsilon_pld_{acc}")
      e_s = f"**{e:.3f}**" if acc == "edgeworth" else f"{e:.3f}"
      cells.append("-" if sigma is None else f"{sigma:.4f} ({e_s})")
    if r.get("sigma_edgeworth-bound") is not None:
      cells.append(f"{r['sigma_edgeworth-bound']:.4f} ({r['epsilon_pld_edgeworth-bound']:.3f})")
    else:
      m = re.search(r"Berry-Esseen error ([0-9.e-]+)", r.get("note_edgeworth-bound", ""))
      cells.append(f"vacuous (BE error {float(m.group(1)):.4f})" if m else "vacuous")
    lines.append(cells)
  return _table(
    [
      "task",
      "q",
      "steps",
      "delta",
      "target eps",
      "sigma RDP (PLD eps)",
      "sigma PLD (PLD eps)",
      "sigma Edgeworth (PLD eps)",
      "Edgeworth bound",
    ],
    lines,
  )


@renderer
def ew_tune_finetune() -> str:
  """MiniLM on RT with the sigma each accountant calibrates (seeds as recorded)."""
  index = rows_lib.dedupe(
    rows_lib.load("ew_tune_finetune"), lambda r: {"accountant": r["accountant"], "seed": r["seed"]}
  )
  rows = list(index.values())
  lines = []
  for acc, label in (("rdp", "RDP"), ("pld", "PLD"), ("edgeworth", "Edgeworth (estimate)")):
    rs = sorted((r for r in rows if r["accountant"] == acc), key=lambda r: r["seed"])
    if not rs:
      continue
    est = rs[0].get("epsilon_estimate")
    reported = f"{rs[0]['epsilon_reported']:.3f}" + {"rdp": " (RDP)", "edgeworth": " (PLD)"}.get(
      acc, ""
    )
    lines.append(
      [
        label,
        f"{rs[0]['sigma']:.4f}",
        f"{rs[0]['epsilon_pld']:.3f}",
        reported,
        "—" if est is None else f"{est:.3f}",
        _pct([100 * r["test_accuracy"] for r in rs]),
        f"{_ms([100 * r['dev_accuracy'] for r in rs], '.2f')} %",
      ]
    )
  return _table(
    [
      "accountant",
      "sigma",
      "PLD eps",
      "reported eps",
      "Edgeworth estimate",
      "test accuracy",
      "dev accuracy",
    ],
    lines,
  )


@renderer
def user_tradeoff() -> str:
  """ELS at fixed noise: examples kept, q and the user epsilon, tight vs group privacy."""
  index = rows_lib.dedupe(
    rows_lib.load("user_level_tradeoff"),
    lambda r: {k: r[k] for k in ("G", "noise_multiplier", "batch_size", "steps", "delta")},
  )
  lines = [
    [
      str(r["G"]),
      f"{r['examples_kept']} ({100 * r['fraction_kept']:.0f}%)",
      f"{r['sampling_rate']:.4f}",
      f"{r['epsilon_els']:.3f}",
      f"{r['epsilon_group']:.3f}",
    ]
    for r in sorted(index.values(), key=lambda r: r["G"])
  ]
  return _table(
    ["G", "examples kept", "q", "user eps (ELS, PLD)", "user eps (group privacy)"], lines
  )


# --- auditing ------------------------------------------------------------------


@renderer
def audit_steps() -> str:
  """One step per mechanism: the accountant's epsilon beside the white-box audit's lower bound."""
  index = rows_lib.dedupe(rows_lib.load("audit_steps"), lambda r: {"setting": r["setting"]})
  lines = [
    [
      r["setting"],
      f"{r['claimed_epsilon']:.3f}",
      f"{r['lower_bound']:.3f}",
      f"{100 * r['lower_bound'] / r['claimed_epsilon']:.0f} %",
      f"{r['gdp_mu']:.3f} [{r['gdp_mu_lower']:.3f}, {r['gdp_mu_upper']:.3f}]",
    ]
    for r in index.values()
  ]
  header = ["one step of", "claimed eps", "audited eps >=", "audited / claimed", "GDP mu [95 % CI]"]
  return _table(header, lines)


@renderer
def audit_runs() -> str:
  """Whole runs with canaries: the claimed epsilon beside the one-run audit's lower bound."""
  index = rows_lib.dedupe(rows_lib.load("audit_runs"), lambda r: {"setting": r["setting"]})
  lines = []
  for r in index.values():
    lb, t = r["lower_bound"], r["tpr_at_fpr"]
    lines.append(
      [
        r["setting"],
        f"{r['claimed']['epsilon']:.3f}",
        f"{r['canaries']} ({r['included']} in)",
        f"{lb['epsilon']:.3f}",
        "-" if lb.get("guesses") is None else f"{lb['correct']} / {lb['guesses']}",
        "-" if t["tpr"] is None else f"{t['tpr']:.3f}",
        f"{t['max_tpr_claimed']:.3f}",
      ]
    )
  header = [
    "run",
    "claimed eps",
    "canaries",
    "audited eps >=",
    "correct / guesses",
    "TPR at FPR 0.05",
    "claim's max TPR there",
  ]
  return _table(header, lines)


# --- speed ---------------------------------------------------------------------


@renderer
def bench_step(file: str = "bench_step_cpu") -> str:
  """Per-shape step time relative to the non-private step, and XLA's step memory."""
  index = rows_lib.dedupe(
    rows_lib.load(file),
    lambda r: {k: r[k] for k in ("method", "width", "seq", "batch", "layers", "vocab", "device")},
  )
  shapes = list(dict.fromkeys((r["width"], r["seq"]) for r in index.values()))
  k = lambda n: f"{n / 1000:.0f}K"
  lines = []
  for w, t in shapes:
    by = {r["method"]: r for r in index.values() if (r["width"], r["seq"]) == (w, t)}
    ratio = {m: by[m]["ratio_to_non_private"] for m in by}
    private = [ratio[m] for m in ("vmap", "vmap_micro", "ghost") if m in ratio]
    ghost = f"{ratio['ghost']:.2f}"
    if ratio.get("ghost") == min(private):
      ghost = f"**{ghost}**"
    mib = lambda m: str(by[m]["step_bytes"] // 2**20)  # MiB, rounded down
    lines.append(
      [
        f"{w}, {t}",
        f"{k(t * t)} {'<' if t * t < w * w else '>'} {k(w * w)}",
        f"{ratio['non_private']:.2f}",
        f"{ratio['vmap']:.2f}",
        f"{ratio['vmap_micro']:.2f}",
        ghost,
        f"{mib('vmap')} / {mib('ghost')} / {mib('non_private')}",
      ]
    )
  return _table(
    [
      "width W, seq T",
      "T^2 vs d x d",
      "non-private",
      "vmap",
      "vmap (micro 4)",
      "ghost",
      "memory vmap / ghost / non-private (MiB)",
    ],
    lines,
  )


@renderer
def bench_accounting(file: str = "bench_accounting") -> str:
  """Noise calibration: seconds and exact PLD evaluations, coarse-to-fine beside bisection."""
  index = rows_lib.dedupe(
    rows_lib.load(file),
    lambda r: {k: r[k] for k in ("method", "sampling_rate", "steps", "target_epsilon", "device")},
  )
  cases = list(
    dict.fromkeys((r["sampling_rate"], r["steps"], r["target_epsilon"]) for r in index.values())
  )
  lines = []
  for q, steps, target in cases:
    by = {
      r["method"]: r
      for r in index.values()
      if (r["sampling_rate"], r["steps"], r["target_epsilon"]) == (q, steps, target)
    }
    fast, slow = by["coarse_to_fine"], by.get("bisection")
    lines.append(
      [
        f"{_g(q)}, {steps:,}, {_g(target)}",
        "-" if slow is None else f"{slow['seconds']:.2f} ({slow['exact_evaluations']})",
        f"{fast['seconds']:.2f} ({fast['exact_evaluations']})",
        "-" if slow is None else f"{slow['seconds'] / fast['seconds']:.1f}x",
        f"{fast['noise_multiplier']:.4f}",
        f"{fast['epsilon_dp_accounting']:.4f} ({fast['epsilon_over_target']:.4f})",
      ]
    )
  return _table(
    [
      "q, steps, target eps",
      "bisection s (exact evals)",
      "coarse-to-fine s (exact evals)",
      "speed-up",
      "sigma",
      "dp-accounting eps of sigma (/ target)",
    ],
    lines,
  )


def cost_table(rows) -> str:
  """XLA's cost analysis per shape: FLOPs, bytes accessed and memory, and their ratios to A.

  Args:
    rows: `bench_cost.py` records.

  Returns:
    The markdown table.
  """
  lines = []
  for shape in dict.fromkeys(_shape_key(r["shape"]) for r in rows):
    group = [r for r in rows if _shape_key(r["shape"]) == shape]
    ref = next((r for r in group if r["config"] == "A"), None)
    for r in group:

      def x(k, r=r):
        return "-" if ref is None else f"{r[k] / ref[k]:.3f}"

      sh = r["shape"]
      lines.append(
        [
          f"{sh['layers']} x d {sh['d']}, vocab {sh['vocab']:,}, {sh['batch']} x {sh['seq']}",
          f"{r['config']} {r['name']}",
          f"{r['flops'] / 1e9:,.1f}",
          x("flops"),
          f"{r['bytes_accessed'] / 1e9:,.2f}",
          x("bytes_accessed"),
          f"{r['memory_bytes'] / 2**30:,.2f}",
          x("memory_bytes"),
        ]
      )
  return _table(["shape", "step", "GFLOP", "x A", "GB accessed", "x A", "memory GiB", "x A"], lines)


def _shape_key(d) -> str:
  return ",".join(f"{k}={d[k]}" for k in sorted(d))


@renderer
def bench_cost(file: str = "bench_cost") -> str:
  """XLA's cost analysis of the compiled steps (`bench_cost.py`): the last row per shape, step."""
  index = rows_lib.dedupe(
    rows_lib.load(file), lambda r: {"shape": r["shape"], "config": r["config"], "jax": r["jax"]}
  )
  return cost_table(list(index.values()))


STEP_LABELS = {
  "A": ("JAX non-private", "A"),
  "B": ("jax_privacy 2.0 clipped_grad (vmap)", "A"),
  "Bm4": ("jax_privacy, microbatch 4", "A"),
  "G": ("dpjax vmap", "A"),
  "H": ("dpjax vmap, microbatch 4", "A"),
  "I": ("dpjax ghost", "A"),
  "Im4": ("dpjax ghost, microbatch 4", "A"),
  "D": ("torch non-private (tied)", "D"),
  "E": ("Opacus 1.6 hooks", "D"),
  "Du": ("torch non-private (untied)", "Du"),
  "Fu": ("Opacus 1.6 ghost (untied)", "Du"),
}


def _spread(r) -> str:
  """A timing row's timed steps as "min-max" ms ("" when the row has no bounds)."""
  lo, hi = r.get("step_ms_min"), r.get("step_ms_max")
  return "" if lo is None or hi is None else f"{lo:,.0f}-{hi:,.0f}"


def _of_shape(r, layers: str, d: str, batch: str, seq: str) -> bool:
  """Whether a `bench_table.py` row was timed at this shape."""
  shape = (int(layers), int(d), int(batch), int(seq))
  return (r.get("layers"), r.get("d"), r.get("batch"), r.get("seq")) == shape


def step_table(rows) -> str:
  """The peer step table of one run (`bench_table.py`): ms, spread, ratio to own non-private, peak.

  Args:
    rows: `bench_table.py` records of one shape (timings and memory-curve rows).

  Returns:
    The markdown table(s).
  """
  steps = [r for r in rows if not r.get("memory_curve")]
  ms = {r["config"]: r["step_ms"] for r in steps if r.get("status") == "ok"}
  lines = []
  for r in steps:
    label, base = STEP_LABELS[r["config"]]
    if r.get("status") != "ok":
      lines.append(
        [f"{r['config']} {label}", f"{r.get('status')}: {r.get('error', '')[:80]}", "", "", ""]
      )
      continue
    ratio = f"{r['step_ms'] / ms[base]:.2f}" if base in ms else "-"
    peak = "-" if r.get("peak_gb") is None else f"{r['peak_gb']:.2f}"
    spread = _spread(r) or "-"
    lines.append([f"{r['config']} {label}", f"{r['step_ms']:,.1f}", spread, ratio, peak])
  head = ["config", "step ms (median)", "timed steps, min-max", "x own non-private", "peak GB"]
  out = _table(head, lines)
  curve = [r for r in rows if r.get("memory_curve")]
  if curve:
    cells = []
    for r in curve:
      got = r.get("largest_batch") if r.get("status") == "ok" else r.get("error", "")[:60]
      cells.append([f"{r['config']} {STEP_LABELS[r['config']][0]}", str(got)])
    budget = next((r["budget_bytes"] for r in curve if r.get("budget_bytes")), None)
    head = "largest batch" + ("" if budget is None else f" within {budget / 1e9:g} GB")
    out += "\n" + _table(["config", head], cells)
  return out


@renderer
def bench_table(
  layers: str, d: str, batch: str, seq: str, file: str = "bench_table", revision: str = ""
) -> str:
  """One shape of the recorded peer step table: the last run's rows (of `revision`, if given)."""
  rows = [r for r in rows_lib.load(file) if revision in ("", r.get("revision"))]
  rows = [
    r
    for r in rows
    if _of_shape(r, layers, d, batch, seq)
    or (
      r.get("memory_curve")
      and (r.get("layers"), r.get("d"), r.get("seq")) == (int(layers), int(d), int(seq))
    )
  ]
  last = rows_lib.dedupe(
    rows, lambda r: {"config": r["config"], "curve": bool(r.get("memory_curve"))}
  )
  return step_table(list(last.values()))


@renderer
def bench_table_runs(layers: str, d: str, batch: str, seq: str, file: str = "bench_table") -> str:
  """Every recorded run of one shape of the peer table: its ratios to A and fastest DP step.

  A run is the rows of one revision; its ratios are to that run's own A.
  """
  runs: Dict[str, Dict[str, Any]] = {}
  for r in rows_lib.load(file):
    if r.get("memory_curve") or r.get("status") != "ok":
      continue
    if not _of_shape(r, layers, d, batch, seq):
      continue
    runs.setdefault(r.get("revision", "?"), {})[r["config"]] = r
  lines = []
  for rev, got in runs.items():
    if "A" not in got:
      continue
    a = got["A"]["step_ms"]
    ratio = lambda c: f"{got[c]['step_ms'] / a:.2f}" if c in got else "-"
    dp = {c: got[c]["step_ms"] for c in got if STEP_LABELS[c][1] != c}
    fastest = min(dp, key=dp.get) if dp else None
    spread = _spread(got["A"])
    timing = f"{a:,.0f} ({spread})" if spread else f"{a:,.0f}"
    machine = got["A"].get("machine", "-")
    cells = [rev, machine, timing, ratio("I"), ratio("Im4"), ratio("H")]
    lines.append(cells + ["-" if fastest is None else f"{fastest} {STEP_LABELS[fastest][0]}"])
  head = ["run (revision)", "machine", "A ms (timed min-max)", "I x A", "Im4 x A", "H x A"]
  return _table(head + ["fastest DP step"], lines)


# --- memory over a long run ----------------------------------------------------


@renderer
def bench_memory(file: str = "bench_memory") -> str:
  """Resident memory over a long run (`bench_memory.py`): one line per revision and cadence."""
  index = rows_lib.dedupe(
    rows_lib.load(file),
    lambda r: {
      k: r[k] for k in ("revision", "steps", "warmup", "log_every", "checkpoint_every", "machine")
    },
  )
  lines = []
  for r in index.values():
    counted = [m for s, m in r["rss_mb"] if s >= r["warmup"]]
    lines.append(
      [
        r["revision"],
        f"{r['steps']:,}",
        f"{r['log_every']:,} / {r['checkpoint_every']:,}",
        f"{r['rss_mb'][0][1]:.1f}",
        f"{r['rss_start_mb']:.1f}",
        f"{r['rss_end_mb']:.1f}",
        f"{max(counted) - min(counted):.1f}",
        f"{r['growth_mb']:+.1f}",
        f"{r['slope_mb_per_1000']:+.2f}",
        f"{r['seconds']:.0f}",
      ]
    )
  return _table(
    [
      "revision",
      "steps",
      "log / checkpoint every",
      "RSS MB at the first sample",
      "after the warm-up",
      "at the end",
      "max - min after the warm-up",
      "growth MB (end - warm-up)",
      "slope MB / 1,000 steps",
      "run s",
    ],
    lines,
  )


@renderer
def plan_memory(file: str = "plan_memory", seq: Optional[str] = None) -> str:
  """`dpjax plan-memory` rows (`plan_memory.py`): the DP step beside the non-private one.

  Per device. `seq`: "256" for the rows at that length, "long" for the others.
  """
  index = rows_lib.dedupe(
    rows_lib.load(file),
    lambda r: {
      k: r.get(k, "1x1") if k == "mesh" else r[k]
      for k in ("model", "lora_rank", "batch", "seq", "mesh", "dtype", "frozen_dtype", "clipping")
    },
  )
  gib = 2**30
  lines = []
  for r in index.values():
    if seq is not None and (r["seq"] == 256) != (seq == "256"):
      continue
    dp, base = r["dp"], r["non_private"]
    fits = ", ".join(f"{'yes' if dp['peak'] <= g * gib else 'no'}" for g in (16, 80))
    frozen = r.get("device_frozen_bytes", r["frozen_bytes"])  # rows before meshes: one device
    lines.append(
      [
        r["revision"],
        r["model"],
        f"LoRA r{r['lora_rank']}" if r["lora_rank"] else "full",
        r.get("mesh", "1x1"),
        f"{r['batch']} x {r['seq']}",
        f"{r['parameters'] / 1e9:.3f} B / "
        + (f"{r['trained'] / 1e9:.3f} B" if r["trained"] >= 1e9 else f"{r['trained'] / 1e6:.3g} M"),
        f"{frozen / gib:.2f}",
        f"{dp['peak'] / gib:.2f}",
        f"{base['peak'] / gib:.2f}",
        f"{dp['peak'] / base['peak']:.3f}x",
        f"{dp['flops'] / 1e12:.3f}",
        f"{dp['flops'] / base['flops']:.3f}x",
        fits,
        f"{r['seconds']:.0f}",
      ]
    )
  return _table(
    [
      "revision",
      "model",
      "method",
      "mesh (data x model)",
      "batch x seq (all devices)",
      "parameters / trained",
      "frozen GiB per device (bf16)",
      "DP peak GiB per device",
      "non-private peak GiB",
      "memory ratio",
      "DP TFLOPs per device",
      "FLOPs ratio",
      "fits 16 / 80 GiB",
      "compile s",
    ],
    lines,
  )


@renderer
def bench_1b(file: str = "bench_1b", rows: Optional[List[dict]] = None) -> str:
  """`bench_1b.py` rows (`file`'s, or `rows`): the DP-LoRA step beside the non-private one."""
  runs: Dict[tuple, Dict[str, dict]] = {}
  for r in rows_lib.load(file) if rows is None else rows:
    dtype = r.get("dtype", "float32")  # the first rows: float32 compute, on this CPU
    key = (r["revision"], r["model"], r["lora_rank"], r["batch"], r["seq"], dtype, r["steps"])
    runs.setdefault(key, {})[r["mode"]] = r
  lines = []
  for (revision, model, rank, batch, seq, dtype, steps), modes in runs.items():
    if set(modes) != {"dp", "non_private"}:
      continue
    dp, base = modes["dp"], modes["non_private"]
    lines.append(
      [
        revision,
        model,
        f"LoRA r{rank}",
        f"{batch} x {seq}",
        dtype,
        str(steps),
        _ms(dp["step_s"], ".1f"),
        _ms(base["step_s"], ".1f"),
        f"{dp['step_s_mean'] / base['step_s_mean']:.3f}x",
        f"{dp['peak_rss_gib']:.2f}",
        f"{base['peak_rss_gib']:.2f}",
        f"{dp['peak_rss_gib'] / base['peak_rss_gib']:.3f}x",
        f"{dp['base_rss_gib']:.2f}",
        " / ".join(
          "-" if m.get("device_peak_gib") is None else f"{m['device_peak_gib']:.2f}"
          for m in (dp, base)
        ),
      ]
    )
  return _table(
    [
      "revision",
      "model",
      "method",
      "batch x seq",
      "compute",
      "timed steps",
      "DP s / step",
      "non-private s / step",
      "time ratio",
      "DP peak RSS GiB",
      "non-private peak RSS GiB",
      "RSS ratio",
      "RSS with the weights built GiB",
      "device peak GiB (DP / non-private)",
    ],
    lines,
  )


@renderer
def utility_model(file: str = "utility_model") -> str:
  """`utility_model.py` rows of one task family (`file`): its grid over (eps, B, T).

  A language model's rows (no accuracy) show dev and test perplexity instead."""
  index = rows_lib.dedupe(
    rows_lib.load(file), lambda r: {k: r[k] for k in ("eps", "batch", "steps")}
  )
  rows = sorted(index.values(), key=lambda r: (r["eps"], r["batch"], r["steps"]))
  lm = bool(rows) and "dev_accuracy" not in rows[0]
  scores = ("dev perplexity", "test perplexity") if lm else ("dev accuracy", "test accuracy")
  lines = []
  for r in rows:
    if lm:
      score = [f"{r['dev_perplexity']:.3f}", f"{r['test_perplexity']:.3f}"]
    else:
      score = [f"{100 * r['dev_accuracy']:.2f} %", f"{100 * r['test_accuracy']:.2f} %"]
    lines.append(
      [
        r["revision"],
        _g(r["eps"]),
        str(r["batch"]),
        str(r["steps"]),
        f"{r['sigma']:.3f}",
        f"{r['noise_batch_ratio']:.2e}",
        f"{r['tan']:.3f}",
        f"{r['dev_loss']:.4f}",
        *score,
        f"{r['epsilon']:.3f}",
        f"{r['seconds']:.0f}",
      ]
    )
  return _table(
    [
      "revision",
      "target eps",
      "batch B",
      "steps T",
      "sigma",
      "sigma / B",
      "TAN",
      "dev loss",
      *scores,
      "epsilon",
      "run s",
    ],
    lines,
  )


# --- the driver --------------------------------------------------------------


def render(head: str) -> str:
  name, *args = head.split()
  if name not in RENDERERS:
    raise SystemExit(f"RESULTS.md: unknown report {name!r}; known: {sorted(RENDERERS)}")
  kwargs = dict(a.split("=", 1) for a in args)
  return RENDERERS[name](**kwargs)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--check", action="store_true", help="rewrite nothing; exit 1 if a table differs from its rows"
  )
  p.add_argument("--file", default=RESULTS_MD)
  args = p.parse_args(argv)
  text = open(args.file).read()
  stale = []

  def sub(m):
    new = render(m.group("head"))
    if new != m.group("body"):
      stale.append(m.group("head"))
    return m.group(1) + new + m.group(4)

  out = BLOCK.sub(sub, text)
  n = len(BLOCK.findall(text))
  if args.check:
    if stale:
      print(
        f"{len(stale)} of {n} tables in {args.file} differ from the recorded rows "
        "(run `python experiments/report.py`):\n  " + "\n  ".join(stale),
        file=sys.stderr,
      )
      return 1
    print(f"{n} tables in {args.file} match the recorded rows")
    return 0
  with open(args.file + ".tmp", "w") as f:
    f.write(out)
  os.replace(args.file + ".tmp", args.file)
  print(f"{n} tables regenerated, {len(stale)} changed: {stale}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
