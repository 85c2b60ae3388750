"""Private fine-tuning of a pretrained decoder on one's own text, with LoRA or in full.

Data (`task.data`): a `.txt` file (one example per non-empty line), a
`.jsonl` file (per line `{"text": ...}` or `{"prompt": ..., "completion":
...}`, the loss then on the completion and EOS tokens only, and an optional
`"user_id"` for user-level DP), or "shakespeare" (the asset's speeches, one
user per character). A `dev_fraction` of the examples (of the users, when
there are user ids) is held out by a seeded shuffle. LoRA (Hu et al., arXiv
2106.09685): `task.lora = {"rank", "alpha", "targets"}` trains low-rank
factors of the matching Dense layers and freezes the rest; `task.lora =
None` trains every parameter. `task.num_layers` keeps the first layers only
(a truncated model for CPU-scale runs). With LoRA the base model's weights,
never trained, are stored in `task.frozen_dtype` (bfloat16 by default: half
the memory of float32) and computed in `task.dtype`; the factors, their
optimizer state, clipping and noise are float32.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.data.shakespeare import load_shakespeare
from dpjax.models import adapters
from dpjax.models.decoder import Decoder
from dpjax.models.generate import generate, left_pad
from dpjax.tasks.pretrained import (
  PRETRAINED_DEFAULTS,
  compute_dtype,
  load_pretrained,
  remat_blocks,
)
from dpjax.training.task import Task, task_section

LORA_KEYS = ("rank", "alpha", "targets")
LORA_DEFAULTS = {"rank": 8, "alpha": None, "targets": r".*attn/(q|v)"}  # alpha None: the rank
# How the weights that are not trained (LoRA's base model) are stored on the device: bfloat16
# halves their memory; the trained parameters (the LoRA factors), their optimizer state, the
# clipping norms and the noise stay float32.
FROZEN_DTYPES = ("bfloat16", "float16", "float32")
DEFAULTS = {  # the task section's optional keys
  **PRETRAINED_DEFAULTS,
  "num_layers": None,
  "lora": None,
  "frozen_dtype": "bfloat16",
  "dev_fraction": 0.05,
  "max_eval": None,
}


def read_examples(path: str) -> List[Dict[str, Any]]:
  """The examples of a `.txt` or `.jsonl` file, checked row by row.

  Args:
    path: the file.

  Returns:
    One dict per example: "text", optionally "completion" and "user_id".
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"task.data: no such file {path!r} (a .txt or .jsonl file)")
  rows = []
  with open(path, encoding="utf-8") as f:
    if path.endswith(".txt"):
      rows = [{"text": line.rstrip("\n")} for line in f if line.strip()]
    elif path.endswith(".jsonl"):
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          r = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(r, dict):
          raise ValueError(f"{path}:{n}: expected an object, got {type(r).__name__}")
        if "text" in r:
          row = {"text": r["text"]}
        elif "prompt" in r and "completion" in r:
          row = {"text": r["prompt"], "completion": r["completion"]}
        else:
          raise ValueError(
            f"{path}:{n}: needs 'text', or 'prompt' and 'completion'; got keys {sorted(r)}"
          )
        if not all(isinstance(v, str) for v in row.values()):
          raise ValueError(f"{path}:{n}: text, prompt and completion must be strings")
        if "user_id" in r:
          row["user_id"] = str(r["user_id"])
        rows.append(row)
    else:
      raise ValueError(f"task.data must be a .txt or .jsonl file or 'shakespeare', got {path!r}")
  if not rows:
    raise ValueError(f"{path}: no examples")
  kinds = {"completion" in r for r in rows}
  if len(kinds) > 1:
    raise ValueError(f"{path}: mixes 'text' rows with 'prompt'/'completion' rows")
  users = {"user_id" in r for r in rows}
  if len(users) > 1:
    raise ValueError(f"{path}: some rows have a user_id and some do not")
  return rows


def _shakespeare_rows() -> List[Dict[str, Any]]:
  ds = load_shakespeare()
  return [{"text": r["line"], "user_id": r["user_id"]} for split in ds for r in ds[split]]


