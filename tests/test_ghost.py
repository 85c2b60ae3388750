"""Ghost-norm / book-keeping clipping equals the vmap path (dpjax/ghost.py)."""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpjax
from dpjax.core.clipping import ghost
from dpjax.models import adapters
from dpjax.models import decoder as dec
from dpjax.models import encoder as enc

# The Gram path at test widths (see the fixture).
pytestmark = pytest.mark.usefixtures("ghost_norms_at_tiny_shapes")

VOCAB, T = 128, 20  # tied embedding: (2T)^2 = 1600 < 128 x 16, so the ghost rule


def _decoder(family, tied, dtype="float32"):
  cfg = dec.DecoderConfig(
    family=family,
    vocab_size=VOCAB,
    hidden_size=16,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2 if family == "llama" else None,
    intermediate_size=32,
    max_position=32,
    tie_embeddings=tied,
    dtype=dtype,
  )
  model = dec.Decoder(cfg)

  def loss(p, ex, prefixes=None):
    ids, mask = ex["ids"][None], ex["mask"][None]
    logits, _ = model.apply({"params": p}, ids, mask, prefixes=prefixes)
    return dec.causal_lm_loss(logits, ids, mask)[0]

  return cfg, dec.init_params(cfg, jax.random.PRNGKey(0)), loss


def _encoder():
  cfg = enc.EncoderConfig(
    vocab_size=VOCAB,
    hidden_size=16,
    num_layers=2,
    num_heads=4,
    intermediate_size=32,
    max_position=32,
    num_labels=3,
  )
  model = enc.Encoder(cfg)

  def loss(p, ex):
    logits = model.apply({"params": p}, ex["ids"][None], ex["mask"][None])
    return -jax.nn.log_softmax(logits[0])[ex["label"]]

  return cfg, enc.init_params(cfg, jax.random.PRNGKey(0)), loss


def _batch(n=6, seed=0):
  r = np.random.default_rng(seed)
  ids = r.integers(1, VOCAB, (n, T))
  ids[:, 3] = ids[:, 7]  # repeated tokens: the embedding Gram has off-diagonals
  lengths = r.integers(T // 2, T + 1, n)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
  return {
    "ids": jnp.asarray(ids),
    "mask": jnp.asarray(mask),
    "label": jnp.asarray(r.integers(0, 3, n)),
  }


def _both(loss, params, batch, *args, mask=None, **kw):
  out = []
  for method in ("vmap", "ghost"):
    fn = dpjax.clipped_grad(loss, method=method, **kw)
    out.append(jax.jit(lambda p, b, m, *a: fn(p, b, *a, mask=m))(params, batch, mask, *args))
  return out


def _rel_err(a, b):
  num = max(
    float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )
  den = max(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) for x in jax.tree.leaves(a))
  return num / den


def _per_layer_clip(params, c=0.3):
  return {k: c for k in params}


MODELS = {
  "gpt2-tied": lambda: _decoder("gpt2", True),
  "gpt2-untied": lambda: _decoder("gpt2", False),
  "llama-untied": lambda: _decoder("llama", False),
  "llama-tied": lambda: _decoder("llama", True),
  "encoder": _encoder,
}


# By default: tied GPT-2 and tied Llama (GQA) flat, the encoder per layer; the untied,
# GPT-2 per-layer and encoder-flat variants (the same rules on other shapes) are opt-in
# (-m slow).
_DEFAULT = {("gpt2-tied", False), ("llama-tied", False), ("encoder", True)}


@pytest.mark.parametrize(
  "name,per_layer",
  [
    (n, p) if (n, p) in _DEFAULT else pytest.param(n, p, marks=pytest.mark.slow)
    for n, p in [(n, False) for n in sorted(MODELS)] + [("gpt2-tied", True), ("encoder", True)]
  ],
)
def test_ghost_equals_vmap(name, per_layer):
  _, params, loss = MODELS[name]()
  batch = _batch()
  mask = jnp.array([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])  # two padding units
  clip = _per_layer_clip(params) if per_layer else 0.5
  (gv, av), (gg, ag) = _both(loss, params, batch, mask=mask, l2_clip_norm=clip)
  assert _rel_err(gv, gg) < 1e-5
  for nv, ng in zip(jax.tree.leaves(av.norms), jax.tree.leaves(ag.norms)):
    np.testing.assert_allclose(ng, nv, rtol=1e-5)
  assert int(ag.num_units) == 4
  np.testing.assert_allclose(ag.loss, av.loss, rtol=1e-6)
  # The clip bound binds (otherwise clipping would not be tested).
  assert float(jnp.max(jax.tree.leaves(av.norms)[0])) > 0.5


