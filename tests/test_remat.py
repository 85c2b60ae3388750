"""task.remat: blocks recomputed in the backward pass, the same parameters and clipped sums."""

import contextlib
import dataclasses
import io
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.ad_checkpoint import print_saved_residuals
from models_tiny import assert_trees_close

import dpjax
from dpjax.models.decoder import Decoder, DecoderConfig
from dpjax.models.encoder import Encoder, EncoderConfig
from dpjax.tasks import build_task
from dpjax.tasks.pretrained import remat_blocks
from dpjax.training.config import CONFIG_DIR, load_config

QUICKSTART = os.path.join(CONFIG_DIR, "quickstart.py")


def _activation_residuals(f, *args) -> int:
  """Entries the backward pass of `f` keeps that are not its arguments (jax's own listing)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(f, *args)
  total = 0
  for line in out.getvalue().splitlines():
    if "from the argument" in line:
      continue
    shape = re.match(r"\w+\[([\d,]*)\]", line).group(1)
    total += math.prod(int(n) for n in shape.split(",") if n)
  return total


def _models():
  dec = DecoderConfig(
    family="gpt2",
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    intermediate_size=96,
    max_position=32,
    tie_embeddings=True,
  )
  enc = EncoderConfig(
    vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=96
  )
  ids = jax.random.randint(jax.random.key(0), (4, 16), 1, 64)

  def dec_loss(model):
    def loss(p, x):
      logits, _ = model.apply({"params": p}, x[None])
      return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take(logits[0], x, axis=-1).diagonal())

    return loss

  def enc_loss(model):
    def loss(p, x):
      return jnp.mean(model.apply({"params": p}, x[None], jnp.ones((1, x.shape[0]))) ** 2)

    return loss

  return ((dec, Decoder, dec_loss), (enc, Encoder, enc_loss)), ids


def test_remat_keeps_only_block_inputs_with_the_same_parameters_and_clipped_sums():
  (cases, ids) = _models()
  for cfg, module, make_loss in cases:
    plain, remat = module(cfg), module(dataclasses.replace(cfg, remat=True))
    args = (ids[:1],) if module is Decoder else (ids[:1], jnp.ones_like(ids[:1]))
    params = plain.init(jax.random.key(1), *args)["params"]
    again = remat.init(jax.random.key(1), *args)["params"]
    assert jax.tree.structure(again) == jax.tree.structure(params)  # checkpoints load either way
    assert_trees_close(again, params)
    kept = {}
    for name, model in (("plain", plain), ("remat", remat)):
      loss = make_loss(model)
      kept[name] = _activation_residuals(loss, params, ids[0])
      grads, _ = jax.jit(dpjax.clipped_grad(loss, l2_clip_norm=0.5))(params, ids)
      if name == "plain":
        want = grads
      else:
        assert_trees_close(grads, want, atol=1e-6, rtol=1e-5)
    # Without remat the backward pass keeps every block's inner activations
    # (attention scores, MLP hidden states); with it only what enters each block.
    assert kept["remat"] < kept["plain"] / 3, (cfg.__class__.__name__, kept)


def test_remat_is_a_bool_and_refused_with_ghost_before_anything_loads():
  def cfg(**top):
    return ml_collections.ConfigDict({"task": {"remat": top.pop("remat")}, **top})

  assert remat_blocks(cfg(remat=True, clipping_method="vmap")) is True
  assert remat_blocks(ml_collections.ConfigDict({"task": {}})) is False
  with pytest.raises(ValueError, match="task.remat must be True or False, got 'yes'"):
    remat_blocks(cfg(remat="yes"))
  with pytest.raises(ValueError, match="task.remat=True hides each block's layers from ghost"):
    remat_blocks(cfg(remat=True, clipping_method="ghost"))
  # The task refuses it first: the model path below does not exist.
  bad = load_config(
    QUICKSTART, ["task.model='/no/such/dir'", "task.remat=True", "clipping_method='ghost'"]
  )
  with pytest.raises(ValueError, match="ghost clipping"):
    build_task(bad)


def test_remat_reaches_the_trained_layer_of_a_task(tiny_bert, tmp_path):
  pytest.importorskip("torch", reason="torch (CPU) writes the tiny BERT fixture")
  words = ["good", "bad", "film", "plot", "the"]
  model_dir = tiny_bert(words)
  data = tmp_path / "rt"
  data.mkdir()
  rows = [
    f"{i}\t{2.0 if i % 2 else -2.0}\t{words[i % 2]} {words[2 + i % 3]} {i}" for i in range(60)
  ]
  (data / "movieReviewSnippets_GroundTruth.txt").write_text("\n".join(rows) + "\n")
  base = [f"task.model='{model_dir}'", f"task.data='{data}'", "task.max_length=8"]
  base += ["task.train_layers=1"]
  task = build_task(load_config(QUICKSTART, base + ["task.remat=True"]))
  ex = {k: v[0] for k, v in task.train.items()}
  grad = jax.grad(lambda p: task.loss_fn(p, ex, task.frozen)[0])
  jaxpr = str(jax.make_jaxpr(grad)(task.params))
  assert "checkpoint" in jaxpr or "remat" in jaxpr  # the trained layer is rematerialised