def _truncate(cfg, params, num_layers: Optional[int]):
  if num_layers is None or num_layers >= cfg.num_layers:
    return cfg, params
  if num_layers < 1:
    raise ValueError(f"task.num_layers must be >= 1 or None, got {num_layers}")
  keep = {k: v for k, v in params.items() if not k.startswith("layer_") or int(k[6:]) < num_layers}
  types = cfg.layer_types[:num_layers] if cfg.layer_types else None
  return cfg.__class__(**{**cfg.__dict__, "num_layers": num_layers, "layer_types": types}), keep


def lora_settings(t):
  """`task.lora` with its defaults (alpha: the rank), or None without LoRA.

  Args:
    t: the task section (its declared defaults filled: `task_section(t, DEFAULTS)`).

  Returns:
    {"rank", "alpha", "targets"}, or None.
  """
  if t.lora is None:
    return None
  lora = dict(t.lora)
  unknown = sorted(set(lora) - set(LORA_KEYS))
  if unknown:
    raise ValueError(f"task.lora takes {', '.join(LORA_KEYS)}; got unknown {unknown[0]!r}")
  lora = {**LORA_DEFAULTS, **lora}
  if lora["alpha"] is None:
    lora["alpha"] = lora["rank"]
  return lora


def base_model(t):
  """(Pretrained, config, params) of `task.model`, truncated to `task.num_layers`.

  Args:
    t: the task section (as a config or config.json gives it).

  Returns:
    The loaded model, its (truncated) config and parameters.
  """
  t = task_section(t, DEFAULTS)
  pre = load_pretrained(t.model)
  mcfg, params = _truncate(pre.config, pre.params, t.num_layers)
  return pre, dataclasses.replace(mcfg, dtype=compute_dtype(t)), params


def merged_params(t, params, trained):
  """The full parameters of a run: `trained` itself, or the LoRA factors merged into `params`.

  Args:
    t: the task section (as a config or config.json gives it).
    params: the base model's parameters.
    trained: the run's trained parameters (the LoRA factors with `task.lora`).

  Returns:
    The parameter tree of the fine-tuned model.
  """
  lora = lora_settings(task_section(t, DEFAULTS))
  if lora is None:
    return trained
  return adapters.merge_lora(params, trained, alpha=float(lora["alpha"]))


def check_frozen_dtype(dtype: str, name: str = "task.frozen_dtype") -> None:
  """Raises ValueError (one line naming `name`) unless `dtype` is one of `FROZEN_DTYPES`.

  Args:
    dtype: the storage dtype asked for.
    name: how the caller's user sets it.
  """
  if dtype not in FROZEN_DTYPES:
    raise ValueError(f"{name} must be one of {FROZEN_DTYPES}, got {dtype!r}")


def frozen_weights(params, dtype: str):
  """The weights that are not trained, as the device stores them (`task.frozen_dtype`).

  Args:
    params: the base model's parameters.
    dtype: one of `FROZEN_DTYPES`.

  Returns:
    The tree, each floating-point leaf in `dtype` (one leaf converted at a time).
  """
  check_frozen_dtype(dtype)
  return jax.tree.map(
    lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
  )


def lm_loss(model: Decoder, lora_alpha: Optional[float] = None) -> Callable:
  """The per-example loss of the causal_lm task: mean next-token NLL over counted targets.

  Args:
    model: the decoder.
    lora_alpha: LoRA's alpha when the trained parameters are LoRA factors over
      the frozen base (`frozen`), or None when they are the model's own.

  Returns:
    `loss_fn(params, example, frozen) -> (loss, {"nll_sum", "tokens"})`; an
    example holds `input_ids`, `attention_mask` and `loss_mask` [T].
  """

  def loss_fn(p, ex, frozen):
    ids, mask, targets = ex["input_ids"][None], ex["attention_mask"][None], ex["loss_mask"]
    if lora_alpha is None:
      logits, _ = model.apply({"params": p}, ids, mask)
    else:
      with adapters.lora(p, alpha=lora_alpha):
        logits, _ = model.apply({"params": frozen}, ids, mask)
    logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1)[:, 0]
    w = (targets[1:] * mask[0, 1:] * mask[0, :-1]).astype(jnp.float32)
    total, count = jnp.sum(nll * w), jnp.sum(w)
    return total / jnp.maximum(count, 1.0), {"nll_sum": total, "tokens": count}

  return loss_fn


