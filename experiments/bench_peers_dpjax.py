"""dpjax's configurations for the peer harness (shared/bench_peers/bench.py).

  python experiments/bench_peers_dpjax.py G --batch 32 --seq 128 --bench-dir DIR [--out F]
  python experiments/bench_peers_dpjax.py I --microbatch 4 ...   # ghost, 4 units at a time
  python experiments/bench_peers_dpjax.py --check [DIR]   # CPU: G/H/I (I also with
                                                          # microbatch 4) == per-example loop

  G  dpjax_clipped_grad          dpjax.clipped_grad (vmap) + mechanisms.gaussian
                                 + normalize + adamw
  H  dpjax_clipped_grad_micro    the same with --microbatch N
  I  dpjax_clipped_grad_ghost    the same with method="ghost" (ghost norms +
                                 book-keeping, one backward pass; --microbatch N
                                 optional: N units' rows at a time)

The model, data, optimizer, clip (1.0), noise multiplier (1.0), timing loop
(first step, warm-ups, median of --steps) and the JSON record are the
harness's own (`bench.jax_gpt`, `bench.time_steps`, `bench.emit`), imported from
`--bench-dir` (default $DPJAX_BENCH_PEERS, else `experiments/bench_peers`,
the harness vendored in this checkout; the peers themselves, jax_privacy and
Opacus, are optional dependencies), so a G/H line is comparable with the A-F lines of the
same run. Run it in its own process beside `run_all.sh` on the same GPU.
"""

import argparse
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = {
  "G": "dpjax_clipped_grad",
  "H": "dpjax_clipped_grad_micro",
  "I": "dpjax_clipped_grad_ghost",
}


