"""DP-Flat ablation on MiniLM / Rotten-Tomatoes (prefix-tuning, CPU scale).

  python experiments/dp_flat.py [--epsilons 1 3 8] [--seeds 3] [--steps 100] [--mode full]

Rows already in experiments/results/dp_flat.jsonl (same mode, variant,
epsilon, seed, steps, batch size) are reused, so an interrupted grid resumes.

Model: `minilm`, bottom 4 layers frozen (cached features), the top 2 layers
frozen with a trainable 8-token key/value prefix each, cosine head trained.
DP-SGD: Poisson q = B/8441 (B = --batch-size, 512), clip 1, sigma by PLD,
Adam lr 0.01. --mode full trains the top 2 layers' weights instead of a
prefix (ghost clipping), Adam --layer-lr (1e-3) for them, 0.01 for the head.

Variants (each one config change on the same run):
  plain         DP-SGD
  +sam          dp_sam(rho, mode="free"): perturbation from the previous
                step's PRIVATISED gradient (post-processing, no extra cost),
                first half of training, layer-wise ||theta_k|| scaling
  +sam-charged  dp_sam(rho, mode="charged"): a fresh privatised ascent gradient
                per active step, charged by the accountant (1.5 x the releases
                at active_fraction 0.5, so more noise at the same epsilon)
  +sparse       flatness probe: loss along each layer's normalised gradient
                direction, both computed on PUBLIC data; the sharper layer's
                prefix is removed (not zeroed)
  +wd           weight distillation lam * ||P - P_ref||_F in each example's
                loss, P_ref = prefix + head trained without noise on PUBLIC data
  all           the three together
  non-private   plain fine-tuning without DP (reference)
PUBLIC data here = the rt-polarity dev split (1,069 sentences), declared
public and never used by the private runs otherwise; it is disjoint from the
private training split and from the test split reported.
Sharpness (on 512 training examples, at the final parameters): the largest
loss increase over 8 directions (the normalised gradient and 7 random ones)
at radius 0.05 ||theta|| (prefix mode) or 1e-3 ||theta_k|| per tensor (full
mode; see SHARPNESS), and the top Hessian eigenvalue by power iteration of
Hessian-vector products (at most 20, stopped once 3 estimates agree to 1e-4).
Results are appended to experiments/results/dp_flat.jsonl.
"""

import argparse
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import report as report_lib  # experiments/report.py, beside this script
import rows as rows_lib  # experiments/rows.py, beside this script

from dpjax.methods import flatness
from dpjax.tasks import build_task
from dpjax.training.config import CONFIG_DIR, load_config
from dpjax.training.loop import train

HERE = os.path.dirname(os.path.abspath(__file__))

VARIANTS = ("plain", "+sam", "+sam-charged", "+sparse", "+wd", "all", "non-private")


# Sharpness radius per mode: (rho_s, per tensor?). Prefix mode moves the whole
# trained tree by 0.05 ||theta||. In full mode that radius saturates (the loss
# rises by ~10 nats along the gradient at any rho_s >= 0.005, global or per
# tensor), so full mode moves each tensor by 1e-3 ||theta_k||, the scaling of
# DP-Flat's own min-max step (+2.4 nats along the gradient after 40 private
# steps, +0.13 at the pretrained weights).
SHARPNESS = {"prefix": (0.05, False), "full": (1e-3, True)}


def base_config(steps, prefix_layers=None, mode="prefix", batch_size=512, layer_lr=1e-3):
  """configs/dp_flat/<mode>.py with this grid's steps, batch size and layer rate."""
  cfg = load_config(os.path.join(CONFIG_DIR, "dp_flat", f"{mode}.py"))
  if mode == "prefix":
    cfg.task.prefix_layers = prefix_layers
  else:
    cfg.learning_rates = {"layer_": layer_lr}  # the head keeps Adam 0.01
  cfg.batch_size = batch_size
  cfg.steps = cfg.log_every = cfg.checkpoint_every = steps
  return cfg


