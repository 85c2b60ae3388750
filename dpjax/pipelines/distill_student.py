"""DistilDP's student: the distillation loss, the width projection, the student's task.

Everything here is post-processing of the DP teacher (`dpjax.pipelines.distill`):
the student sees only synthetic text and the frozen teacher's outputs on it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp

from dpjax.models.decoder import Decoder, causal_lm_loss
from dpjax.training.task import Task

PyTree = Any


# --- the distillation loss ---------------------------------------------------


def _target_weights(attention_mask):
  """[..., T-1]: position t predicts t+1; counted when both tokens are real."""
  m = attention_mask.astype(jnp.float32)
  return m[..., 1:] * m[..., :-1]


def distillation_loss(
  student_logits,
  teacher_logits,
  input_ids,
  attention_mask,
  *,
  lam: float = 0.4,
  temperature: float = 1.0,
  alpha: float = 0.0,
  student_hidden=None,
  teacher_hidden=None,
  projection: Optional[Callable] = None,
):
  """DistilDP's loss for ONE sequence or a batch (leading axes broadcast).

  logits `[..., T, V]`, ids/mask `[..., T]`. CE and KL are token means over
  the counted next-token positions (padding on either side never counts);
  the hidden-state MSE is a mean over real tokens and width. `projection`
  maps the student width to the teacher's when they differ. Returns
  (loss, {"ce", "kl", "mse"}) with the means over the whole input.

  Args:
    student_logits: [..., T, V].
    teacher_logits: [..., T, V].
    input_ids: [..., T].
    attention_mask: [..., T].
    lam: the weight of the KL term (1 - lam on the CE).
    temperature: the softmax temperature of the KL term.
    alpha: the weight of the hidden-state MSE.
    student_hidden: the student's last hidden states (with alpha > 0).
    teacher_hidden: the teacher's.
    projection: student width -> teacher width, or None.

  Returns:
    (loss, {"ce", "kl", "mse"}).
  """
  if not 0.0 <= lam <= 1.0:
    raise ValueError(f"lam must be in [0, 1], got {lam}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if alpha < 0:
    raise ValueError(f"alpha must be >= 0, got {alpha}")
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
      f"student logits {student_logits.shape} and teacher logits "
      f"{teacher_logits.shape} differ (same tokenizer needed)"
    )
  w = _target_weights(attention_mask)
  count = jnp.maximum(jnp.sum(w), 1.0)
  s = student_logits[..., :-1, :].astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_logits[..., :-1, :].astype(jnp.float32))
  logp = jax.nn.log_softmax(s, axis=-1)
  nll = -jnp.take_along_axis(logp, input_ids[..., 1:, None], axis=-1)[..., 0]
  ce = jnp.sum(nll * w) / count
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
  kl_tok = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  kl = jnp.sum(kl_tok * w) / count
  mse = jnp.zeros(())
  if alpha > 0:
    if student_hidden is None or teacher_hidden is None:
      raise ValueError("alpha > 0 needs student_hidden and teacher_hidden")
    h = student_hidden.astype(jnp.float32)
    if projection is not None:
      h = projection(h)
    th = jax.lax.stop_gradient(teacher_hidden.astype(jnp.float32))
    if h.shape != th.shape:
      raise ValueError(
        f"hidden states differ in shape ({h.shape} vs {th.shape}): pass a projection"
      )
    m = attention_mask.astype(jnp.float32)[..., None]
    mse = jnp.sum(jnp.square(h - th) * m) / (jnp.maximum(jnp.sum(m), 1.0) * h.shape[-1])
  loss = (1.0 - lam) * ce + lam * temperature**2 * kl + alpha * mse
  return loss, {"ce": ce, "kl": kl, "mse": mse}


def init_projection(key: jax.Array, student_width: int, teacher_width: int) -> Dict[str, Any]:
  """A learned linear map student width -> teacher width (for the hidden-state term).

  Args:
    key: the PRNG key.
    student_width: the student's hidden size.
    teacher_width: the teacher's hidden size.

  Returns:
    {"kernel": [student_width, teacher_width], "bias": [teacher_width]}.
  """
  scale = 1.0 / math.sqrt(student_width)
  return {
    "kernel": scale * jax.random.normal(key, (student_width, teacher_width)),
    "bias": jnp.zeros(teacher_width),
  }


def apply_projection(proj: Dict[str, Any], h):
  """The map of `init_projection` applied to hidden states.

  Args:
    proj: the projection's parameters.
    h: [..., student_width].

  Returns:
    [..., teacher_width].
  """
  return h @ proj["kernel"] + proj["bias"]


def truncate_decoder(params: PyTree, num_layers: int) -> PyTree:
  """The first `num_layers` blocks of a decoder, with its embeddings and final norm.

  Args:
    params: the decoder's parameters.
    num_layers: the blocks kept.

  Returns:
    The truncated parameter tree.
  """
  have = sorted(int(k.split("_")[1]) for k in params if k.startswith("layer_"))
  if num_layers > len(have):
    raise ValueError(f"cannot keep {num_layers} layers of a {len(have)}-layer decoder")
  return {
    k: v
    for k, v in params.items()
    if not k.startswith("layer_") or int(k.split("_")[1]) < num_layers
  }


def student_task(
  teacher_cfg,
  teacher_params,
  student_cfg,
  student_init,
  data,
  splits,
  *,
  lam: float,
  temperature: float,
  alpha: float,
  key: jax.Array,
):
  """A `train.Task` that distils `teacher_params` into a student on `data` (synthetic text).

  Trainable: the student (and a width projection when alpha > 0 and the
  widths differ); frozen: the teacher. Eval metrics are the student's own
  next-token `nll_sum` / `tokens` on the (real, held-out) splits.

  Args:
    teacher_cfg: the teacher's DecoderConfig.
    teacher_params: its (DP-trained) parameters.
    student_cfg: the student's DecoderConfig.
    student_init: the student's initial parameters.
    data: the synthetic training text and the real eval splits.
    splits: the split names.
    lam: see `distillation_loss`.
    temperature: see `distillation_loss`.
    alpha: see `distillation_loss`.
    key: the key of the projection's initialisation.

  Returns:
    The Task.
  """
  teacher, student = Decoder(teacher_cfg), Decoder(student_cfg)
  params = {"student": student_init}
  project = alpha > 0 and student_cfg.hidden_size != teacher_cfg.hidden_size
  if project:
    params["projection"] = init_projection(key, student_cfg.hidden_size, teacher_cfg.hidden_size)

  def loss_fn(p, ex, frozen):
    ids, mask = ex["input_ids"][None], ex["attention_mask"][None]
    s_logits, _, s_hidden = student.apply({"params": p["student"]}, ids, mask, return_hidden=True)
    t_logits, _, t_hidden = teacher.apply(
      {"params": frozen["teacher"]}, ids, mask, return_hidden=True
    )
    proj = (lambda h: apply_projection(p["projection"], h)) if project else None
    loss, _ = distillation_loss(
      s_logits,
      t_logits,
      ids,
      mask,
      lam=lam,
      temperature=temperature,
      alpha=alpha,
      student_hidden=s_hidden[-1],
      teacher_hidden=t_hidden[-1],
      projection=proj,
    )
    total, count = causal_lm_loss(s_logits, ids, mask, reduction="sum")
    return loss, {"nll_sum": total[0], "tokens": count[0]}

  return Task("distil-student", params, {"teacher": teacher_params}, loss_fn, data, splits)