def test_rules_mixed_and_fallback():
  _, params, loss = _decoder("gpt2", True)
  rules = dpjax.clipped_grad(loss, l2_clip_norm=1.0, method="ghost").rules(params, _batch())
  assert rules["embed/embedding"] == "ghost"  # lookup + tied head, cross term
  assert rules["pos_embed/embedding"] == "ghost"
  assert rules["layer_0/attn/q/kernel"] == "materialised"  # T^2 = 400 > 16 * 16
  assert rules["layer_0/mlp/up/kernel"] == "ghost"  # T^2 = 400 < 16 * 32
  assert rules["layer_0/attn/q/bias"] == "materialised"
  assert rules["layer_0/attn_norm/scale"] == "vmap"  # no rule: LayerNorm
  assert set(rules.values()) == {"ghost", "materialised", "vmap"}


def test_the_mixed_rule_weighs_time_and_memory(monkeypatch):
  """Unpinned, the rule materialises what is no larger than the layer's own rows (every
  layer of the tiny decoder, its tied embedding included) and the sum still equals
  vmap's; at the 1B shape it keeps ghost norms where a unit's gradient outgrows its
  rows, and materialises the tied 128k embedding once the rows its two uses hold pass
  its size (ghost norms there cost 3 T^2 V per unit)."""
  monkeypatch.undo()  # this module pins the memory-only rule; this test is of the real one
  _, params, loss = _decoder("gpt2", True)
  rules = dpjax.clipped_grad(loss, l2_clip_norm=1.0, method="ghost").rules(params, _batch())
  assert rules["layer_0/mlp/up/kernel"] == "materialised"  # 16 x 32 <= 20 x 48
  assert rules["layer_0/attn/q/kernel"] == "materialised"
  assert rules["embed/embedding"] == "materialised"  # 128 x 16 <= 20 (1 + 16) + 20 (128 + 16)
  (gv, _), (gg, _) = _both(loss, params, _batch(), l2_clip_norm=0.5)
  assert _rel_err(gv, gg) < 1e-5
  vocab, d, ff = 128256, 2048, 8192
  for t, mlp, embed in ((256, False, False), (1024, False, False), (2048, True, True)):
    assert ghost.materialise(t, d, ff) is mlp
    tied = t * (1 + d) + t * (vocab + d)  # the lookup's ids and g, the logits' g and x
    assert ghost.materialise(2 * t, vocab, d, tied) is embed
  assert ghost.materialise(1024, d, d) and not ghost.materialise(1023, d, d)


def test_weight_used_outside_its_layer_falls_back():
  """A kernel also used in a regulariser is not taken by the rule, and the sum is still right."""
  _, params, base = _decoder("gpt2", False)

  def loss(p, ex):
    k = p["layer_1"]["mlp"]["up"]["kernel"]
    return base(p, ex) + 0.3 * jnp.sum(jnp.square(k - 0.1))

  fn = dpjax.clipped_grad(loss, l2_clip_norm=0.5, method="ghost")
  rules = fn.rules(params, _batch())
  assert rules["layer_1/mlp/up/kernel"] == "vmap"
  assert rules["layer_1/mlp/up/bias"] == "vmap"  # a site is taken whole or not at all
  assert rules["layer_0/mlp/up/kernel"] == "ghost"
  (gv, _), (gg, _) = _both(loss, params, _batch(), l2_clip_norm=0.5)
  assert _rel_err(gv, gg) < 1e-5


