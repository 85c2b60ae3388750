"""Step-time benchmark: non-private vs DP-SGD clipping paths, one JSON line per method.

  python experiments/bench_step.py                       # tiny GPT-2 shape, CPU-sized
  python experiments/bench_step.py --layers 12 --width 768 --heads 12 --vocab 50257 \\
      --batch 32 --seq 128                               # GPT-2-small shape (GPU)

Each method is one jitted training step (gradient, then Adam) on the same
random token batch of a GPT-2-family `dpjax.models.decoder.Decoder`:
  non_private   jax.grad of the batch-mean loss
  vmap          dpjax.clipped_grad (per-example gradients by vmap), + Gaussian noise
  vmap_micro    the same with microbatch_size = --micro (less memory, more passes)
  ghost         dpjax.clipped_grad(method="ghost"): ghost norms + book-keeping
Reported: median step time over --iters timed steps (after --warmup), tokens
per second, the compiled step's memory (XLA's memory analysis: arguments +
outputs + temporaries - aliased; per method, on any backend), and ratio =
median / median of non_private measured in the SAME run. With
--memory-curve, also the largest batch (doubling from --batch) whose step
compiles within the device's memory, per method.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dpjax
from dpjax.models.decoder import Decoder, DecoderConfig, causal_lm_loss, init_params


def _step_bytes(fn, *args):
  """Device memory of one compiled step, from XLA's own analysis."""
  m = fn.lower(*args).compile().memory_analysis()
  if m is None:
    return None
  return int(
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )


def _device_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def make_steps(cfg, params, micro):
  model = Decoder(cfg)

  def example_loss(p, ex):
    ids, mask = ex["input_ids"][None], ex["attention_mask"][None]
    logits, _ = model.apply({"params": p}, ids, mask)
    return causal_lm_loss(logits, ids, mask)[0]

  def batch_loss(p, batch):
    return jnp.mean(jax.vmap(example_loss, in_axes=(None, 0))(p, batch))

  opt = optax.adam(1e-4)
  noise = dpjax.mechanisms.gaussian(1.0, 1.0, jax.random.PRNGKey(0))
  steps = {}

  @jax.jit
  def non_private(p, s, batch):
    g = jax.grad(batch_loss)(p, batch)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  steps["non_private"] = (non_private, opt.init(params))
  tx = optax.chain(noise, dpjax.normalize(1.0), opt)
  for name, mb, method in (
    ("vmap", None, "vmap"),
    ("vmap_micro", micro, "vmap"),
    ("ghost", None, "ghost"),
  ):
    grad_fn = dpjax.clipped_grad(example_loss, l2_clip_norm=1.0, microbatch_size=mb, method=method)

    @jax.jit
    def dp_step(p, s, batch, grad_fn=grad_fn):
      g, _ = grad_fn(p, batch)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    steps[name] = (dp_step, tx.init(params))
  return steps


def main():
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--width", type=int, default=128)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--vocab", type=int, default=1024)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--micro", type=int, default=4, help="microbatch size of vmap_micro")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--methods", nargs="+", default=["non_private", "vmap", "vmap_micro", "ghost"])
  ap.add_argument(
    "--memory-curve",
    action="store_true",
    help="also find the largest batch (doubling) whose step fits in device memory",
  )
  ap.add_argument("--max-batch", type=int, default=4096, help="stop the memory curve here")
  args = ap.parse_args()
  if args.batch % args.micro:
    raise SystemExit(f"--batch {args.batch} must be a multiple of --micro {args.micro}")
  cfg = DecoderConfig(
    family="gpt2",
    vocab_size=args.vocab,
    hidden_size=args.width,
    num_layers=args.layers,
    num_heads=args.heads,
    intermediate_size=4 * args.width,
    max_position=max(args.seq, 8),
    tie_embeddings=True,
  )
  params = init_params(cfg, jax.random.PRNGKey(0))

  def make_batch(n):
    rng = np.random.default_rng(0)
    return {
      "input_ids": jnp.asarray(rng.integers(0, args.vocab, (n, args.seq)), jnp.int32),
      "attention_mask": jnp.ones((n, args.seq), jnp.int32),
    }

  batch = make_batch(args.batch)
  steps = make_steps(cfg, params, args.micro)
  base = None
  for name in args.methods:
    fn, state = steps[name]
    p = params
    for _ in range(args.warmup):
      p, state = fn(p, state, batch)
    jax.block_until_ready(p)
    times = []
    for _ in range(args.iters):
      t0 = time.perf_counter()
      p, state = fn(p, state, batch)
      jax.block_until_ready(p)
      times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    base = med if name == "non_private" else base
    print(
      json.dumps(
        {
          "method": name,
          "device": jax.devices()[0].device_kind,
          "layers": args.layers,
          "width": args.width,
          "vocab": args.vocab,
          "batch": args.batch,
          "seq": args.seq,
          "median_s": med,
          "tokens_per_s": args.batch * args.seq / med,
          "step_bytes": _step_bytes(fn, params, state, batch),
          "ratio_to_non_private": None if base is None else med / base,
        }
      ),
      flush=True,
    )

  if args.memory_curve:
    limit = _device_bytes()
    if limit is None:
      print(
        json.dumps(
          {
            "memory_curve": True,
            "skipped": "the backend reports no memory "
            f"limit ({jax.devices()[0].platform}); run it on a GPU",
          }
        ),
        flush=True,
      )
      return
    for name in args.methods:
      fn, state = steps[name]
      fits, n = None, args.batch
      while n <= args.max_batch:
        try:
          need = _step_bytes(fn, params, state, make_batch(n))
        except Exception as e:  # XLA refuses to compile: out of memory
          if "RESOURCE_EXHAUSTED" not in str(e) and "memory" not in str(e).lower():
            raise
          break
        if limit is not None and need is not None and need > limit:
          break
        fits, n = n, 2 * n
      print(
        json.dumps(
          {
            "method": name,
            "memory_curve": True,
            "seq": args.seq,
            "largest_batch": fits,
            "device_bytes": limit,
            "searched_up_to": args.max_batch,
          }
        ),
        flush=True,
      )


if __name__ == "__main__":
  main()