class _MeanLoss:
  """Mean loss over (the first n examples of) a split, with its gradient and
  Hessian-vector product, each one jitted function summed over chunks of
  `chunk` examples. The data are jit ARGUMENTS: closing over them would make
  XLA constant-fold ~80 MB of features."""

  def __init__(self, task, split, n=None, chunk=128):
    data = task.splits[split] if split != "train" else task.train
    idx = np.arange(len(data["label"]))[:n]
    self.n = len(idx)
    self.chunks = [
      jax.tree.map(lambda x: jnp.asarray(x[idx[i : i + chunk]]), data)
      for i in range(0, self.n, chunk)
    ]
    self.frozen = task.frozen

    def total(params, batch, frozen):
      loss, _ = jax.vmap(task.loss_fn, in_axes=(None, 0, None))(params, batch, frozen)
      return jnp.sum(loss)

    self._loss = jax.jit(total)
    self._grad = jax.jit(jax.grad(total))
    self._hvp = jax.jit(
      lambda p, v, b, f: jax.jvp(lambda q: jax.grad(total)(q, b, f), (p,), (v,))[1]
    )

  def _mean(self, fn, *args):
    parts = [fn(*args, b, self.frozen) for b in self.chunks]
    return jax.tree.map(lambda *xs: sum(xs) / self.n, *parts)

  def __call__(self, params):
    return self._mean(self._loss, params)

  def grad(self, params):
    return self._mean(self._grad, params)

  def hvp(self, params, v):
    return self._mean(self._hvp, params, v)


def public_reference(cfg, seed):
  """Prefix + head trained WITHOUT noise on the public (dev) split."""
  c = ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)
  c.private = False
  c.seed = seed
  task = build_task(c)
  pub = task._replace(train=task.splits["dev"])
  c.batch_size = 128
  return train(c, pub, None, progress=False).params


def sparse_mask(cfg, seed):
  """Which of the prefixed layers keep their prefix: the flatter one, probed on public data."""
  c = ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)
  c.seed = seed
  task = build_task(c)
  loss = _MeanLoss(task, "dev")
  direction = loss.grad(task.params)
  layers = sorted(task.params["prefix"])
  groups = [(lambda name, l=l: name.startswith(f"prefix/{l}/")) for l in layers]
  curves = flatness.flatness_probe(
    loss, task.params, direction, groups, alphas=[0.0, 0.5, 1.0, 2.0]
  )
  return flatness.select_layers(curves, keep=len(layers) - 1), curves.tolist()


def sharpness(task, params, rho_s=0.05, seed=0, layerwise=False):
  """Max loss increase over 8 directions at radius rho_s (x ||theta||, or per
  tensor x ||theta_k|| when layerwise) and the top Hessian eigenvalue."""
  loss = _MeanLoss(task, "train", 512)
  l0 = float(loss(params))
  g = loss.grad(params)
  dirs = [g] + [
    jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape), params)
    for k in jax.random.split(jax.random.PRNGKey(seed), 7)
  ]
  radius = rho_s if layerwise else rho_s * optax.global_norm(params)
  step = lambda d: flatness.perturbation(params, d, radius, layerwise=layerwise)
  worst = max(float(loss(jax.tree.map(jnp.add, params, step(d)))) - l0 for d in dirs)
  v, lam, lams = dirs[1], 0.0, []
  for _ in range(20):  # power iteration; stops once 3 estimates agree to 1e-4
    n = float(optax.global_norm(v))
    v = jax.tree.map(lambda x: x / n, v)
    hv = loss.hvp(params, v)
    lam = float(sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(hv))))
    lams.append(lam)
    if len(lams) >= 3 and max(abs(x - lam) for x in lams[-3:]) <= 1e-4 * abs(lam):
      break
    v = hv
  return {"loss": l0, "max_increase": worst, "top_eigenvalue": lam, "power_iterations": len(lams)}


def run_variant(variant, eps, seed, steps, rho, lam, mode="prefix", batch_size=512, layer_lr=1e-3):
  mask, curves = (None, None)
  if variant in ("+sparse", "all") and mode == "prefix":
    mask, curves = sparse_mask(base_config(steps, batch_size=batch_size), seed)
  cfg = base_config(steps, mask, mode, batch_size, layer_lr)
  cfg.seed = seed
  cfg.target_epsilon = eps
  if variant == "non-private":
    cfg.private = False
  if variant in ("+sam", "all"):
    cfg.dp_sam = dict(rho=rho, mode="free", active_fraction=0.5)
  if variant == "+sam-charged":
    cfg.dp_sam = dict(rho=rho, mode="charged", active_fraction=0.5)
  task = build_task(cfg)
  if variant in ("+wd", "all"):
    ref = public_reference(cfg, seed)
    task = task._replace(loss_fn=flatness.weight_anchor(task.loss_fn, ref, lam))
  res = train(cfg, task, None, progress=False)
  plain_task = build_task(cfg)  # sharpness of the task loss itself (no regulariser)
  return {
    "variant": variant,
    "mode": mode,
    "epsilon_target": eps,
    "seed": seed,
    "steps": steps,
    "epsilon": res.final_metrics["epsilon"],
    "prefix_layers": mask,
    "probe": curves,
    "test_accuracy": res.final_metrics["test_accuracy"],
    "sharpness_radius": _radius(mode),
    **sharpness(
      plain_task, res.params, SHARPNESS[mode][0], seed=seed, layerwise=SHARPNESS[mode][1]
    ),
  }


