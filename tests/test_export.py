"""Export of every decoder family to a Hugging Face directory: transformers' logits of the export
equal dpjax's, and the directory loads back to the same config and tree."""

import dataclasses

import jax
import numpy as np
import pytest

from dpjax.models import hf, hf_export
from dpjax.models.decoder import Decoder, DecoderConfig, init_params

torch = pytest.importorskip("torch", reason="torch (CPU) runs the exported model")
transformers = pytest.importorskip("transformers")
from tests import hf_tiny  # noqa: E402

CASES = [
  ("llama", False, "llama"),
  pytest.param("llama", True, "llama", marks=pytest.mark.slow),
  ("mistral", False, "mistral"),
  pytest.param("qwen2", True, "qwen2", marks=pytest.mark.slow),
  ("qwen3", False, "qwen3"),
  ("phi3", False, "mistral"),  # the Llama layout of its fused projections
  pytest.param("gemma", True, "gemma", marks=pytest.mark.slow),
  ("gemma2", True, "gemma2"),
  ("gemma3", False, "gemma3_text"),
  ("gpt2", True, "gpt2"),
]


def _moved(params, seed=1):
  """`params` plus noise, so an export of the unchanged checkpoint could not pass."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(
    tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )


@pytest.mark.parametrize("family,tie,kind", CASES)
def test_export_of_every_family_runs_the_same_in_transformers(tmp_path, family, tie, kind):
  hf_tiny.model(family, tie).save_pretrained(tmp_path / "src")
  cfg, params = hf.load_decoder(str(tmp_path / "src"))
  params = _moved(params)
  assert hf_export.export_type(cfg) == kind
  out = hf_export.export_decoder(cfg, params, str(tmp_path / "out"))
  ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert ref.config.model_type == kind
  ids = hf_tiny.ids((2, 12))
  got, _ = Decoder(cfg).apply({"params": params}, ids)
  assert np.max(np.abs(np.asarray(got) - hf_tiny.logits(ref, ids))) < 1e-4
  back_cfg, back = hf.load_decoder(out)
  assert back_cfg == cfg
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(back) == jax.tree.structure(params)


def test_hand_made_configs_export_with_their_defaults_written_out(tmp_path):
  cfg = DecoderConfig(
    family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
    intermediate_size=48, max_position=32,
  )  # fmt: skip
  params = init_params(cfg, jax.random.PRNGKey(0))
  out = hf_export.export_decoder(cfg, params, str(tmp_path / "out"))
  back = hf.decoder_config(out)
  assert (back.act, back.kv_heads, back.dim_per_head, back.bias) == ("silu", 4, 8, False)
  ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = np.arange(3, 11, dtype=np.int32)[None]
  got, _ = Decoder(cfg).apply({"params": params}, ids)
  assert np.max(np.abs(np.asarray(got) - hf_tiny.logits(ref, ids))) < 1e-4


def test_what_transformers_cannot_express_is_refused_before_writing(tmp_path):
  # Qwen3's q/k norms with Gemma's offset norms but no sandwich: no transformers class has it.
  cfg = DecoderConfig(
    family="llama", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
    intermediate_size=48, qk_norm=True, norm_offset=1.0, embed_scale=True,
  )  # fmt: skip
  params = init_params(cfg, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="cannot express this decoder's \\['qk_norm'\\]"):
    hf_export.export_decoder(cfg, params, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  extra = dict(params, prefix={"kv": np.zeros((2, 2), np.float32)})
  with pytest.raises(ValueError, match="parameter prefix/kv has no Hugging Face name"):
    hf_export.to_hf_weights(dataclasses.replace(cfg, qk_norm=False), extra)
