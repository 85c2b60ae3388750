"""Privacy from the attacker's side: audited lower bounds beside the claimed epsilons.

  python experiments/audit.py steps   # white-box audit of one step per mechanism (~3 min CPU)
  python experiments/audit.py runs    # one-run audits of whole runs with canaries (~15 min CPU)

`steps`: for each mechanism and sampling scheme dpjax trains with, one step
of the real plan (`dpjax.auditing.step_audit`), 10^6 releases with a
worst-case canary and 10^6 without, scored by the released coordinate;
the lower bound is the threshold test's at 95 % confidence, delta 1e-5.
Settings are chosen so that one step's claim is large enough to be seen
(sigma = 1, q = 1 unless said), not as training would run them.

`runs`: `dpjax audit` (`dpjax.auditing.one_run`): the quickstart with 1,000
canaries (RT sentences' frozen features with a wrong label), trained once
with its real plan at eps 3; and the synthetic task at eps 8 and at a
deliberately huge eps (~1,000) to show what the audit can detect at this
scale. Rows go to experiments/results/audit_*.jsonl; a rerun skips the
rows already recorded; `python experiments/report.py` renders the tables.
"""

from __future__ import annotations

import argparse
import os

import rows as rows_lib  # experiments/rows.py, beside this script

from dpjax.auditing import one_run, step_audit
from dpjax.tasks import build_task
from dpjax.training.config import CONFIG_DIR, load_config

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(CONFIG_DIR)
TRIALS = 1_000_000

# name -> (config file, overrides): one step, sigma 1 (Laplace: scale = L1 clip).
STEP_SETTINGS = {
  "Gaussian, q = 1": ("synthetic.py", {}),
  "Gaussian, Poisson q = 0.1": ("synthetic.py", {"sampling_rate": 0.1}),
  "Gaussian + charged DP-SAM (2 releases)": (
    "synthetic.py",
    {"dp_sam": {"rho": 0.05, "mode": "charged", "active_fraction": 1.0}},
  ),
  "Laplace, q = 1": ("synthetic.py", {"mechanism": "laplace", "l1_clip_norm": 1.0}),
  "LMO, b ~ Uniform[0.5, 1.5] (b not seen by the attacker)": (
    "synthetic.py",
    {
      "mechanism": "lmo",
      "l1_clip_norm": 1.0,
      "lmo": {"a1": 0.0, "a3": 0.0, "a4": 1.0, "Ua": 0.5, "Ub": 1.5},
    },
  ),
  "user level, ELS, G = 4, q = 0.5": (
    "user_mean.py",
    {"user_sampling": "els", "max_examples_per_user": 4, "sampling_rate": 0.5},
  ),
  "user level, ULS, G = 4, q = 0.5": (
    "user_mean.py",
    {"user_sampling": "uls", "max_examples_per_user": 4, "sampling_rate": 0.5},
  ),
}

# name -> (config file, overrides, canaries)
RUN_SETTINGS = {
  "quickstart (MiniLM / RT), eps 3": ("quickstart.py", {}, 1000),
  "synthetic MLP, eps 8": (
    "synthetic.py",
    {"task.num_train": 1000, "steps": 300, "target_epsilon": 8.0},
    1000,
  ),
  "synthetic MLP, eps ~1000": (
    "synthetic.py",
    {"task.num_train": 500, "steps": 300, "target_epsilon": 1000.0},
    1000,
  ),
}


def _config(name: str, overrides: dict):
  cfg = load_config(os.path.join(CONFIGS, name))
  for k, v in overrides.items():
    if k.startswith("task."):
      cfg.task[k[len("task.") :]] = v
    else:
      cfg[k] = v
  return cfg


def steps(args):
  done = rows_lib.dedupe(rows_lib.load("audit_steps"), lambda r: {"setting": r["setting"]})
  for name, (file, overrides) in STEP_SETTINGS.items():
    if rows_lib.find(done, {"setting": name}) is not None:
      continue
    cfg = _config(file, dict(steps=1, target_epsilon=None, noise_multiplier=1.0))
    if file == "synthetic.py":
      cfg.sampling_rate, cfg.physical_batch_size = 1.0, 8
    if file == "user_mean.py":
      cfg.task.num_users = 200
    for k, v in overrides.items():
      cfg[k] = v
    r = step_audit.step_audit(cfg, build_task(cfg), trials=args.trials, seed=0)
    row = {
      "setting": name,
      "trials": r.trials,
      "releases": r.releases,
      "delta": r.delta,
      "claimed_epsilon": r.claimed_epsilon,
      "lower_bound": r.lower.epsilon,
      "confidence": r.lower.confidence,
      "gdp_mu": r.gdp.mu,
      "gdp_mu_lower": r.gdp.mu_lower,
      "gdp_mu_upper": r.gdp.mu_upper,
    }
    rows_lib.append("audit_steps", [row])
    print(f"{name}: claimed {r.claimed_epsilon:.3f}, audited >= {r.lower.epsilon:.3f}", flush=True)


def runs(args):
  done = rows_lib.dedupe(rows_lib.load("audit_runs"), lambda r: {"setting": r["setting"]})
  for name, (file, overrides, m) in RUN_SETTINGS.items():
    if rows_lib.find(done, {"setting": name}) is not None:
      continue
    cfg = _config(file, overrides)
    rec = one_run.audit_run(
      cfg, build_task(cfg), None, canaries=m, seed=0, progress=False, accept_other_plan=True
    )
    row = {"setting": name, **rec}
    rows_lib.append("audit_runs", [row])
    print(
      f"{name}: claimed {rec['claimed']['epsilon']:.3f}, "
      f"audited >= {rec['lower_bound']['epsilon']:.3f}",
      flush=True,
    )


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("which", choices=["steps", "runs"])
  p.add_argument("--trials", type=int, default=TRIALS)
  args = p.parse_args()
  steps(args) if args.which == "steps" else runs(args)


if __name__ == "__main__":
  main()
