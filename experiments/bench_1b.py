"""A Llama-3.2-1B-shaped DP-LoRA step, beside the non-private LoRA step (CPU or GPU).

  python experiments/bench_1b.py                  # the CPU run recorded in RESULTS.md
  python experiments/bench_1b.py --model /path/to/config.json --steps 2 --seq 32
  python experiments/bench_1b.py --dtype bfloat16 --steps 8 --out OUT.jsonl   # on a GPU
  (add --record to append the rows to experiments/results/bench_1b.jsonl)

The model is the `llama-3.2-1b` preset's shape (`dpjax plan-memory`'s presets: the
public config.json, 1.236 B parameters) with RANDOM weights: no 1B checkpoint is on the
package index, and a step's time and memory do not depend on the weights' values. LoRA
rank 16 on q/k/v/o (float32 factors, the only trained parameters), the frozen base
stored in bfloat16 (`task.frozen_dtype`'s default), float32 compute (`task.dtype`'s
default; `--dtype bfloat16` on an accelerator), ghost clipping, Adam; one physical batch
of 4 x 256 random tokens per step.

Each mode (dp, non_private) runs in a process of its own, so that its peak RSS is its
own: the process builds the base leaf by leaf in bfloat16, resets the kernel's
high-water mark (/proc/self/clear_refs), compiles the loop's step
(`dpjax.pipelines.plan_memory.build_step`: the plan's `accumulate` then `apply_update`,
the parameters and optimizer state donated), runs `--steps` steps after one warm-up
step, and reports: seconds per step (mean, std), the peak RSS over compile and steps
(VmHWM), on an accelerator its peak device memory (`memory_stats`), the compile
seconds, and how far the factors moved (the steps did train).
The modes run one after the other, never at once (a timing).

Row (JSON line): mode, model, lora_rank, batch, seq, dtype, steps, step_s (list),
step_s_mean, step_s_std, compile_s, peak_rss_gib, base_rss_gib (after the weights were
built), device_peak_gib (None on a CPU), backend, factors_moved, revision, machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import rows as rows_lib  # noqa: E402

NAME = "bench_1b"
MODES = ("dp", "non_private")


def _rss(field: str) -> float:
  """VmRSS or VmHWM of this process, GiB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024 / 2**30
  return float("nan")


def _one(a) -> dict:
  """One mode's run, in this process."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from dpjax.models import adapters
  from dpjax.pipelines.plan_memory import build_step, model_parts

  cfg, _, trainable, frozen, loss_fn = model_parts(
    a.model,
    lora_rank=a.rank,
    lora_targets=r".*attn/(q|k|v|o)",
    dtype=a.dtype,
    frozen_dtype="bfloat16",
  )
  rng = np.random.default_rng(0)
  leaves, treedef = jax.tree.flatten(frozen)
  frozen = jax.tree.unflatten(  # one leaf at a time: never the whole base in float32
    treedef,
    [jnp.asarray(0.02 * rng.standard_normal(x.shape, np.float32), x.dtype) for x in leaves],
  )
  shapes = trainable
  trainable = adapters.init_lora(
    jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), frozen),
    jax.random.PRNGKey(1),
    rank=a.rank,
    targets=r".*attn/(q|k|v|o)",
  )
  assert jax.tree.structure(trainable) == jax.tree.structure(shapes)
  base_rss = _rss("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:  # the high-water mark from here on
    f.write("5")
  step = build_step(
    trainable,
    frozen,
    loss_fn,
    private=a.mode == "dp",
    batch=a.batch,
    seq=a.seq,
    clipping="ghost",
    optimizer="adam",
  )
  t = time.perf_counter()
  compiled = step.fn.lower(*step.args).compile()
  compile_s = time.perf_counter() - t
  opt_state = step.tx.init(trainable)
  ids = rng.integers(3, cfg.vocab_size, (a.batch, a.seq)).astype(np.int32)
  examples = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
  mask = np.ones((a.batch,), np.float32)
  start = [np.asarray(x) for x in jax.tree.leaves(trainable)]  # the step donates its buffers
  params, times = trainable, []
  for i in range(a.steps + 1):  # the first is a warm-up
    t = time.perf_counter()
    state = compiled(params, opt_state, frozen, examples, mask)
    jax.block_until_ready(state)
    if i:
      times.append(time.perf_counter() - t)
    params, opt_state = state.params, state.opt_state
    print(f"{a.mode} step {i}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
  end = jax.tree.leaves(params)
  moved = max(float(np.max(np.abs(np.asarray(x) - y))) for x, y in zip(end, start))
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return dict(
    backend=jax.default_backend(),
    device_peak_gib=None if peak is None or jax.default_backend() == "cpu" else peak / 2**30,
    step_s=times,
    step_s_mean=float(np.mean(times)),
    step_s_std=float(np.std(times)),
    compile_s=compile_s,
    peak_rss_gib=_rss("VmHWM"),
    base_rss_gib=base_rss,
    factors_moved=moved,
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="llama-3.2-1b", help="a plan-memory preset or a config.json")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute")
  p.add_argument("--out", help="also append the rows to this JSONL file")
  p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one mode, in this process
  p.add_argument("--record", action="store_true")
  a = p.parse_args(argv)
  if a.mode:
    print(json.dumps(_one(a)))
    return 0
  setting = dict(
    model=a.model, lora_rank=a.rank, batch=a.batch, seq=a.seq, dtype=a.dtype, steps=a.steps
  )
  rows = []
  for mode in MODES:
    cmd = [sys.executable, __file__, "--mode", mode, "--model", a.model, "--rank", str(a.rank)]
    cmd += ["--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps)]
    cmd += ["--dtype", a.dtype]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    row = dict(json.loads(out.strip().splitlines()[-1]), mode=mode, **setting)
    row.update(revision=rows_lib.revision(), machine=rows_lib.machine())
    print(json.dumps(row), flush=True)
    rows.append(row)
    if a.out:
      with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
  dp, base = rows
  print(
    f"DP / non-private: step time {dp['step_s_mean'] / base['step_s_mean']:.3f}x, "
    f"peak RSS {dp['peak_rss_gib'] / base['peak_rss_gib']:.3f}x"
  )
  if a.record:
    rows_lib.append(NAME, rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
