"""`dpjax plan-memory` at the sizes users fine-tune: the DP step beside the non-private one.

  python experiments/plan_memory.py                         # the default grid below
  python experiments/plan_memory.py --models llama-3.2-1b --ranks 16
  python experiments/plan_memory.py --meshes 1x8,8x8 --batch 4   # per-device, on virtual devices
  python experiments/plan_memory.py --seqs 1024,2048,4096          # long sequences
  (add --record to append the rows to experiments/results/plan_memory.jsonl; a row
  already recorded at this revision for the same setting is skipped)

Each row compiles the run's real private step and its non-private step on
abstract shapes (no weight is allocated) with XLA on this machine, on one
device or a ("data", "model") mesh of virtual CPU devices (`--meshes`; the
batch given per data replica, so every row's replica sees the same batch),
and records XLA's memory and cost analyses (`dpjax.pipelines.plan_memory`),
per device. The grid is sized for a 2-core CPU: each compile of a 16-layer 1B
step takes minutes; the 8B shapes take longer and are opt-in (`--models`).

Row (JSON line): model, lora_rank (0: full fine-tuning), batch (all devices), seq,
mesh ("DATAxMODEL"), dtype, frozen_dtype, clipping, parameters, device_trained_bytes,
device_frozen_bytes, trained, trained_bytes, frozen_bytes, dp,
non_private (each: argument, output, alias, temp, peak, flops, bytes_accessed,
optimizer_state), backend, seconds, revision, machine.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import rows as rows_lib  # noqa: E402

NAME = "plan_memory"
SETTING = (
  "model",
  "lora_rank",
  "batch",
  "seq",
  "mesh",
  "dtype",
  "frozen_dtype",
  "clipping",
  "revision",
)


def setting_of(row: dict) -> dict:
  """A row's setting (rows before meshes were planned are one device's: "1x1")."""
  return {k: row.get(k, "1x1") if k == "mesh" else row[k] for k in SETTING}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="llama-3.2-1b,gemma-2-2b")
  p.add_argument("--ranks", default="16,0", help="LoRA ranks; 0 is full fine-tuning")
  p.add_argument("--batch", type=int, default=4, help="units per data replica")
  p.add_argument("--seqs", default="256", help="tokens per unit, one row each")
  p.add_argument("--meshes", default="1x1", help="DATAxMODEL meshes, one row each")
  p.add_argument("--clipping", default="ghost")
  p.add_argument("--record", action="store_true")
  a = p.parse_args(argv)

  from dpjax.pipelines.plan_memory import mesh_devices, parse_mesh, plan_memory, report

  meshes = [parse_mesh(m) for m in a.meshes.split(",")]
  mesh_devices(1, max(d * m for d, m in meshes))  # the virtual devices, before JAX starts
  done = rows_lib.dedupe(rows_lib.load(NAME), setting_of)
  revision = rows_lib.revision()
  for model, rank, seq, (data, parts) in itertools.product(
    a.models.split(","), map(int, a.ranks.split(",")), map(int, a.seqs.split(",")), meshes
  ):
    setting = dict(
      model=model,
      lora_rank=rank,
      batch=a.batch * data,
      seq=seq,
      mesh=f"{data}x{parts}",
      dtype="bfloat16",
      frozen_dtype="bfloat16",
      clipping=a.clipping,
      revision=revision,
    )
    if a.record and rows_lib.find(done, setting) is not None:
      print(f"recorded already: {setting}")
      continue
    start = time.time()
    r = plan_memory(
      model,
      lora_rank=rank,
      batch=a.batch * data,
      seq=seq,
      clipping=a.clipping,
      mesh=(data, parts),
    )
    row = dict(r, **setting, seconds=time.time() - start, machine=rows_lib.machine())
    print(report(r, 16 * 2**30), flush=True)
    print(f"({row['seconds']:.0f} s)", flush=True)
    if a.record:
      rows_lib.append(NAME, [row])
  return 0


if __name__ == "__main__":
  sys.exit(main())