def test_lora_and_prefix_adapters():
  cfg, base, loss = _decoder("llama", False)
  lora = adapters.init_lora(base, jax.random.PRNGKey(1), rank=2, targets=r".*attn/(q|v)")
  lora = jax.tree.map(lambda x: x + 0.1, lora)  # B = 0 would make A's gradient vanish
  prefix = adapters.init_prefix(
    jax.random.PRNGKey(2),
    num_layers=2,
    num_tokens=3,
    num_kv_heads=cfg.kv_heads,
    head_dim=cfg.dim_per_head,
  )
  trainable = {"lora": lora, "prefix": prefix, "lm_head": base["lm_head"]}
  frozen = {k: v for k, v in base.items() if k != "lm_head"}

  def adapted(p, ex, frozen):
    with adapters.lora(p["lora"]):
      return loss(dict(frozen, lm_head=p["lm_head"]), ex, adapters.prefix_layers(p["prefix"]))

  rules = dpjax.clipped_grad(adapted, l2_clip_norm=1.0, method="ghost").rules(
    trainable, _batch(), frozen
  )
  assert rules["lm_head/kernel"] == "ghost"
  assert rules["lora/layer_0/attn/q/a"] == "materialised"  # T^2 > 16 x 2: from the taps
  assert rules["prefix/layer_1/key"] == "vmap"
  (gv, _), (gg, _) = _both(adapted, trainable, _batch(), frozen, l2_clip_norm=0.5)
  assert _rel_err(gv, gg) < 1e-5


def test_group_units_microbatch_and_aux():
  """Units of G examples as one batch each (keep_batch_dim-style), scanned in microbatches."""
  _, params, _ = _decoder("gpt2", True)
  model = dec.Decoder(
    dec.DecoderConfig(
      family="gpt2",
      vocab_size=VOCAB,
      hidden_size=16,
      num_layers=2,
      num_heads=4,
      intermediate_size=32,
      max_position=32,
      tie_embeddings=True,
    )
  )

  def user_loss(p, user):  # user: [G, T]
    logits, _ = model.apply({"params": p}, user["ids"], user["mask"])
    per_ex = dec.causal_lm_loss(logits, user["ids"], user["mask"])
    return jnp.mean(per_ex), {"first": per_ex[0]}

  flat = _batch(n=8)
  users = jax.tree.map(lambda x: x.reshape((4, 2) + x.shape[1:]), flat)
  mask = jnp.array([1.0, 0.0, 1.0, 1.0])
  (gv, av), (gg, ag) = _both(
    user_loss, params, users, mask=mask, l2_clip_norm=0.4, has_aux=True, microbatch_size=3
  )
  assert _rel_err(gv, gg) < 1e-5
  np.testing.assert_allclose(ag.loss_aux["first"], av.loss_aux["first"], rtol=1e-6)


def test_inner_vmap_takes_the_vmap_path():
  """Layers under the loss's own vmap get no rule (their inputs cannot leave it)."""
  _, params, loss = _decoder("gpt2", True)

  def user_loss(p, user):
    return jnp.mean(jax.vmap(loss, in_axes=(None, 0))(p, user))

  users = jax.tree.map(lambda x: x.reshape((3, 2) + x.shape[1:]), _batch())
  fn = dpjax.clipped_grad(user_loss, l2_clip_norm=0.4, method="ghost")
  assert set(fn.rules(params, users).values()) == {"vmap"}
  (gv, _), (gg, _) = _both(user_loss, params, users, l2_clip_norm=0.4)
  assert _rel_err(gv, gg) < 1e-5


def test_nan_unit_dropped_like_vmap():
  _, params, base = _decoder("gpt2", True)

  def loss(p, ex):
    return base(p, ex) * ex["scale"]

  batch = dict(_batch(), scale=jnp.array([1.0, 1.0, jnp.nan, 1.0, 1.0, 1.0]))
  (gv, av), (gg, ag) = _both(loss, params, batch, l2_clip_norm=0.5)
  assert int(ag.num_dropped) == int(av.num_dropped) == 1
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(gg))
  assert _rel_err(gv, gg) < 1e-5


def test_bf16_compute_clips_exactly():
  """bf16 layers, f32 params: norms in f32 match an f32 reference; each unit's share is <= C."""
  _, params, loss16 = _decoder("llama", True, dtype="bfloat16")
  _, _, loss32 = _decoder("llama", True)
  batch = _batch()
  (_, a32), _ = _both(loss32, params, batch, l2_clip_norm=0.5)
  fn = dpjax.clipped_grad(loss16, l2_clip_norm=0.5, method="ghost")
  g16, a16 = jax.jit(fn)(params, batch)
  assert a16.norms.dtype == jnp.float32
  np.testing.assert_allclose(a16.norms, a32.norms, rtol=3e-2)
  # One unit at a time: its clipped contribution has norm <= C (up to f32 rounding).
  for i in range(3):
    one = jax.tree.map(lambda x: x[i : i + 1], batch)
    g, _ = jax.jit(fn)(params, one)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(g)))
    assert float(norm) <= 0.5 * (1 + 1e-5)
    assert float(norm) >= 0.5 * (1 - 3e-2)  # the bound binds: clipped to ~C
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g16))


