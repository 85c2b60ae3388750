"""Accounted hyper-parameter tuning: the best of K ~ TNB(eta, gamma) private runs (`dpjax tune`).

Trying configurations on the private data and keeping the best is a release
too. `tune` runs the procedure whose cost `dpjax.core.accounting.selection`
bounds (Papernot and Steinke 2022, arXiv 2110.03620, Theorem 2): it draws K
from TNB(eta, gamma) and, for each of the K runs, a configuration uniformly
from the grid, both from OS entropy before the first run; runs them, each a
full private training with its own fresh noise in its own run directory; and
selects the run of the best dev score. The tuning's epsilon is the selection
bound on one run's event (all runs share it: the grid may change only what
leaves sigma, q and the steps alone), and with a target epsilon the noise is
calibrated so that the TUNING meets it, not each run.

What may be released: the selected run (its weights, its score) with the
tuning's epsilon, and nothing else. K, the other runs and their scores are
part of the mechanism's internal state: `tuning.json` (the tuning's ledger)
and the run directories are owner-only. The dev split that scores the runs is
held-out data the guarantee does not cover (the guarantee is per example of
the training split, like a run's own); score on public data, or account the
score, when the dev split is private too.

Resumable: `tuning.json` keeps K and the draws; a rerun of the same command
skips finished runs and resumes an interrupted one from its checkpoint.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dpjax.core import accounting
from dpjax.core.accounting import events as ev
from dpjax.core.accounting import selection
from dpjax.pipelines.planner import parse_tuning, plan_points
from dpjax.tasks import build_task
from dpjax.training import loop, rundir
from dpjax.training import spec as spec_lib
from dpjax.training.config import load_config
from dpjax.training.plan import batch_size_for
from dpjax.training.spec import SpecError
from dpjax.training.task import derived_data_dir, num_rows

RECORD = "tuning.json"
# Keys a grid may vary: they leave the event (sigma, q, steps) alone. The clip norm
# scales the noise with it, so each run's event is the same DP-SGD event.
FREE_PRIVACY_KEYS = ("l2_clip_norm",)
EVENT_KEYS = ("steps",)


def parse_grid(items: Sequence[str]) -> Dict[str, List[str]]:
  """`KEY=V1,V2,...` items -> {key: [values]} (values as `--set` takes them).

  Args:
    items: the `--grid` arguments.

  Returns:
    The grid, keys in the order given.
  """
  grid: Dict[str, List[str]] = {}
  for item in items:
    key, sep, values = item.partition("=")
    vals = [v.strip() for v in values.split(",")]
    if not sep or not key.strip() or not all(vals):
      raise SpecError(f"--grid must be KEY=V1,V2,... (e.g. learning_rate=1e-3,3e-3), got {item!r}")
    key = key.strip()
    if key in grid:
      raise SpecError(f"--grid names {key!r} twice")
    if key in EVENT_KEYS or (key in spec_lib.PRIVACY_KEYS and key not in FREE_PRIVACY_KEYS):
      raise SpecError(
        f"--grid {key}: it changes sigma, q or the steps, so the runs would not share one "
        f"event; a grid may vary training keys and {', '.join(FREE_PRIVACY_KEYS)}"
      )
    grid[key] = vals
  if not grid:
    raise SpecError("give at least one --grid KEY=V1,V2,...")
  return grid


def candidates(grid: Dict[str, List[str]]) -> List[List[str]]:
  """Every combination of the grid, as `--set` items.

  Args:
    grid: {key: [values]} (`parse_grid`).

  Returns:
    One list of `KEY=VALUE` items per candidate.
  """
  keys = list(grid)
  return [[f"{k}={v}" for k, v in zip(keys, vals)] for vals in itertools.product(*grid.values())]


def check_tunable(spec) -> None:
  """One line unless the spec is DP-SGD per example (the event the selection bound is on).

  Args:
    spec: a validated spec (raises SpecError otherwise).
  """
  if not spec.private:
    raise SpecError("tune: the config is not private (private=False): nothing to account")
  if spec.privacy_unit != "example" or spec.mechanism != "gaussian":
    raise SpecError(
      f"tune: accounted tuning covers Gaussian DP-SGD per example, got mechanism "
      f"{spec.mechanism!r} per {spec.privacy_unit!r}"
    )
  if spec.mf_bands != 1 or spec.mf_strategy == "blt" or spec.adaptive_clipping or spec.dp_sam:
    raise SpecError(
      "tune: correlated noise (mf_bands, mf_strategy), adaptive clipping and DP-SAM "
      "release more than one DP-SGD step each: tune them with independent noise"
    )
  if spec.accountant in accounting.ESTIMATES:
    raise SpecError(
      f"tune: accountant {spec.accountant!r} estimates epsilon; the tuning is bounded by RDP: "
      "give accountant='pld' or 'rdp'"
    )


def _event(spec, n: int, tuning) -> Tuple[float, int, float]:
  """(q, steps, sigma) every run releases at; sigma calibrated for the tuning when targeted."""
  q = spec.sampling_rate or batch_size_for(spec, n) / n
  steps = int(spec.steps)
  if spec.noise_multiplier is not None:
    return q, steps, float(spec.noise_multiplier)
  if spec.sampling_rate is not None:
    raise SpecError("tune: with sampling_rate set, give noise_multiplier, not target_epsilon")
  # Calibrated so that the whole tuning meets the target, not each run.
  point = plan_points(
    spec.target_epsilon, spec.delta, n, steps=steps, batch=round(q * n), tuning=tuning
  )[0]
  return point.sampling_rate, steps, point.noise_multiplier


def _draws(eta: float, gamma: float, n: int) -> Tuple[int, List[int]]:
  """K ~ TNB(eta, gamma) and K candidate indices, from OS entropy (never a seed)."""
  rng = np.random.default_rng(secrets.randbits(128))
  k = selection.sample_runs(rng, eta, gamma)
  return k, [int(i) for i in rng.integers(0, n, size=k)]


def tune(
  config: str,
  grid_items: Sequence[str],
  tuning: Tuple[float, float],
  workdir: str,
  sets: Sequence[str] = (),
  score: str = "dev_accuracy",
  progress: bool = True,
  max_runs: Optional[int] = None,
) -> Dict[str, Any]:
  """Runs (or resumes) an accounted tuning in `workdir`; its record (`tuning.json`).

  Args:
    config: the config file or shipped name, as `dpjax train` takes it.
    grid_items: `KEY=V1,V2,...` items (`parse_grid`).
    tuning: (eta, gamma) of K's TNB distribution (eta = 1: geometric, E[K] =
      1/gamma).
    workdir: the tuning's directory (created owner-only; run k in `run-k`).
    sets: `--set` items applied to every candidate.
    score: the final metric the best run maximises (a name ending in `loss`
      or `perplexity` is minimised).
    progress: show each run's progress bar.
    max_runs: refuse before any run when the drawn K exceeds this (None: no cap).
      The cap is checked against the draw, so refusing does not change K.

  Returns:
    The record: eta, gamma, expected_runs, runs (K, each with its candidate,
    score and ledger epsilon), selected (the best run's index), epsilon (the
    tuning's, at the config's delta), sigma, sampling_rate, steps.
  """
  eta, gamma = tuning
  selection.check_tnb(eta, gamma)
  grid = parse_grid(grid_items)
  cands = candidates(grid)
  specs = [
    spec_lib.validate(spec_lib.with_defaults(load_config(config, list(sets) + c))) for c in cands
  ]
  for s in specs:
    check_tunable(s)
  if not score.startswith("dev_"):
    raise SpecError(f"--score must name a dev metric (e.g. dev_accuracy), got {score!r}")
  lower = score.endswith("loss") or score.endswith("perplexity")
  path = os.path.join(workdir, RECORD)
  with rundir.owner_only_files():
    fresh = rundir.make_private_dir(workdir)
    try:
      rec = rundir.read_json(path)
      ident = dict(eta=eta, gamma=gamma, config=config, sets=list(sets), grid=grid)
      if rec is not None and {k: rec[k] for k in ident} != ident:
        raise SpecError(
          f"{path} is another tuning's (its config, --set, --grid or --tuning differ): "
          "use a new directory"
        )
      with derived_data_dir(os.path.join(workdir, "features")):
        task = build_task(specs[0])
      q, steps, sigma = _event(specs[0], num_rows(task.train), (eta, gamma))
    except BaseException:
      if fresh:  # nothing drawn, nothing run: leave nothing behind
        shutil.rmtree(workdir, ignore_errors=True)
      raise
    if rec is None:  # K and the candidates, drawn once: a rerun never redraws them
      k, order = _draws(eta, gamma, len(cands))
      rec = dict(
        mechanism="best of K ~ TNB(eta, gamma) runs (Papernot-Steinke 2022, Theorem 2)",
        **ident,
        expected_runs=selection.tnb_mean(eta, gamma),
        k=k,
        draws=[cands[i] for i in order],
        runs=[],
      )
    rec.update(score=score, sigma=sigma, sampling_rate=q, steps=steps, delta=specs[0].delta)
    rundir.write_json_atomic(path, rec)
    if max_runs is not None and rec["k"] > max_runs:
      raise SpecError(
        f"the drawn K = {rec['k']} runs exceeds --max-runs {max_runs}; K is kept in {path} "
        "(redrawing it would spend privacy): raise the cap or give up this tuning"
      )
    for i in range(len(rec["runs"]), rec["k"]):
      items = list(sets) + rec["draws"][i] + [f"noise_multiplier={sigma!r}", "target_epsilon=None"]
      run_spec = spec_lib.validate(spec_lib.with_defaults(load_config(config, items)))
      run_dir = os.path.join(workdir, f"run-{i + 1}")
      if progress:
        print(f"tune: run {i + 1}: {' '.join(rec['draws'][i])}", flush=True)
      rundir.make_private_dir(run_dir)
      _mark(run_dir, None, rec)  # pending: no export until the selection is made
      res = loop.train(run_spec, task, run_dir, progress=progress)
      seg = res.ledger.segments
      if len(seg) != 1 or seg[0].steps != steps or seg[0].extra_releases:
        raise RuntimeError(
          f"{run_dir}: the run's ledger is not one DP-SGD segment of {steps} steps"
        )
      if abs(seg[0].sampling_rate - q) > 1e-12 or seg[0].noise_multiplier != sigma:
        raise RuntimeError(f"{run_dir}: the run released at q or sigma other than the tuning's")
      value = res.final_metrics.get(score)
      if value is None:
        have = sorted(m for m in res.final_metrics if m.startswith("dev_"))
        raise SpecError(f"--score {score}: the runs report no such metric (they report {have})")
      rec["runs"].append(
        dict(
          dir=run_dir, candidate=rec["draws"][i], score=float(value), epsilon=res.privacy["epsilon"]
        )
      )
      rundir.write_json_atomic(path, rec)
    scores = [r["score"] for r in rec["runs"]]
    best = int(np.argmin(scores) if lower else np.argmax(scores))
    event = ev.dpsgd_event(sigma, q, steps)
    rec.update(
      selected=best,
      selected_dir=rec["runs"][best]["dir"],
      epsilon=selection.selection_epsilon(event, rec["delta"], eta, gamma),
      accountant="rdp (the selection bound)",
    )
    rundir.write_json_atomic(path, rec)
    for i, r in enumerate(rec["runs"]):
      _mark(r["dir"], i == best, rec)
  return rec


def _mark(run_dir: str, selected: Optional[bool], rec: Dict[str, Any]) -> None:
  """A run's part in its tuning (`run_dir/tuning.json`), read by `dpjax export`.

  selected None: the selection is not made yet; False: not the released run;
  True: the released run, its guarantee the tuning's epsilon.
  """
  mark = dict(selected=selected, tuning=os.path.dirname(os.path.abspath(run_dir)))
  if selected:
    mark.update(
      {k: rec[k] for k in ("epsilon", "delta", "eta", "gamma", "expected_runs", "mechanism")}
    )
  rundir.write_json_atomic(os.path.join(run_dir, RECORD), mark)


def tuned_privacy(run_dir: str, privacy: Dict[str, Any]) -> Dict[str, Any]:
  """A run's privacy record as released: the tuning's epsilon when it was tuned.

  Args:
    run_dir: the run directory.
    privacy: its `privacy.json`.

  Returns:
    `privacy`, or for the selected run of a tuning a copy whose epsilon is the
    tuning's (`tuning` holds the selection). Raises ValueError for a run whose
    tuning is unfinished or that was not selected: releasing it is not covered.
  """
  mark = rundir.read_json(os.path.join(run_dir, RECORD))
  if mark is None:
    return privacy
  if not mark.get("selected"):
    what = (
      "has not selected its run yet" if mark.get("selected") is None else "selected another run"
    )
    raise ValueError(
      f"{run_dir} is a run of the tuning in {mark.get('tuning')}, which {what}: only the "
      "selected run may be released (see its tuning.json)"
    )
  out = dict(privacy)
  out["epsilon"] = mark["epsilon"]
  out["accountant"] = "rdp"
  out["upper_bound"] = True
  out["tuning"] = {k: mark[k] for k in ("eta", "gamma", "expected_runs", "mechanism")}
  return out


def add_arguments(p) -> None:
  """`dpjax tune`'s arguments.

  Args:
    p: the (sub)parser.
  """
  p.add_argument("config", help="a config file or a shipped config's name, as `dpjax train` takes")
  p.add_argument(
    "--grid",
    action="append",
    required=True,
    metavar="KEY=V1,V2",
    help="values to try (repeat for more keys; every combination is a candidate)",
  )
  p.add_argument(
    "--tuning",
    default="1,0.1",
    help="ETA,GAMMA of K ~ TNB(eta, gamma) (default 1,0.1: geometric, E[K] = 10)",
  )
  p.add_argument(
    "--workdir", required=True, help="the tuning's directory (resumes if it holds one)"
  )
  p.add_argument("--set", action="append", metavar="KEY=VALUE", help="set for every candidate")
  p.add_argument("--score", default="dev_accuracy", help="the dev metric the best run has")
  p.add_argument("--max-runs", type=int, help="refuse (before any run) a drawn K above this")
  p.add_argument("--no-progress", action="store_true")


def command(args) -> int:
  """`dpjax tune`: run or resume the tuning; print the selected run and the epsilon.

  Args:
    args: the parsed arguments (`add_arguments`).

  Returns:
    The exit status.
  """
  rec = tune(
    args.config,
    args.grid,
    parse_tuning(args.tuning),
    args.workdir,
    sets=args.set or [],
    score=args.score,
    progress=not args.no_progress,
    max_runs=args.max_runs,
  )
  best = rec["runs"][rec["selected"]]
  print(
    f"selected {best['dir']} ({' '.join(best['candidate'])}; {rec['score']} {best['score']:.4g}) "
    f"| ({rec['epsilon']:.4g}, {rec['delta']:g})-DP per example for the whole tuning "
    f"(best of K ~ TNB({rec['eta']:g}, {rec['gamma']:g}), E[K] = {rec['expected_runs']:.3g}; "
    f"one run alone: {best['epsilon']:.4g}) | release only the selected run; "
    f"{os.path.join(args.workdir, RECORD)} is owner-only"
  )
  return 0
