"""Tiny pure-JAX models used across tests (no Flax needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def mlp_init(key, d_in=5, d_hidden=7, d_out=3):
  k1, k2 = jax.random.split(key)
  return {
    "dense": {"w": jax.random.normal(k1, (d_in, d_hidden)) * 0.5, "b": jnp.zeros(d_hidden)},
    "out": {"w": jax.random.normal(k2, (d_hidden, d_out)) * 0.5, "b": jnp.zeros(d_out)},
  }


def mlp_loss(params, ex):
  """Cross-entropy of one example {'x': [d_in], 'y': int}."""
  h = jnp.tanh(ex["x"] @ params["dense"]["w"] + params["dense"]["b"])
  logits = h @ params["out"]["w"] + params["out"]["b"]
  return -jax.nn.log_softmax(logits)[ex["y"]]


def transformer_init(key, vocab=11, d=8, seq=6):
  ks = jax.random.split(key, 6)
  n = lambda k, s: jax.random.normal(k, s) * 0.3
  return {
    "embed": n(ks[0], (vocab, d)),
    "pos": n(ks[1], (seq, d)),
    "attn": {"q": n(ks[2], (d, d)), "k": n(ks[3], (d, d)), "v": n(ks[4], (d, d))},
    "ln": {"scale": jnp.ones(d)},
    "head": n(ks[5], (d, vocab)),
  }


def transformer_loss(params, ex):
  """Next-token loss of one sequence {'tokens': [T]} through one causal attention block."""
  t = ex["tokens"]
  x = params["embed"][t] + params["pos"][: t.shape[0]]
  q, k, v = (x @ params["attn"][n] for n in "qkv")
  scores = q @ k.T / jnp.sqrt(x.shape[-1])
  causal = jnp.tril(jnp.ones((t.shape[0], t.shape[0]), bool))
  scores = jnp.where(causal, scores, -1e9)
  x = x + jax.nn.softmax(scores) @ v
  x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * params["ln"]["scale"]
  logits = x @ params["head"]
  logp = jax.nn.log_softmax(logits[:-1])
  return -jnp.mean(jnp.take_along_axis(logp, t[1:, None], axis=-1))


def assert_trees_close(got, want, atol: float = 0.0, rtol: float = 1e-6):
  """Same tree structure, every leaf equal within `atol` + `rtol` |want| (numpy's rule)."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=rtol)


def assert_trees_equal(got, want):
  """Same tree structure, every leaf bit-identical (dtype and values)."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.asarray(g).dtype == np.asarray(w).dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# `variant` of a test: the function as is, or jitted.
VARIANTS = [pytest.param(lambda f: f, id="without_jit"), pytest.param(jax.jit, id="with_jit")]


def noise_streams(plain, other, zeros, steps, variant):
  """[steps, d] noise of two noise transforms on the zero pytree `zeros`, step by step.

  Args:
    plain: e.g. `mechanisms.gaussian(...)`.
    other: the transform compared with it (same key).
    zeros: the pytree the noise is added to.
    steps: the steps.
    variant: a wrapper of `update` (VARIANTS: plain, jitted).

  Returns:
    (Z, W, state): both transforms' noise as float64 arrays, one row per step, and the
    second one's final state.
  """
  sp, so = plain.init(zeros), other.init(zeros)
  up, uo = variant(plain.update), variant(other.update)
  Z, W = [], []
  for _ in range(steps):
    z, sp = up(zeros, sp)
    w, so = uo(zeros, so)
    Z.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(z)]))
    W.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(w)]))
  return np.asarray(Z, np.float64), np.asarray(W, np.float64), so
