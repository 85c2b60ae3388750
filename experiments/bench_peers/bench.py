"""Anchor benchmark: DP-SGD vs non-private training step on a GPT-2-small-shaped LM.

One configuration per process (so peak GPU memory is clean). Prints one JSON line
on stdout (prefixed by nothing) and, if --out is given, appends it to that file.

Configurations:
  A  jax_nonprivate      flax.linen GPT-2, jax.value_and_grad + optax.adamw
  B  jax_jaxprivacy      jax_privacy.clipping.clipped_grad (vmap per-example clip)
                         + gaussian_privatizer noise + adamw  (--microbatch N optional)
  C  jax_handvmap        jax.vmap(jax.grad(loss)) + per-example global-norm clip + sum
                         + Gaussian noise + adamw
  D  torch_nonprivate    plain torch GPT-2, AdamW
  E  opacus_hooks        Opacus PrivacyEngine.make_private(grad_sample_mode="hooks")
  F  opacus_ghost        Opacus PrivacyEngine.make_private(grad_sample_mode="ghost")
                         (Opacus ghost clipping rejects tied parameters: use --untied)

Usage: python bench.py CONFIG --batch 32 --seq 128 [--layers 12 --d 768 --heads 12
       --vocab 50257] [--steps 20 --warmup 3] [--microbatch N] [--untied] [--out F]
"""

import argparse
import json
import platform
import statistics
import sys
import time
import traceback

CLIP = 1.0
NOISE_MULT = 1.0
LR = 1e-4
WD = 0.01


def time_steps(step, sync, warmup, steps):
  """Times `step()` (one training step; `sync(out)` waits for its result).

  Returns (seconds of the first step, incl. compilation; the seconds of each of
  `steps` timed steps, run after `warmup - 1` more untimed ones; the last output).
  """
  t0 = time.perf_counter()
  out = step()
  sync(out)
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    out = step()
  sync(out)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    out = step()
    sync(out)
    times.append(time.perf_counter() - t0)
  return first, times, out


def jax_peak_bytes(dev):
  """The device's peak bytes in use, or None (the CPU backend may have no stats)."""
  try:
    return (dev.memory_stats() or {}).get("peak_bytes_in_use")
  except Exception:
    return None


def emit(a, config, name, tied, run):
  """Runs `run() -> (times, peak_bytes, extra)` and prints (and appends to a.out) its record.

  The record is one JSON line: the shape, the timing summary (median, min, max,
  tokens per second), peak memory and `extra`; a failure (OOM, unsupported
  configuration) is recorded as data with status "error".
  """
  rec = dict(
    config=config,
    name=name,
    batch=a.batch,
    seq=a.seq,
    layers=a.layers,
    d=a.d,
    heads=a.heads,
    vocab=a.vocab,
    microbatch=a.microbatch,
    tied=tied,
    tag=a.tag,
    python=platform.python_version(),
  )
  try:
    times, peak, extra = run()
    med = statistics.median(times)
    rec.update(
      status="ok",
      step_ms=round(med * 1e3, 3),
      step_ms_min=round(min(times) * 1e3, 3),
      step_ms_max=round(max(times) * 1e3, 3),
      n_timed=len(times),
      tokens_per_s=round(a.batch * a.seq / med, 1),
      peak_gb=None if peak is None else round(peak / 1e9, 3),
      **extra,
    )
  except Exception as e:  # record failures as data (e.g. OOM, unsupported)
    rec.update(status="error", error=f"{type(e).__name__}: {str(e)[:800]}")
    traceback.print_exc(file=sys.stderr)
  line = json.dumps(rec)
  print(line, flush=True)
  if a.out:
    with open(a.out, "a") as f:
      f.write(line + "\n")


