"""Ghost clipping on every decoder family dpjax loads, against per-example (vmap) gradients.

Tiny checkpoints with every parameter random (`hf_tiny`), loaded through the Hugging
Face reader, the causal_lm task's own loss (`lm_loss`), a batch with padded units
(attention masks), ignored tokens (loss masks) and padding units of the batch (`mask`):
`clipped_grad(method="ghost")` must give the clipped sum, the per-unit norms and the loss
of `method="vmap"`, in full fine-tuning and with LoRA factors on the attention projections
(the base frozen, stored in bfloat16 as the LoRA task stores it). A LoRA step changes the
factors only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpjax
from dpjax.models import adapters
from dpjax.models.decoder import Decoder
from dpjax.models.hf import load_decoder
from dpjax.tasks.causal_lm import lm_loss

pytest.importorskip("torch", reason="torch (CPU) writes the tiny checkpoints")
from tests import hf_tiny  # noqa: E402

# The Gram path at test widths (see the fixture).
pytestmark = pytest.mark.usefixtures("ghost_norms_at_tiny_shapes")

T = 12
# (family, tied embeddings, config fields replaced): each family's own features (Llama 3's
# rope scaling, Qwen2's biases, Qwen3's q/k norms, Gemma's soft-capping and sandwich norms,
# Mistral's and Phi-3's sliding windows, Phi-3's fused projections, GPT-2's learned positions).
FAMILIES = [
  ("llama", False, {"rope_scaling": hf_tiny.LLAMA3_ROPE}),
  ("mistral", False, {}),
  ("qwen2", True, {}),
  ("qwen3", False, {}),
  ("phi3", False, {}),
  ("gemma", True, {}),
  ("gemma2", True, {}),
  ("gemma3", False, {}),
  ("gpt2", True, {}),
]
# In the default run: LoRA on five families (Llama 3 rope, Qwen2 biases, Qwen3 q/k norms,
# Gemma 2 soft-capping and sandwich norms, Phi-3 fused projections) and full fine-tuning on
# Llama and GPT-2; the rest (the same rules on other layouts) with -m slow.
LORA_DEFAULT = {"llama", "qwen2", "qwen3", "gemma2", "phi3"}
FULL_DEFAULT = {"llama", "gpt2"}


def _checkpoint(tmp_path, family, tie, over):
  hf_tiny.model(family, tie, **over).save_pretrained(tmp_path / family)
  return load_decoder(str(tmp_path / family))


def _batch(n=5, seed=0):
  r = np.random.default_rng(seed)
  lengths = r.integers(T // 2, T + 1, n)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
  ignored = r.random((n, T)) < 0.3  # tokens the loss does not count
  return {  # the causal_lm task's example layout
    "input_ids": jnp.asarray(hf_tiny.ids((n, T), seed)),
    "attention_mask": jnp.asarray(mask),
    "loss_mask": jnp.asarray((~ignored).astype(np.int32)),
  }


def _check_ghost_equals_vmap(loss, params, batch, *args, clip):
  units = jnp.array([1.0, 0.0, 1.0, 1.0, 1.0])  # a padding unit of the batch
  out = {}
  for method in ("vmap", "ghost"):
    fn = dpjax.clipped_grad(loss, has_aux=True, l2_clip_norm=clip, method=method)
    out[method] = jax.jit(lambda p, b, *a, fn=fn: fn(p, b, *a, mask=units))(params, batch, *args)
  (gv, av), (gg, ag) = out["vmap"], out["ghost"]
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(gv))
  for a, b in zip(jax.tree.leaves(gg), jax.tree.leaves(gv)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * scale, rtol=0)
  for nv, ng in zip(jax.tree.leaves(av.norms), jax.tree.leaves(ag.norms)):
    np.testing.assert_allclose(np.asarray(ng), np.asarray(nv), rtol=2e-5)
  np.testing.assert_allclose(np.asarray(ag.loss), np.asarray(av.loss), rtol=1e-6)
  assert float(jnp.max(jax.tree.leaves(av.norms)[0])) > clip  # the bound binds
  ghost = dpjax.clipped_grad(loss, has_aux=True, l2_clip_norm=clip, method="ghost")
  rules = ghost.rules(params, batch, *args)
  return rules


@pytest.mark.parametrize(
  "family,tie,over",
  [f if f[0] in FULL_DEFAULT else pytest.param(*f, marks=pytest.mark.slow) for f in FAMILIES],
  ids=[f[0] for f in FAMILIES],
)
def test_full_fine_tuning_ghost_equals_vmap(tmp_path, family, tie, over):
  cfg, params = _checkpoint(tmp_path, family, tie, over)
  rules = _check_ghost_equals_vmap(lm_loss(Decoder(cfg)), params, _batch(), {}, clip=0.05)
  assert "ghost" in rules.values()  # not everything fell back to per-example gradients


@pytest.mark.parametrize(
  "family,tie,over",
  [f if f[0] in LORA_DEFAULT else pytest.param(*f, marks=pytest.mark.slow) for f in FAMILIES],
  ids=[f[0] for f in FAMILIES],
)
def test_lora_ghost_equals_vmap_on_a_bfloat16_base(tmp_path, family, tie, over):
  cfg, params = _checkpoint(tmp_path, family, tie, over)
  # every family's q and v (Phi-3's and GPT-2's fused projections are split when loaded)
  factors = adapters.init_lora(params, jax.random.PRNGKey(1), rank=4, targets=r".*attn/(q|v)")
  # B random (it starts at zero) so that A's gradients are not zero either
  factors = jax.tree_util.tree_map_with_path(
    lambda path, x: (
      0.3 * jax.random.normal(jax.random.PRNGKey(len(str(path))), x.shape)
      if str(path[-1]) == "['b']"
      else x
    ),
    factors,
  )
  frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  loss = lm_loss(Decoder(cfg), lora_alpha=8.0)
  rules = _check_ghost_equals_vmap(loss, factors, _batch(), frozen, clip=0.05)
  assert "ghost" in rules.values()


def test_a_lora_step_changes_the_factors_only(tmp_path):
  import optax

  cfg, params = _checkpoint(tmp_path, "llama", False, {})
  factors = adapters.init_lora(params, jax.random.PRNGKey(1), rank=4, targets=r".*attn/(q|v)")
  frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  before = jax.tree.map(np.asarray, frozen)
  grad_fn = dpjax.clipped_grad(
    lm_loss(Decoder(cfg), 8.0), has_aux=True, l2_clip_norm=1.0, method="ghost"
  )
  tx = optax.chain(
    dpjax.mechanisms.gaussian(
      noise_multiplier=1.0, l2_sensitivity=grad_fn.sensitivity(), key=jax.random.PRNGKey(2)
    ),
    dpjax.normalize(expected_batch_size=5),
    optax.sgd(0.1),
  )

  @jax.jit
  def step(factors, frozen):
    grads, _ = grad_fn(factors, _batch(), frozen)
    updates, _ = tx.update(grads, tx.init(factors), factors)
    return optax.apply_updates(factors, updates)

  stepped = step(factors, frozen)
  assert jax.tree.structure(stepped) == jax.tree.structure(factors)  # factors only
  moved = [
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(stepped), jax.tree.leaves(factors))
  ]
  assert min(moved) > 0  # every factor moved (the noise alone moves it)
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(a), b)  # the base is not an argument of the update
