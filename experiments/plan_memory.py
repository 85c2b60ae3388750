"""`dpjax plan-memory` at the sizes users fine-tune: the DP step beside the non-private one.

  python experiments/plan_memory.py                         # the default grid below
  python experiments/plan_memory.py --models llama-3.2-1b --ranks 16
  (add --record to append the rows to experiments/results/plan_memory.jsonl; a row
  already recorded at this revision for the same setting is skipped)

Each row compiles the run's real private step and its non-private step on
abstract shapes (no weight is allocated) with XLA on this machine, one device,
and records XLA's memory and cost analyses (`dpjax.pipelines.plan_memory`).
The grid is sized for a 2-core CPU: each compile of a 16-layer 1B step takes
minutes; the 8B shapes take longer and are opt-in (`--models`).

Row (JSON line): model, lora_rank (0: full fine-tuning), batch, seq, dtype,
frozen_dtype, clipping, parameters, trained, trained_bytes, frozen_bytes, dp,
non_private (each: argument, output, alias, temp, peak, flops, bytes_accessed,
optimizer_state), backend, seconds, revision, machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import rows as rows_lib  # noqa: E402

NAME = "plan_memory"
SETTING = ("model", "lora_rank", "batch", "seq", "dtype", "frozen_dtype", "clipping", "revision")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="llama-3.2-1b,gemma-2-2b")
  p.add_argument("--ranks", default="16,0", help="LoRA ranks; 0 is full fine-tuning")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--clipping", default="ghost")
  p.add_argument("--record", action="store_true")
  a = p.parse_args(argv)

  from dpjax.pipelines.plan_memory import plan_memory, report

  done = rows_lib.dedupe(rows_lib.load(NAME), lambda r: {k: r[k] for k in SETTING})
  revision = rows_lib.revision()
  for model in a.models.split(","):
    for rank in map(int, a.ranks.split(",")):
      setting = dict(
        model=model,
        lora_rank=rank,
        batch=a.batch,
        seq=a.seq,
        dtype="bfloat16",
        frozen_dtype="bfloat16",
        clipping=a.clipping,
        revision=revision,
      )
      if a.record and rows_lib.find(done, setting) is not None:
        print(f"recorded already: {setting}")
        continue
      start = time.time()
      r = plan_memory(model, lora_rank=rank, batch=a.batch, seq=a.seq, clipping=a.clipping)
      row = dict(r, **setting, seconds=time.time() - start, machine=rows_lib.machine())
      print(report(r, 16 * 2**30), flush=True)
      print(f"({row['seconds']:.0f} s)", flush=True)
      if a.record:
        rows_lib.append(NAME, [row])
  return 0


if __name__ == "__main__":
  sys.exit(main())