def parse():
  p = argparse.ArgumentParser()
  p.add_argument("config", choices=["A", "B", "C", "D", "E", "F"])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--d", type=int, default=768)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--vocab", type=int, default=50257)
  p.add_argument("--npos", type=int, default=1024)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--microbatch", type=int, default=None)
  p.add_argument("--untied", action="store_true")
  p.add_argument(
    "--tf32",
    type=int,
    default=1,
    help="torch: 1 -> set_float32_matmul_precision('high') (TF32),"
    " 0 -> 'highest'. JAX is left at its default precision.",
  )
  p.add_argument("--out", default=None)
  p.add_argument("--tag", default="")
  return p.parse_args()


NAMES = {
  "A": "jax_nonprivate",
  "B": "jax_jaxprivacy_clipped_grad",
  "C": "jax_hand_vmap_grad",
  "D": "torch_nonprivate",
  "E": "opacus_hooks",
  "F": "opacus_ghost",
}


# --------------------------------------------------------------------------- JAX


def jax_gpt(a):
  """flax.linen GPT-2 (tied wte, learned wpe, pre-LN, GELU MLP, causal SDPA)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  V, D, H, L = a.vocab, a.d, a.heads, a.layers

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      b, t, d = x.shape
      init = nn.initializers.normal(0.02)
      h = nn.LayerNorm(epsilon=1e-5)(x)
      qkv = nn.Dense(3 * d, kernel_init=init)(h)
      q, k, v = jnp.split(qkv, 3, axis=-1)
      q, k, v = (z.reshape(b, t, H, d // H) for z in (q, k, v))
      att = jax.nn.dot_product_attention(q, k, v, is_causal=True)
      x = x + nn.Dense(d, kernel_init=init)(att.reshape(b, t, d))
      h = nn.LayerNorm(epsilon=1e-5)(x)
      h = nn.Dense(4 * d, kernel_init=init)(h)
      h = nn.gelu(h, approximate=True)
      return x + nn.Dense(d, kernel_init=init)(h)

  class GPT(nn.Module):
    @nn.compact
    def __call__(self, idx):
      b, t = idx.shape
      wte = nn.Embed(V, D, embedding_init=nn.initializers.normal(0.02), name="wte")
      wpe = nn.Embed(a.npos, D, embedding_init=nn.initializers.normal(0.02), name="wpe")
      x = wte(idx) + wpe(jnp.arange(t))[None]
      for i in range(L):
        x = Block(name=f"h{i}")(x)
      x = nn.LayerNorm(epsilon=1e-5, name="ln_f")(x)
      return wte.attend(x)  # tied output projection

  return GPT()


def run_jax(a):
  import flax
  import jax
  import jax.numpy as jnp
  import optax

  V, D, H, L, T, B = a.vocab, a.d, a.heads, a.layers, a.seq, a.batch
  assert not a.untied, "JAX model is tied only"
  model = jax_gpt(a)
  key = jax.random.key(0)
  k_init, k_data, k_noise = jax.random.split(key, 3)
  tokens = jax.random.randint(k_data, (B, T + 1), 0, V, dtype=jnp.int32)
  params = model.init(k_init, tokens[:1, :T])["params"]
  n_params = sum(x.size for x in jax.tree.leaves(params))

  def loss_fn(params, toks):
    logits = model.apply({"params": params}, toks[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

  opt = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD)
  opt_state = opt.init(params)
  extra = {}

  if a.config == "A":

    def step(params, opt_state, toks, key):
      loss, g = jax.value_and_grad(loss_fn)(params, toks)
      upd, opt_state = opt.update(g, opt_state, params)
      return optax.apply_updates(params, upd), opt_state, loss, key

    state = (params, opt_state)

  elif a.config == "B":
    import jax_privacy
    from jax_privacy import clipping, noise_addition

    extra["jax_privacy_version"] = jax_privacy.__version__
    cg = clipping.clipped_grad(
      loss_fn,
      argnums=0,
      l2_clip_norm=CLIP,
      batch_argnums=1,
      keep_batch_dim=True,
      return_values=True,
      microbatch_size=a.microbatch,
    )
    privatizer = noise_addition.gaussian_privatizer(
      stddev=NOISE_MULT * cg.sensitivity(), prng_key=k_noise
    )
    noise_state = privatizer.init(params)

    def step(params, states, toks, key):
      opt_state, noise_state = states
      g, aux = cg(params, toks)
      g, noise_state = privatizer.update(g, noise_state)
      g = jax.tree.map(lambda x: x / B, g)
      upd, opt_state = opt.update(g, opt_state, params)
      return (optax.apply_updates(params, upd), (opt_state, noise_state), aux.values.mean(), key)

    state = (params, (opt_state, noise_state))

  elif a.config == "C":

    def loss_one(params, toks1):
      return loss_fn(params, toks1[None])

    def step(params, opt_state, toks, key):
      losses, g = jax.vmap(jax.value_and_grad(loss_one), in_axes=(None, 0))(params, toks)
      leaves = jax.tree.leaves(g)
      sq = sum(jnp.sum(jnp.square(x).reshape(B, -1), axis=1) for x in leaves)
      scale = jnp.minimum(1.0, CLIP / (jnp.sqrt(sq) + 1e-6))
      summed = jax.tree.map(lambda x: jnp.tensordot(scale, x, axes=1), g)
      key, sub = jax.random.split(key)
      keys = jax.random.split(sub, len(leaves))
      tdef = jax.tree.structure(summed)
      noisy = jax.tree.unflatten(
        tdef,
        [
          (x + NOISE_MULT * CLIP * jax.random.normal(k, x.shape, x.dtype)) / B
          for x, k in zip(jax.tree.leaves(summed), keys)
        ],
      )
      upd, opt_state = opt.update(noisy, opt_state, params)
      return optax.apply_updates(params, upd), opt_state, losses.mean(), key

    state = (params, opt_state)

  jstep = jax.jit(step, donate_argnums=(0, 1))
  dev = jax.devices()[0]
  carry = [*state, jax.random.key(1)]  # loop key (B's noise key lives in its privatizer state)

  def one():
    p, s, loss, k = jstep(carry[0], carry[1], tokens, carry[2])
    carry[:] = [p, s, k]
    return p, s, loss

  first, times, (_, _, loss) = time_steps(one, jax.block_until_ready, a.warmup, a.steps)
  peak = jax_peak_bytes(dev)
  extra.update(
    framework="jax",
    jax=jax.__version__,
    flax=flax.__version__,
    optax=optax.__version__,
    device=str(dev.device_kind),
    backend=jax.default_backend(),
    first_step_s=round(first, 3),
    final_loss=float(loss),
    n_params=int(n_params),
  )
  return times, peak, extra


# ------------------------------------------------------------------------- Torch


def torch_gpt(a, tied=True):
  """Plain-torch GPT-2 matching jax_gpt."""
  import torch
  import torch.nn as tnn
  import torch.nn.functional as F

  V, D, H, L = a.vocab, a.d, a.heads, a.layers

  class Block(tnn.Module):
    def __init__(self):
      super().__init__()
      self.ln1 = tnn.LayerNorm(D, eps=1e-5)
      self.c_attn = tnn.Linear(D, 3 * D)
      self.c_proj = tnn.Linear(D, D)
      self.ln2 = tnn.LayerNorm(D, eps=1e-5)
      self.c_fc = tnn.Linear(D, 4 * D)
      self.mlp_proj = tnn.Linear(4 * D, D)

    def forward(self, x):
      b, t, d = x.shape
      q, k, v = self.c_attn(self.ln1(x)).split(d, dim=-1)
      q, k, v = (z.view(b, t, H, d // H).transpose(1, 2) for z in (q, k, v))
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, d))
      h = F.gelu(self.c_fc(self.ln2(x)), approximate="tanh")
      return x + self.mlp_proj(h)

  class GPT(tnn.Module):
    def __init__(self, tied):
      super().__init__()
      self.wte = tnn.Embedding(V, D)
      self.wpe = tnn.Embedding(a.npos, D)
      self.h = tnn.ModuleList([Block() for _ in range(L)])
      self.ln_f = tnn.LayerNorm(D, eps=1e-5)
      self.lm_head = tnn.Linear(D, V, bias=False)
      if tied:
        self.lm_head.weight = self.wte.weight
      for m in self.modules():
        if isinstance(m, (tnn.Linear, tnn.Embedding)):
          tnn.init.normal_(m.weight, std=0.02)
          if isinstance(m, tnn.Linear) and m.bias is not None:
            tnn.init.zeros_(m.bias)

    def forward(self, idx):
      b, t = idx.shape
      # positions carry the batch dim so Opacus can form per-sample grads of wpe
      pos = torch.arange(t, device=idx.device).unsqueeze(0).repeat(b, 1)
      x = self.wte(idx) + self.wpe(pos)
      for blk in self.h:
        x = blk(x)
      return self.lm_head(self.ln_f(x))

  return GPT(tied)


def run_torch(a):
  import torch
  import torch.nn as tnn
  import torch.nn.functional as F

  V, D, H, L, T, B = a.vocab, a.d, a.heads, a.layers, a.seq, a.batch
  cuda = torch.cuda.is_available()
  dev = torch.device("cuda" if cuda else "cpu")
  torch.set_float32_matmul_precision("high" if a.tf32 else "highest")
  torch.manual_seed(0)

  model = torch_gpt(a, tied=not a.untied).to(dev)
  n_params = sum(p.numel() for p in model.parameters())
  g = torch.Generator(device="cpu").manual_seed(0)
  tokens = torch.randint(0, V, (B, T + 1), generator=g).to(dev)
  x, y = tokens[:, :T].contiguous(), tokens[:, 1:].contiguous()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
  extra = {}

  if a.config == "D":

    def step():
      opt.zero_grad(set_to_none=True)
      logits = model(x)
      loss = F.cross_entropy(logits.view(-1, V), y.view(-1))
      loss.backward()
      opt.step()
      return loss
  else:
    import opacus
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    extra["opacus_version"] = opacus.__version__
    ds = TensorDataset(torch.zeros(B * 100, T + 1, dtype=torch.long))
    dl = DataLoader(ds, batch_size=B)
    pe = PrivacyEngine()
    mode = "hooks" if a.config == "E" else "ghost"
    ret = pe.make_private(
      module=model,
      optimizer=opt,
      data_loader=dl,
      criterion=tnn.CrossEntropyLoss(),
      noise_multiplier=NOISE_MULT,
      max_grad_norm=CLIP,
      poisson_sampling=False,
      grad_sample_mode=mode,
      loss_reduction="mean",
    )
    extra["opacus_mode"] = mode
    if mode == "hooks":
      model, opt, _ = ret

      def step():
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, V), y.view(-1))
        loss.backward()
        opt.step()
        return loss
    else:
      model, opt, crit, _ = ret

      def step():
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        # shape=(B, T): Opacus reshapes the per-token loss to BxT and takes the
        # per-sequence mean, so the privacy unit is one sequence.
        loss = crit(logits.view(-1, V), y.view(-1), shape=(B, T))
        loss.backward()  # two backward passes (norms, then reweighted loss)
        opt.step()
        return loss.detach()

  model.train()
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
  first, times, loss = time_steps(step, sync, a.warmup, a.steps)
  peak = torch.cuda.max_memory_allocated() if cuda else None
  if cuda:
    extra["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    extra["device"] = torch.cuda.get_device_name()
  extra.update(
    framework="torch",
    torch=torch.__version__,
    matmul_precision=torch.get_float32_matmul_precision(),
    first_step_s=round(first, 3),
    final_loss=float(loss),
    n_params=int(n_params),
  )
  return times, peak, extra


def main():
  a = parse()
  run = (lambda: run_jax(a)) if a.config in "ABC" else (lambda: run_torch(a))
  emit(a, a.config, NAMES[a.config], not a.untied, run)


if __name__ == "__main__":
  main()