def causal_lm(cfg) -> Task:
  """DP fine-tuning of a pretrained decoder on `task.data` (see the module docstring).

  Metrics per example: the loss (mean next-token NLL over its counted
  targets), `nll_sum` and `tokens`, so perplexity = exp(sum nll / sum tokens).

  Args:
    cfg: a train config whose task section names "causal_lm".

  Returns:
    The Task (info: the decoder config, `perplexity` and `samples(params, n)`).
  """
  t = task_section(cfg.task, DEFAULTS)
  remat = remat_blocks(cfg)
  rows = _shakespeare_rows() if t.data == "shakespeare" else read_examples(t.data)
  lora = lora_settings(t)
  check_frozen_dtype(t.frozen_dtype)  # whatever the method, before the model loads
  frac = float(t.dev_fraction)
  if not 0 < frac < 1:
    raise ValueError(f"task.dev_fraction must be in (0, 1), got {frac}")
  pre, mcfg, params = base_model(t)
  mcfg = dataclasses.replace(mcfg, remat=remat)
  completions = [r["completion"] for r in rows] if "completion" in rows[0] else None
  enc = pre.encode([r["text"] for r in rows], int(t.seq_len), completions)
  if "loss_mask" not in enc:
    enc["loss_mask"] = enc["attention_mask"]
  has_users = "user_id" in rows[0]
  rng = np.random.default_rng(int(cfg.seed))
  if has_users:  # held-out users: evaluation on people the model never saw
    users = np.array([r["user_id"] for r in rows])
    names = np.unique(users)
    held_users = set(rng.permutation(names)[: max(1, int(round(frac * len(names))))])
    held = np.array([u in held_users for u in users])
  else:
    held = np.zeros(len(rows), bool)
    held[rng.permutation(len(rows))[: max(1, int(round(frac * len(rows))))]] = True
  if held.all():
    raise ValueError(f"task.dev_fraction={frac} leaves no training examples")
  train = {k: v[~held] for k, v in enc.items()}
  dev = {k: v[held] for k, v in enc.items()}
  if t.max_eval:
    dev = {k: v[: int(t.max_eval)] for k, v in dev.items()}
  model = Decoder(mcfg)
  scale = None
  if lora is not None:
    trainable = adapters.init_lora(
      params,
      jax.random.PRNGKey(int(cfg.seed)),
      rank=int(lora["rank"]),
      targets=lora["targets"],
    )
    if not jax.tree.leaves(trainable):
      raise ValueError(f"task.lora.targets={lora['targets']!r} matches no Dense layer")
    scale = float(lora["alpha"])
    frozen = frozen_weights(params, t.frozen_dtype)
    params = None  # the float32 copy is not kept (samples merge into the stored weights)
  else:
    trainable, frozen = params, {}

  loss_fn = lm_loss(model, None if lora is None else scale)

  def samples(p, n: int = 3, prompt_tokens: int = 8, new_tokens: int = 24, seed: int = 0):
    """n continuations of the first dev examples' first tokens (greedy), as text."""
    merged = p if lora is None else adapters.merge_lora(frozen, p, alpha=scale)
    rows_ = [
      list(dev["input_ids"][i][: min(prompt_tokens, int(dev["attention_mask"][i].sum()))])
      for i in range(min(n, len(dev["input_ids"])))
    ]
    ids, mask = left_pad(rows_, mcfg.pad_token_id)
    out, _ = generate(
      mcfg, merged, ids, mask, jax.random.PRNGKey(seed), max_new_tokens=new_tokens, temperature=0.0
    )
    return [pre.decode(r) + " | " + pre.decode(o) for r, o in zip(rows_, np.asarray(out))]

  return Task(
    f"{os.path.basename(pre.path.rstrip('/'))}-lm",
    trainable,
    frozen,
    loss_fn,
    train,
    {"dev": dev},
    user_ids=np.array([r["user_id"] for r in rows])[~held] if has_users else None,
    info={
      "decoder": mcfg,
      "encode": pre.encode,
      "perplexity": True,
      "samples": samples,
      "exportable": True,
    },
  )
