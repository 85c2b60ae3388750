"""The Opacus peer of experiments/utility.py's rt-top2 task: the same setting, Opacus's own stack.

  pip install "opacus==1.6.*"        # torch and transformers come with dpjax's [test] extra
  python experiments/opacus_rt.py [--epsilon 3] [--seeds 0 1 2] [--clip 1.0]

The `minilm` asset in transformers' torch `BertModel` (dropout off, as in
dpjax); its bottom 4 layers run once (frozen, no grad) and the top 2 layers
plus a cosine head (mean pooling, unit norm, x 3, linear 384 -> 2 drawn from
N(0, 0.02^2)) are trained with Opacus 1.6: `PrivacyEngine(accountant="prv")`,
`make_private(poisson_sampling=True, grad_sample_mode="hooks")`, sigma from
Opacus's `get_noise_multiplier` for the target at q = 256 / 8441 and 40
steps, clip `--clip` (the clip dpjax's tuning chose), Adam 1e-3 for the
layers and 0.01 for the head, mean over the expected batch. Data, tokenizer
and splits are dpjax's (`dpjax.data.text`). Reported: Opacus's epsilon, and
dpjax's PLD epsilon of the same sigma, q and steps. Rows are appended to
experiments/results/opacus_rt.jsonl (a recorded seed is skipped).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import rows as rows_lib  # experiments/rows.py, beside this script

from dpjax.core.accounting import accountants, events
from dpjax.data.text import encode, load_rt_polarity, load_tokenizer
from dpjax.tasks.pretrained import resolve

NAME = "opacus_rt"
STEPS, BATCH, MAX_LENGTH, FROZEN = 40, 256, 48, 4
METHOD = "opacus 1.6 (hooks, PRV)"


def spec_of(r):
  """The settings that identify a row."""
  return {k: r[k] for k in ("task", "method", "epsilon_target", "seed", "clip")}


def additive_mask(torch, mask, dtype):
  """[B, T] 0/1 -> the [B, 1, 1, T] additive mask of eager attention."""
  return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def features(torch, model, enc):
  """Hidden states entering layer FROZEN, and the attention masks, for one split."""
  ids = torch.as_tensor(enc["input_ids"], dtype=torch.long)
  mask = torch.as_tensor(enc["attention_mask"], dtype=torch.long)
  out = []
  with torch.no_grad():
    for i in range(0, len(ids), 256):
      m = mask[i : i + 256]
      h = model.embeddings(input_ids=ids[i : i + 256])
      for layer in model.encoder.layer[:FROZEN]:
        h = layer(h, additive_mask(torch, m, h.dtype))
      out.append(h)
  return torch.cat(out), mask


def check_split_forward(torch, model, enc):
  """The bottom-then-top route must reproduce BertModel's own forward (a few sentences)."""
  ids = torch.as_tensor(enc["input_ids"][:8], dtype=torch.long)
  mask = torch.as_tensor(enc["attention_mask"][:8], dtype=torch.long)
  with torch.no_grad():
    want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    h = model.embeddings(input_ids=ids)
    for layer in model.encoder.layer:
      h = layer(h, additive_mask(torch, mask, h.dtype))
  err = float(((h - want) * mask[..., None]).abs().max())
  if err > 1e-4:
    raise AssertionError(f"layer-by-layer forward differs from BertModel by {err}")


