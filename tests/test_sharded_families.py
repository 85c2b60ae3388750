"""The loop's private step on a 4 x 2 ("data", "model") mesh equals the one-device step.

Tiny Llama (llama3 rope scaling), Gemma 2 (soft-capping, sandwich norms, tied embeddings)
and Qwen2 (biases) decoders, every parameter random, trained by `dpjax.train` for two
steps with a fixed `noise_seed`: on one device, and on 8 virtual CPU devices with the
batch split over "data" and the trained parameters, the frozen base (bfloat16, as the
LoRA task stores it) and the optimizer state split over "model". The parameters after
the two noised updates must agree (the noise is drawn once for the global sum, never per
shard: a per-shard draw would differ by O(sigma)); a different noise seed must not.
With LoRA or full fine-tuning, ghost or vmap clipping.

And the compiled step's own memory analysis (`dpjax plan-memory --mesh`): one device's
share of the parameters is 1/model-axis of the total, plus what cannot be split.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.models import adapters, hf
from dpjax.models.decoder import Decoder, init_params
from dpjax.pipelines import plan_memory as pm
from dpjax.tasks.causal_lm import lm_loss
from dpjax.training import sharding as shard_lib
from dpjax.training.loop import train
from dpjax.training.task import Task
from tests import hf_tiny

pytestmark = [
  pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 virtual devices"),
  pytest.mark.usefixtures("ghost_norms_at_tiny_shapes"),  # the Gram path at test widths
]

T, N, RANK = 12, 32, 4
FAMILIES = {
  "llama": (False, {"rope_scaling": hf_tiny.LLAMA3_ROPE}),
  "gemma2": (True, {}),
  "qwen2": (True, {}),
}
# In the default run one case per family, between them LoRA and full, ghost and vmap;
# the other nine with -m slow.
DEFAULT = {("llama", "lora", "ghost"), ("gemma2", "full", "ghost"), ("qwen2", "lora", "vmap")}
CASES = [
  pytest.param(f, t, m, marks=() if (f, t, m) in DEFAULT else pytest.mark.slow)
  for f in FAMILIES
  for t in ("lora", "full")
  for m in ("ghost", "vmap")
]


def _random(tree, seed, scale=0.1):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(
    treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  )


def _task(family, tuning):
  tie, over = FAMILIES[family]
  cfg = hf.from_hf_config(hf_tiny.config(family, tie, **over), family, "float32")
  params = _random(init_params(cfg, jax.random.PRNGKey(0)), 1, scale=0.2)
  decoder = Decoder(cfg)
  if tuning == "lora":  # both factors random, so both get gradients; the base frozen in bf16
    lora = adapters.init_lora(params, jax.random.PRNGKey(2), rank=RANK, targets=r".*attn/(q|k|v|o)")
    trainable, loss = _random(lora, 3), lm_loss(decoder, float(RANK))
    frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  else:
    trainable, frozen, loss = params, {}, lm_loss(decoder)
  r = np.random.default_rng(0)
  lengths = r.integers(T // 2, T + 1, N)
  data = {
    "input_ids": hf_tiny.ids((N, T), 0),
    "attention_mask": (np.arange(T)[None] < lengths[:, None]).astype(np.int32),
    "loss_mask": (r.random((N, T)) > 0.3).astype(np.int32),
  }
  return Task(f"tiny-{family}", trainable, frozen, loss, data, {})


def _train(task, method, noise_seed=5, **devices):
  cfg = {
    "task": {"name": task.name},
    "noise_multiplier": 1.0,
    "target_epsilon": None,
    "batch_size": 8,
    "physical_batch_size": 8,
    "steps": 2,
    "clipping_method": method,
    "l2_clip_norm": 0.1,  # below the gradients' norms: clipping is in force
    "optimizer": "sgd",
    "learning_rate": 0.5,
    "noise_seed": noise_seed,
    **devices,
  }
  return train(cfg, task, None, progress=False)


def _max_diff(a, b):
  return max(
    float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


@pytest.mark.parametrize("family,tuning,method", CASES)
def test_the_step_on_a_data_by_model_mesh_equals_one_device(family, tuning, method, monkeypatch):
  task = _task(family, tuning)
  one = _train(task, method)
  placed = []  # what the loop placed with shard_params: the frozen base among it

  def spy(tree, mesh, *a):
    placed.append(shard_lib.param_sharding(tree, mesh, *a))
    return real(tree, mesh, *a)

  real = shard_lib.shard_params
  monkeypatch.setattr(shard_lib, "shard_params", spy)
  split = _train(task, method, data_devices=4, model_devices=2)
  assert any("model" in str(x.sharding.spec) for x in jax.tree.leaves(split.params))
  if tuning == "lora":  # the frozen base is split too, not replicated on every device
    frozen = [p for p in placed if jax.tree.structure(p) == jax.tree.structure(task.frozen)]
    assert frozen and all("model" in str(s.spec) for s in jax.tree.leaves(frozen[0]))
  moved = _max_diff(one.params, task.params)
  assert moved > 1e-3  # the steps did move the parameters
  assert _max_diff(one.params, split.params) < 1e-5 * max(1.0, moved) + 1e-6
  # Control: another noise seed moves them elsewhere, by far more than the tolerance.
  assert _max_diff(one.params, _train(task, method, noise_seed=6).params) > 100 * 1e-5


def test_one_devices_share_of_the_parameters_is_a_model_axis_fraction(tmp_path):
  """From the compiled step's memory analysis: arguments per device on a 2 x 4 mesh."""
  path = hf_tiny.preset_config(tmp_path)
  one = pm.plan_memory(path, lora_rank=RANK, batch=4, seq=16)
  split = pm.plan_memory(path, lora_rank=RANK, batch=4, seq=16, mesh=(2, 4))
  assert split["mesh"] == [2, 4] and "per device of a 2 x 4 (data x model) mesh" in pm.report(split)
  shapes = jax.eval_shape(
    lambda k: init_params(pm.decoder_config(path, "bfloat16"), k), jax.random.PRNGKey(0)
  )
  mesh = shard_lib.make_mesh(jax.devices()[:8], model=4)
  at = jax.tree.leaves(shard_lib.param_sharding(shapes, mesh))
  # bfloat16 leaves no dimension of which divides by 4 stay whole on every device
  replicated = sum(
    2 * int(np.prod(x.shape))
    for x, s in zip(jax.tree.leaves(shapes), at)
    if s.spec == jax.sharding.PartitionSpec()
  )
  assert split["device_frozen_bytes"] <= one["frozen_bytes"] / 4 + replicated
  assert split["device_trained_bytes"] <= one["trained_bytes"] / 4 + 8
  batch = 3 * 4 * 16 * 4  # input_ids, attention_mask, loss_mask: int32 [4, 16]
  for step in ("dp", "non_private"):
    # XLA's own count of one device's arguments: its parameter, state and batch slices
    args_one, args_split = one[step]["argument"], split[step]["argument"]
    assert args_split <= (args_one - batch) / 4 + replicated + batch / 2 + 64
    assert args_split >= (args_one - batch) / 4  # nothing is dropped
