"""`dpjax plan-memory`: the compiled step's memory and FLOPs on shapes, never on weights."""

import jax
import numpy as np
import pytest

from dpjax import cli
from dpjax.models.decoder import init_params
from dpjax.pipelines import plan_memory as pm
from tests import hf_tiny

# Parameter counts of the public models the presets describe (their model cards / the
# safetensors index of each checkpoint): an independent check of every shape in a preset.
PUBLISHED = {
  "llama-3.2-1b": 1_235_814_400,
  "llama-3.1-8b": 8_030_261_248,
  "gemma-2-2b": 2_614_341_888,
  "qwen2.5-7b": 7_615_616_512,
}


def _count(cfg) -> int:
  shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_preset_has_the_published_parameter_count(name):
  assert name in pm.preset_names()
  assert _count(pm.decoder_config(name, "bfloat16")) == PUBLISHED[name]


def test_the_lora_step_is_compiled_on_shapes_with_a_bfloat16_base(tmp_path):
  r = pm.plan_memory(hf_tiny.preset_config(tmp_path), lora_rank=4, batch=2, seq=16)
  cfg = pm.decoder_config(hf_tiny.preset_config(tmp_path), "bfloat16")
  n = _count(cfg)
  assert r["parameters"] == n and r["frozen_bytes"] == 2 * n  # bfloat16: two bytes each
  # LoRA r4 on q, k, v, o of 2 layers: (64 + out) * 4 float32 values per projection
  outs = {"q": 64, "k": 32, "v": 32, "o": 64}
  assert r["trained"] == 2 * sum((64 + o) * 4 for o in outs.values())
  assert r["trained_bytes"] == 4 * r["trained"]
  for step in (r["dp"], r["non_private"]):
    # the compiled step's arguments hold the weights, the optimizer state and the batch
    assert step["argument"] >= r["trained_bytes"] + r["frozen_bytes"] + step["optimizer_state"]
    assert step["peak"] >= step["argument"] and step["flops"] > 0
  assert r["dp"]["optimizer_state"] > r["non_private"]["optimizer_state"]  # + the noise key
  text = pm.report(r, pm.parse_size("1KiB"))
  assert "does NOT fit a 1.00 KiB device" in text and "leave headroom" in text


def test_bad_plan_memory_input_is_one_line_before_compiling(tmp_path, capsys):
  n = jax.device_count()  # JAX has started: no virtual devices are made any more
  for argv, msg in [
    (["plan-memory", "llama-9b"], "is neither a preset (gemma-2-2b, llama-3.1-8b"),
    (["plan-memory", "llama-3.2-1b", "--device-memory", "16 parsecs"], "must look like 16GiB"),
    (["plan-memory", "llama-3.2-1b", "--batch", "0"], "batch must be >= 1"),
    (["plan-memory", "llama-3.2-1b", "--mesh", "0x2"], "--mesh must be DATAxMODEL with both >= 1"),
    (["plan-memory", "llama-3.2-1b", "--mesh", "8"], "--mesh must be DATAxMODEL"),
    (["plan-memory", "llama-3.2-1b", "--batch", "3", "--mesh", "2x1"], "batch 3 must divide"),
    (["plan-memory", "llama-3.2-1b", "--mesh", "4x4"], f"needs 16 devices; this process has {n}"),
  ]:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], (argv, err)
  assert pm.parse_size("16GiB") == 16 * 2**30 and pm.parse_size("80 GB") == 80 * 10**9