def build(torch, bert, seed):
  """The trained part: the top layers and the cosine head."""

  class Top(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.layers = torch.nn.ModuleList(copy.deepcopy(bert.encoder.layer[FROZEN:]))
      self.head = torch.nn.Linear(bert.config.hidden_size, 2)
      g = torch.Generator().manual_seed(seed)
      with torch.no_grad():
        self.head.weight.copy_(0.02 * torch.randn(self.head.weight.shape, generator=g))
        self.head.bias.zero_()

    def forward(self, h, mask):
      ext = additive_mask(torch, mask, h.dtype)
      for layer in self.layers:
        h = layer(h, ext)
      m = mask[..., None].to(h.dtype)
      pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
      pooled = 3.0 * pooled / torch.sqrt((pooled * pooled).sum(-1, keepdim=True) + 1e-12)
      return self.head(pooled)

  return Top()


def run_seed(torch, opacus, splits, bert, eps, seed, clip, steps=STEPS):
  """One Opacus training run; its row."""
  from opacus.accountants.utils import get_noise_multiplier

  torch.manual_seed(seed)
  h, mask, y = splits["train"]
  q = BATCH / len(y)
  sigma = get_noise_multiplier(
    target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps, accountant="prv"
  )
  model = build(torch, bert, seed)
  opt = torch.optim.Adam(
    [
      {"params": model.layers.parameters(), "lr": 1e-3},
      {"params": model.head.parameters(), "lr": 0.01},
    ]
  )
  loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(h, mask, y),
    batch_size=BATCH,
    generator=torch.Generator().manual_seed(seed),
  )
  engine = opacus.PrivacyEngine(accountant="prv")
  model, opt, loader = engine.make_private(
    module=model,
    optimizer=opt,
    data_loader=loader,
    noise_multiplier=sigma,
    max_grad_norm=clip,
    poisson_sampling=True,
    grad_sample_mode="hooks",
  )
  t0 = time.time()
  step = 0
  model.train()
  while step < steps:
    for hb, mb, yb in loader:
      if step == steps:
        break
      opt.zero_grad()
      loss = torch.nn.functional.cross_entropy(model(hb, mb), yb)
      loss.backward()
      opt.step()
      step += 1
  model.eval()
  acc = {}
  with torch.no_grad():
    for split in ("dev", "test"):
      hs, ms, ys = splits[split]
      pred = torch.cat(
        [model(hs[i : i + 256], ms[i : i + 256]).argmax(-1) for i in range(0, len(ys), 256)]
      )
      acc[split] = float((pred == ys).float().mean())
  pld = accountants.epsilon(events.dpsgd_event(sigma, q, steps), 1e-5, "pld")
  return {
    "task": "rt-top2",
    "method": METHOD,
    "epsilon_target": eps,
    "seed": seed,
    "clip": clip,
    "steps": steps,
    "batch_size": BATCH,
    "noise_multiplier": sigma,
    "epsilon": engine.get_epsilon(1e-5),
    "pld_epsilon": pld,
    "test_accuracy": acc["test"],
    "dev_accuracy": acc["dev"],
    "wall_s": time.time() - t0,
  }


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--epsilon", type=float, default=3.0)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--clip", type=float, default=1.0)
  p.add_argument(
    "--check", action="store_true", help="2 steps on 512 examples, nothing recorded (a smoke test)"
  )
  args = p.parse_args(argv)
  try:
    import opacus
    import torch
    from transformers import BertModel
  except ImportError as e:
    sys.exit(f"opacus_rt.py needs torch, transformers and opacus ({e}); see the docstring")
  torch.set_num_threads(2)
  index = rows_lib.dedupe(rows_lib.load(NAME), spec_of)
  todo = [
    s
    for s in args.seeds
    if rows_lib.find(
      index,
      {
        "task": "rt-top2",
        "method": METHOD,
        "epsilon_target": args.epsilon,
        "seed": s,
        "clip": args.clip,
      },
    )
    is None
  ]
  if args.check:
    todo = args.seeds[:1]
  if not todo:
    print("every seed is recorded")
    return 0
  model_dir = resolve("minilm")
  bert = BertModel.from_pretrained(
    model_dir,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    add_pooling_layer=False,
    attn_implementation="eager",
  )
  bert.eval()
  tok = load_tokenizer(model_dir)
  data = load_rt_polarity()
  splits = {}
  for split in ("train", "dev", "test"):
    sentences = data[split]["sentence"][: 512 if args.check else None]
    labels = data[split]["label"][: 512 if args.check else None]
    enc = encode(tok, sentences, MAX_LENGTH)
    if split == "train":
      check_split_forward(torch, bert, enc)
    h, mask = features(torch, bert, enc)
    splits[split] = (h, mask, torch.as_tensor(np.asarray(labels), dtype=torch.long))
  for seed in todo:
    r = run_seed(
      torch, opacus, splits, bert, args.epsilon, seed, args.clip, 2 if args.check else STEPS
    )
    if not args.check:
      rows_lib.append(NAME, [r])
    print(
      f"seed {seed}: test {100 * r['test_accuracy']:.2f}% dev {100 * r['dev_accuracy']:.2f}% "
      f"sigma {r['noise_multiplier']:.3f} eps {r['epsilon']:.3f} (PLD {r['pld_epsilon']:.3f}) "
      f"{r['wall_s']:.0f} s",
      flush=True,
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
