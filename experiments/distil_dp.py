"""DistilDP vs baselines on Shakespeare (CPU scale), per-example DP at eps in {2, 8}.

  python experiments/distil_dp.py [--epsilons 2 8] [--seed 0]

Rows (all students: the 1-layer byte decoder initialised from the first
layer of the PUBLIC pretrained 2-layer decoder; data: speeches prefixed by
their genre; test: 1,024 speeches of held-out characters):
  teacher       2-layer decoder DP-fine-tuned (the DistilDP teacher)
  DistilDP      student trained on the teacher's synthetic text only
                (0.6 CE + 0.4 KL); budget: teacher + DP genre histogram
  direct DP     student DP-fine-tuned on the private speeches, same eps
  DPKD          teacher and student both under DP on the private data
                (student loss 0.6 CE + 0.4 KL to the DP teacher), one
                sigma for both so that their composition meets eps
  non-private   student fine-tuned on the private speeches without DP
Epsilon: PLD upper bounds per example (add/remove), delta 1e-5.
Results are appended to experiments/results/distil_dp.jsonl.
"""

import argparse
import dataclasses
import math
import os
import shutil
import tempfile

import jax.numpy as jnp
import ml_collections
import rows as rows_lib  # experiments/rows.py, beside this script

from dpjax.core import accounting
from dpjax.models.decoder import Decoder, causal_lm_loss
from dpjax.pipelines import distill
from dpjax.tasks import build_task
from dpjax.training.config import CONFIG_DIR, load_config
from dpjax.training.loop import Task, prepare, train

HERE = os.path.dirname(os.path.abspath(__file__))


def _ppl(metrics):
  return math.exp(metrics["test_nll_sum"] / metrics["test_tokens"])


def _student_private_task(task, scfg, init, teacher=None, teacher_params=None, lam=0.4):
  """The student on the PRIVATE speeches: CE, or CE + KL to a (DP) teacher (DPKD)."""
  student = Decoder(scfg)

  def loss_fn(p, ex, frozen):
    ids, mask = ex["input_ids"][None], ex["attention_mask"][None]
    logits, _ = student.apply({"params": p}, ids, mask)
    total, count = causal_lm_loss(logits, ids, mask, reduction="sum")
    metrics = {"nll_sum": total[0], "tokens": count[0]}
    if teacher is None:
      return total[0] / jnp.maximum(count[0], 1.0), metrics
    t_logits, _ = teacher.apply({"params": frozen["teacher"]}, ids, mask)
    loss, _ = distill.distillation_loss(logits, t_logits, ids, mask, lam=lam)
    return loss, metrics

  frozen = {"teacher": teacher_params} if teacher is not None else {}
  return Task("student-private", init, frozen, loss_fn, task.train, task.splits)


def run(eps, seed, workdir):
  cfg = load_config(os.path.join(CONFIG_DIR, "distil_shakespeare.py"))
  cfg.total_epsilon = eps
  cfg.teacher.seed = cfg.generation.seed = cfg.student.seed = seed
  rows = {}
  t = cfg.teacher
  task = build_task(t)
  rep = distill.run(
    cfg, os.path.join(workdir, f"distil-eps{eps:g}-s{seed}"), progress=False, task=task
  )
  rows["teacher"] = (rep["teacher_test_perplexity"], rep["budget"]["teacher"])
  rows["DistilDP"] = (rep["student_test_perplexity"], rep["budget"]["total"])

  tcfg = task.info["decoder"]
  scfg = dataclasses.replace(tcfg, **dict(cfg.student.model))
  init = distill.truncate_decoder(task.params, cfg.student.model.num_layers)

  def student_cfg(private, sigma=None, steps=None):
    c = ml_collections.ConfigDict(t.to_dict(), type_safe=False)
    c.private = private
    c.noise_multiplier = sigma
    c.target_epsilon = eps if sigma is None else None
    c.steps = steps or c.steps
    c.log_every = c.checkpoint_every = c.steps
    return c

  res = train(student_cfg(True), _student_private_task(task, scfg, init), None, progress=False)
  rows["direct DP"] = (_ppl(res.final_metrics), res.final_metrics["epsilon"])
  res = train(student_cfg(False), _student_private_task(task, scfg, init), None, progress=False)
  rows["non-private"] = (_ppl(res.final_metrics), math.inf)

  # DPKD: the same Poisson-sampled Gaussian mechanism released 2 x steps times:
  # the plan of a 2 x steps run gives the noise, the two ledgers the total.
  _, plan, _ = prepare(student_cfg(True, steps=2 * t.steps), task)
  sigma = plan.noise_multiplier
  teacher_res = train(student_cfg(True, sigma), task, None, progress=False)
  kd = _student_private_task(
    task, scfg, init, Decoder(tcfg), teacher_res.params, lam=cfg.student.lam
  )
  res = train(student_cfg(True, sigma), kd, None, progress=False)
  total = accounting.epsilon(
    accounting.compose([teacher_res.ledger.event(), res.ledger.event()]), cfg.delta, "pld"
  )
  rows["DPKD"] = (_ppl(res.final_metrics), total)
  rows["DPKD teacher"] = (_ppl(teacher_res.final_metrics), total)
  return rows, rep


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 8.0])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default=None, help="run directories (default: a temp dir)")
  args = p.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix="distil_dp-")
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  table = {}
  for eps in args.epsilons:
    rows, rep = run(eps, args.seed, workdir)
    table[eps] = rows
    rows_lib.append(
      "distil_dp",
      [
        {
          "epsilon": eps,
          "seed": args.seed,
          "rows": rows,
          "synthetic_samples": rep["synthetic_samples"],
          "generation_tokens_per_s": rep["generation_tokens_per_s"],
          "budget": rep["budget"],
        }
      ],
    )
    for name, (ppl, e) in rows.items():
      print(f"eps={eps:g} {name}: test ppl {ppl:.3f} (eps {e:.3f})", flush=True)
    print(
      f"synthetic samples {rep['synthetic_samples']}, generation "
      f"{rep['generation_tokens_per_s']:.0f} tokens/s; budget {rep['budget']}",
      flush=True,
    )
  names = list(next(iter(table.values())))
  print("\n| model | " + " | ".join(f"eps {e:g}: test ppl (eps spent)" for e in table) + " |")
  print("|---|" + "---|" * len(table))
  for n in names:
    print(
      f"| {n} | " + " | ".join(f"{table[e][n][0]:.3f} ({table[e][n][1]:.3f})" for e in table) + " |"
    )
  if not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
