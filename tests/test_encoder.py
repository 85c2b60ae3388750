"""Our Flax encoder against transformers' PyTorch BERT/RoBERTa, same tiny random weights."""

import numpy as np
import pytest

from dpjax.models.encoder import Encoder
from dpjax.models.hf import load_encoder

torch = pytest.importorskip(
  "torch", reason="torch (CPU) is needed for logit parity: pip install -e '.[test]'"
)
transformers = pytest.importorskip("transformers")


def _tiny(model_type):
  kw = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=40,
    num_labels=3,
  )
  if model_type == "bert":
    cfg = transformers.BertConfig(**kw)
    return transformers.BertForSequenceClassification(cfg).eval()
  cfg = transformers.RobertaConfig(**kw, type_vocab_size=1, pad_token_id=1)
  return transformers.RobertaForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_logits_match_pytorch(tmp_path, model_type):
  torch.manual_seed(0)
  ref = _tiny(model_type)
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():  # every parameter random: biases and LayerNorms too
    for p in ref.parameters():
      p.copy_(0.2 * torch.randn(p.shape, generator=g))
  ref.save_pretrained(tmp_path)  # config.json + model.safetensors
  cfg, params = load_encoder(str(tmp_path), num_labels=3)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 97, (3, 11)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  mask[2, 4:] = 0
  ids[mask == 0] = ref.config.pad_token_id
  with torch.no_grad():
    out = ref(
      input_ids=torch.tensor(ids, dtype=torch.long),
      attention_mask=torch.tensor(mask, dtype=torch.long),
      output_hidden_states=True,
    )
  model = Encoder(cfg)
  logits = model.apply({"params": params}, ids, mask)
  np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=1e-4)
  hidden = model.apply({"params": params}, ids, mask, method=Encoder.hidden_states)
  valid = mask.astype(bool)
  assert np.max(np.abs(np.asarray(hidden)[valid] - out.hidden_states[-1].numpy()[valid])) < 1e-4


def test_missing_directory_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="model directory not found"):
    load_encoder(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_encoder(str(tmp_path))


def test_mean_l2_pooling_is_scaled_unit_norm():
  import jax.numpy as jnp

  from dpjax.models.encoder import EncoderConfig

  cfg = EncoderConfig(
    vocab_size=20,
    hidden_size=8,
    num_layers=1,
    num_heads=2,
    intermediate_size=16,
    pooling="mean_l2",
    pool_scale=3.0,
  )
  h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  pooled = Encoder(cfg).apply({"params": {}}, h, mask, method=Encoder.pool)
  mean0 = np.asarray(h[0, :3]).mean(0)
  np.testing.assert_allclose(pooled[0], 3.0 * mean0 / np.linalg.norm(mean0), rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), [3.0, 3.0], rtol=1e-5)
  with pytest.raises(ValueError, match="pool_scale must be > 0"):
    EncoderConfig(
      vocab_size=20, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16, pool_scale=0.0
    )


@pytest.mark.parametrize(
  "edit,match",
  [
    (
      lambda w: w.update({"bert.encoder.layer.0.attention.self.extra.weight": np.ones(2)}),
      "no place in the model",
    ),
    (lambda w: w.pop("bert.encoder.layer.1.output.dense.bias"), "missing .*layer_1"),
    (lambda w: w.update({"bert.pooler.dense.bias": np.ones(5, np.float32)}), "shapes differ"),
  ],
)
def test_a_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path, edit, match):
  from safetensors.numpy import load_file, save_file

  ref = _tiny("bert")
  ref.save_pretrained(tmp_path)
  path = tmp_path / "model.safetensors"
  weights = load_file(str(path))
  edit(weights)
  save_file(weights, str(path), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=match):
    load_encoder(str(tmp_path), num_labels=3)
