"""The quickstart's figures: `dpjax train` (secret noise) repeated, and its non-private twin.

  python experiments/quickstart.py [--runs 5]

Each private run draws its noise and batches from OS entropy (the default),
so runs differ only through the noise; the seed (initialisation, splits) is
0 for all. One non-private run of the same config is the reference. Rows go
to experiments/results/quickstart.jsonl (a run index already recorded is not
re-run); `python experiments/report.py` renders the table in RESULTS.md.
About 65 s a run on the 2-core CPU once the frozen features are cached.
"""

from __future__ import annotations

import argparse
import os
import time

import rows as rows_lib  # experiments/rows.py, beside this script

from dpjax.tasks import build_task
from dpjax.training.config import CONFIG_DIR, load_config
from dpjax.training.loop import train

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(CONFIG_DIR, "quickstart.py")


def spec_of(r):
  return {"variant": r["variant"], "run": r["run"]}


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--runs", type=int, default=5, help="private runs (secret noise each)")
  args = p.parse_args()
  done = rows_lib.dedupe(rows_lib.load("quickstart"), spec_of)
  todo = [("dp", i) for i in range(args.runs)] + [("non-private", 0)]
  for variant, run in todo:
    if rows_lib.find(done, {"variant": variant, "run": run}) is not None:
      continue
    cfg = load_config(CONFIG, [] if variant == "dp" else ["private=False"])
    t0 = time.time()
    res = train(cfg, build_task(cfg), None, progress=False)
    m = res.final_metrics
    row = {
      "variant": variant,
      "run": run,
      "seed": int(cfg.seed),
      "test_accuracy": m["test_accuracy"],
      "dev_accuracy": m["dev_accuracy"],
      "epsilon": m["epsilon"],
      "noise_multiplier": res.noise_multiplier,
      "seconds": round(time.time() - t0, 1),
    }
    rows_lib.append("quickstart", [row])
    print(
      f"{variant} run {run}: test {100 * row['test_accuracy']:.2f} % "
      f"(eps {row['epsilon']:.3f}, {row['seconds']:.0f} s)",
      flush=True,
    )


if __name__ == "__main__":
  main()