def test_bad_method_and_l1_are_clear_errors():
  with pytest.raises(ValueError, match="method must be"):
    dpjax.clipped_grad(lambda p, x: 0.0, l2_clip_norm=1.0, method="fast")
  with pytest.raises(ValueError, match="L2 norms only"):
    dpjax.clipped_grad(lambda p, x: 0.0, l1_clip_norm=1.0, method="ghost")


def test_trainable_kernels_with_frozen_biases():
  """Only some kernels trainable (biases frozen, as `adapters.partition` leaves them)."""
  _, params, loss = _encoder()
  mask = adapters.trainable_mask(params, r"layer_1/.*/kernel|classifier/.*")
  trainable, frozen = adapters.partition(params, mask)

  def part_loss(p, ex, frozen):
    return loss(adapters.combine(p, frozen), ex)

  rules = dpjax.clipped_grad(part_loss, l2_clip_norm=1.0, method="ghost").rules(
    trainable, _batch(), frozen
  )
  assert rules["layer_1/intermediate/kernel"] == "ghost"
  assert "layer_1/intermediate/bias" not in rules  # frozen: not a parameter here
  assert rules["classifier/bias"] == "materialised"
  (gv, _), (gg, _) = _both(part_loss, trainable, _batch(), frozen, l2_clip_norm=0.5)
  assert _rel_err(gv, gg) < 1e-5


def test_group_mean_units_keep_the_ghost_rule():
  """User-level units built by group_mean: each example taped inside the user's vmap."""
  _, params, loss = _decoder("gpt2", True)

  def example_loss(p, ex, scale):
    value = loss(p, ex) * scale
    return value, {"scaled": value}

  user_loss = dpjax.core.clipping.group_mean(example_loss, has_aux=True)
  flat = _batch(n=9)
  users = jax.tree.map(lambda x: x.reshape((3, 3) + x.shape[1:]), flat)
  users = dpjax.core.clipping.GroupUnits(
    users, jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
  )
  mask = jnp.array([1.0, 1.0, 0.0])
  fn = dpjax.clipped_grad(user_loss, l2_clip_norm=0.4, has_aux=True, method="ghost")
  rules = fn.rules(params, users, 2.0)
  # A user's rows are its 3 x 20 tokens: (2 x 60)^2 > 128 x 16, so the tied embedding
  # (lookup + head) is materialised per user, scatter and einsum together.
  assert rules["embed/embedding"] == "materialised"
  assert set(rules.values()) == {"materialised", "vmap"}
  (gv, av), (gg, ag) = _both(
    user_loss, params, users, 2.0, mask=mask, l2_clip_norm=0.4, has_aux=True
  )
  assert _rel_err(gv, gg) < 1e-5
  np.testing.assert_allclose(ag.norms, av.norms, rtol=1e-5)
  np.testing.assert_allclose(ag.loss_aux["scaled"], av.loss_aux["scaled"], rtol=1e-6)
  with pytest.raises(ValueError, match="has_aux"):
    dpjax.clipped_grad(user_loss, l2_clip_norm=0.4, method="ghost")


def _rules_and_equality(model, params, x, loss=None):
  loss = loss or (lambda p, xu: jnp.mean(model.apply({"params": p}, xu) ** 2))
  rules = dpjax.clipped_grad(loss, l2_clip_norm=1.0, method="ghost").rules(params, x)
  (gv, _), (gg, _) = _both(loss, params, x, l2_clip_norm=0.3)
  return rules, _rel_err(gv, gg)


class _Twice(nn.Dense):  # a subclass keeping Dense's math: the rule applies
  pass


class _Odd(nn.Dense):  # a subclass with its own math: no rule, vmap
  def __call__(self, x):
    return super().__call__(x) ** 2