def spec_of(r):
  """The settings that identify a row (non-private runs have no epsilon target)."""
  return {
    "mode": r.get("mode", "prefix"),
    "variant": r["variant"],
    "seed": r["seed"],
    "steps": r["steps"],
    "batch_size": r["batch_size"],
    "layer_lr": r.get("layer_lr"),
    "epsilon_target": None if r["variant"] == "non-private" else r["epsilon_target"],
  }


def _radius(mode):
  rho_s, per_tensor = SHARPNESS[mode]
  return f"{rho_s:g} x " + ("||theta_k|| per tensor" if per_tensor else "||theta||")


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--first-seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
  p.add_argument("--batch-size", type=int, default=512, help="expected batch (Poisson)")
  p.add_argument("--rho", type=float, default=0.05, help="dp_sam radius (x ||theta_k||)")
  p.add_argument("--lam", type=float, default=0.01, help="weight distillation weight")
  p.add_argument(
    "--mode",
    choices=("prefix", "full"),
    default="prefix",
    help="prefix-tuning of the top 2 layers, or full fine-tuning of them "
    "(ghost clipping; +sparse does not apply and is skipped)",
  )
  p.add_argument(
    "--layer-lr",
    type=float,
    default=1e-3,
    help="--mode full: Adam learning rate of the trained encoder layers (the head keeps 0.01)",
  )
  p.add_argument(
    "--report",
    action="store_true",
    help="print the tables from the rows already recorded; run nothing",
  )
  args = p.parse_args()
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  # Rows already recorded are reused, not re-run; one measured at another radius is superseded.
  done = rows_lib.dedupe(
    [
      r
      for r in rows_lib.load("dp_flat")
      if r.get("sharpness_radius", _radius("prefix")) == _radius(r.get("mode", "prefix"))
    ],
    spec_of,
  )
  for eps in args.epsilons:
    for variant in args.variants:
      if variant == "non-private" and eps != args.epsilons[0]:
        continue
      if variant == "+sparse" and args.mode == "full":
        continue
      for seed in range(args.first_seed, args.first_seed + args.seeds):
        old = rows_lib.find(
          done,
          spec_of(
            {
              "mode": args.mode,
              "variant": variant,
              "epsilon_target": eps,
              "seed": seed,
              "steps": args.steps,
              "batch_size": args.batch_size,
              "layer_lr": args.layer_lr if args.mode == "full" else None,
            }
          ),
        )
        if old is not None:
          continue
        if args.report:
          continue
        r = run_variant(
          variant,
          eps,
          seed,
          args.steps,
          args.rho,
          args.lam,
          args.mode,
          args.batch_size,
          args.layer_lr,
        )
        r["batch_size"] = args.batch_size
        if args.mode == "full":
          r["layer_lr"] = args.layer_lr
        rows_lib.append("dp_flat", [r])
        print(
          f"eps={eps:g} {variant} seed={seed}: test {100 * r['test_accuracy']:.2f}% "
          f"(eps {r['epsilon']:.3f}) sharpness: max increase {r['max_increase']:.4f}, "
          f"top eig {r['top_eigenvalue']:.3f}, prefix {r['prefix_layers']}",
          flush=True,
        )
  for e in args.epsilons:  # the tables, rendered from the recorded rows as in RESULTS.md
    print(f"\neps = {e:g}\n")
    print(
      report_lib.dp_flat(
        epsilon=str(e),
        mode=args.mode,
        steps=str(args.steps),
        batch_size=str(args.batch_size),
        layer_lr=str(args.layer_lr) if args.mode == "full" else "",
      )
    )


if __name__ == "__main__":
  main()