def _bench(bench_dir):
  path = os.path.join(bench_dir, "bench.py")
  if not os.path.exists(path):
    raise SystemExit(f"peer harness not found: {path} (pass --bench-dir)")
  spec = importlib.util.spec_from_file_location("peer_bench", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def add_shape_args(p):
  """The model and batch shape flags (GPT-2-small, 32 x 128 by default), and --bench-dir.

  Args:
    p: an argparse parser.
  """
  for flag, default in (("batch", 32), ("seq", 128), ("layers", 12), ("d", 768), ("heads", 12)):
    p.add_argument(f"--{flag}", type=int, default=default)
  p.add_argument("--vocab", type=int, default=50257)
  p.add_argument("--npos", type=int, default=1024)
  p.add_argument(
    "--bench-dir", default=os.environ.get("DPJAX_BENCH_PEERS", os.path.join(HERE, "bench_peers"))
  )


def parse():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("config", choices=sorted(NAMES))
  add_shape_args(p)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--microbatch", type=int, default=None)
  p.add_argument("--out", default=None)
  p.add_argument("--tag", default="")
  a = p.parse_args()
  a.untied = False
  if a.config == "H" and not a.microbatch:
    p.error("config H needs --microbatch N")
  return a


def build(a, bench, config=None):
  """One step of `config` (default `a.config`) on the harness's model, jitted, and its inputs.

  "A" is the harness's non-private step (value and grad of the batch mean,
  adamw), the reference of the cost analysis; G, H and I are dpjax's (H
  and I read `a.microbatch`; None for I is the whole batch at once).

  Args:
    a: the parsed shape arguments.
    bench: the harness module.
    config: "A", "G", "H" or "I".

  Returns:
    (the jitted step `(params, opt_state, tokens) -> (params, opt_state, loss)`
    with params and opt_state donated, params, opt_state, tokens).
  """
  import jax
  import jax.numpy as jnp
  import optax

  import dpjax

  config = config or a.config
  B, T, V = a.batch, a.seq, a.vocab
  model = bench.jax_gpt(a)
  k_init, k_data, k_noise = jax.random.split(jax.random.key(0), 3)
  tokens = jax.random.randint(k_data, (B, T + 1), 0, V, dtype=jnp.int32)
  params = model.init(k_init, tokens[:1, :T])["params"]
  adamw = optax.adamw(bench.LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=bench.WD)

  if config == "A":

    def batch_loss(params, toks):
      logits = model.apply({"params": params}, toks[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

    def step(params, opt_state, toks):
      loss, g = jax.value_and_grad(batch_loss)(params, toks)
      upd, opt_state = adamw.update(g, opt_state, params)
      return optax.apply_updates(params, upd), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), params, adamw.init(params), tokens

  def loss_one(params, toks1):  # one sequence [T + 1]
    logits = model.apply({"params": params}, toks1[None, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, toks1[None, 1:]).mean()

  grad_fn = dpjax.clipped_grad(
    loss_one,
    l2_clip_norm=bench.CLIP,
    microbatch_size=getattr(a, "microbatch", None) if config in ("H", "I") else None,
    method="ghost" if config == "I" else "vmap",
  )
  tx = optax.chain(
    dpjax.mechanisms.gaussian(bench.NOISE_MULT, bench.CLIP, k_noise),
    dpjax.normalize(float(B)),
    adamw,
  )

  def step(params, opt_state, toks):
    g, aux = grad_fn(params, toks)
    upd, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, jnp.mean(aux.loss)

  return jax.jit(step, donate_argnums=(0, 1)), params, tx.init(params), tokens


def run(a, bench):
  import flax
  import jax
  import optax

  import dpjax

  jstep, params, opt_state, tokens = build(a, bench)
  carry = [params, opt_state]

  def one():
    p, s, loss = jstep(carry[0], carry[1], tokens)
    carry[:] = [p, s]
    return p, s, loss

  first, times, (_, _, loss) = bench.time_steps(one, jax.block_until_ready, a.warmup, a.steps)
  dev = jax.devices()[0]
  peak = bench.jax_peak_bytes(dev)
  extra = dict(
    framework="jax",
    jax=jax.__version__,
    flax=flax.__version__,
    optax=optax.__version__,
    dpjax=dpjax.__version__,
    device=str(dev.device_kind),
    backend=jax.default_backend(),
    first_step_s=round(first, 3),
    final_loss=float(loss),
    n_params=int(sum(x.size for x in jax.tree.leaves(params))),
  )
  return times, peak, extra


def main():
  a = parse()
  bench = _bench(a.bench_dir)
  bench.emit(a, a.config, NAMES[a.config], True, lambda: run(a, bench))


def check(bench_dir) -> int:
  """CPU, tiny shapes: G, H and I equal a per-example loop on the harness's own model."""
  import jax
  import jax.numpy as jnp
  import optax

  import dpjax

  bench = _bench(bench_dir)
  clip = 0.05  # below every per-example norm: clipping binds
  a = argparse.Namespace(vocab=97, d=32, heads=4, layers=2, npos=64, seq=12, batch=6, untied=False)
  model = bench.jax_gpt(a)
  toks = jax.random.randint(jax.random.key(3), (a.batch, a.seq + 1), 0, a.vocab)
  params = model.init(jax.random.key(0), toks[:1, : a.seq])["params"]

  def loss_one(p, t1):
    logits = model.apply({"params": p}, t1[None, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, t1[None, 1:]).mean()

  ref, norms = None, []
  for i in range(a.batch):
    g = jax.grad(loss_one)(params, toks[i])
    n = optax.global_norm(g)
    norms.append(float(n))
    g = jax.tree.map(lambda x: x * jnp.minimum(1.0, clip / n), g)
    ref = g if ref is None else jax.tree.map(jnp.add, ref, g)
  top = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ref))
  ok = min(norms) > clip
  ghost = {"method": "ghost"}
  for config, kw in (
    ("G", {}),
    ("H", {"microbatch_size": 4}),
    ("I", ghost),
    ("I", {**ghost, "microbatch_size": 4}),
  ):
    got, _ = jax.jit(dpjax.clipped_grad(loss_one, l2_clip_norm=clip, **kw))(params, toks)
    diff = max(
      float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ref))
    )
    ok &= diff < 1e-5 * max(1.0, top)
    mb = f", microbatch {kw['microbatch_size']}" if "microbatch_size" in kw else ""
    print(f"{config} {NAMES[config]}{mb}: max|diff| vs loop {diff:.2e} (max|ref| {top:.3f})")
  print("ALL OK" if ok else "MISMATCH")
  return 0 if ok else 1


if __name__ == "__main__":
  if sys.argv[1:2] == ["--check"]:
    bench_dir = (
      sys.argv[2]
      if len(sys.argv) > 2
      else os.environ.get("DPJAX_BENCH_PEERS", os.path.join(HERE, "bench_peers"))
    )
    sys.exit(check(bench_dir))
  main()