def test_dense_general_and_dense_subclasses():

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: [T, 12]
      h = nn.DenseGeneral((3, 4), axis=-1, name="split")(x)  # [T, 3, 4]
      h = nn.DenseGeneral(6, axis=(-2, -1), name="merge")(jnp.tanh(h))  # [T, 6]
      h = _Twice(5, name="sub")(h)
      return _Odd(2, name="odd")(h)

  x = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 12))
  params = Net().init(jax.random.PRNGKey(1), x[0])["params"]
  rules, err = _rules_and_equality(Net(), params, x)
  assert rules["split/kernel"] == "ghost" and rules["split/bias"] == "materialised"
  assert rules["merge/kernel"] == "ghost" and rules["sub/kernel"] == "ghost"
  assert rules["odd/kernel"] == "vmap"
  assert err < 1e-5


def test_lora_factors_take_the_ghost_rule_and_equal_vmap():

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1, name="out")(jnp.tanh(nn.Dense(64, name="wide")(x)))

  x = jax.random.normal(jax.random.PRNGKey(0), (5, 3, 64))  # T = 3: T^2 < 64 x 4
  base = Net().init(jax.random.PRNGKey(1), x[0])["params"]
  lora = adapters.init_lora(base, jax.random.PRNGKey(2), rank=4, targets=r"wide")
  lora = jax.tree.map(lambda a: a + 0.1, lora)

  def loss(f, xu):
    with adapters.lora(f, alpha=8):
      return jnp.mean(Net().apply({"params": base}, xu) ** 2)

  rules = dpjax.clipped_grad(loss, l2_clip_norm=1.0, method="ghost").rules(lora, x)
  assert rules == {"wide/a": "ghost", "wide/b": "ghost"}
  (gv, _), (gg, _) = _both(loss, lora, x, l2_clip_norm=0.3)
  assert _rel_err(gv, gg) < 1e-5


def test_a_large_parameter_on_the_vmap_path_is_warned_about():
  big = {"w": jnp.full((1000, 1000), 1e-3), "v": jnp.ones(3)}
  loss = lambda p, xu: jnp.sum((xu @ p["w"]) ** 2) + jnp.sum(p["v"])  # a raw matmul: no rule
  x = jnp.ones((2, 1000))
  grad_fn = dpjax.clipped_grad(loss, l2_clip_norm=1.0, method="ghost")
  with pytest.warns(UserWarning, match=r"w \(1,000,000\) have no ghost rule"):
    grad_fn(big, x)
  small = {"w": jnp.full((10, 10), 1e-3), "v": jnp.ones(3)}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    grad_fn(small, jnp.ones((2, 10)))


def _collectives_in_conditionals(hlo: str):
  """Collective ops reached from a conditional's branches in an HLO module's text."""
  bodies, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head:
      name = head.group(1)
      bodies[name] = []
    elif name is not None:
      bodies[name].append(line)
  called = re.compile(r"(?:branch_computations=\{|true_computation=|false_computation=)([^}\n]+)")
  todo = [
    n
    for lines in bodies.values()
    for ln in lines
    for m in called.findall(ln)
    for n in re.findall(r"%?([\w.\-]+)", m)
    if n in bodies
  ]
  seen, found = set(), []
  while todo:
    n = todo.pop()
    if n in seen:
      continue
    seen.add(n)
    for ln in bodies[n]:
      found += re.findall(
        r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)\(", ln
      )
      todo += [m for m in re.findall(r"%([\w.\-]+)", ln) if m in bodies]
  return found


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 virtual devices")
def test_no_collective_runs_inside_a_conditional_on_a_mesh():
  """XLA:CPU runs a conditional's collectives on a blocking thread: with more devices
  than threads a rendezvous can wait forever (it aborted a 4 x 2 step on 2 cores)."""
  from dpjax.training import sharding as shard_lib

  _, params, loss = _decoder("llama", True)
  mesh = shard_lib.make_mesh(jax.devices()[:8], model=2)
  fn = dpjax.clipped_grad(loss, l2_clip_norm=0.5, method="ghost")
  placed = shard_lib.shard_params(params, mesh)
  batch = shard_lib.shard_batch(_batch(n=8), mesh)
  hlo = jax.jit(fn).lower(placed, batch).compile().as_text()
  assert re.search(r"\ball-reduce\(", hlo)  # the step is partitioned: sums are reduced
  assert _collectives_in_conditionals(hlo) == []
