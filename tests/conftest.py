import os
import tempfile

import pytest

# Sharding tests need several devices; on CPU they are virtual. Must be set
# before jax is first imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same small steps: XLA's persistent compilation cache
# shares them between tests, workers and the subprocesses they start (~25 %
# of the default run). Keyed by the program and the jax version, so a stale
# entry is never used. JAX_COMPILATION_CACHE_DIR= (empty) in the environment turns it off.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(tempfile.gettempdir(), f"dpjax-tests-xla-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture
def ghost_norms_at_tiny_shapes(monkeypatch):
  """Ghost clipping's rule as at model scale: ghost norms unless T^2 > rows x cols.

  `ghost.materialise` also materialises a gradient no larger than the layer's
  inputs and output gradients, which at test widths (16-64, ~20 tokens) is every
  layer: the tests of the Gram path pin the memory-only rule to keep taking it.
  """
  from dpjax.core.clipping import ghost

  monkeypatch.setattr(ghost, "materialise", lambda t, rows, cols, held=None: t * t > rows * cols)


@pytest.fixture
def tiny_bert(tmp_path, monkeypatch):
  """A writer of a tiny random BERT (2 layers, width 16) with a word-level vocab: dir path.

  Sets DPJAX_HOME to a fresh directory (the frozen-feature cache). Needs torch.
  """
  torch = pytest.importorskip("torch", reason="torch (CPU) writes the tiny BERT fixture")
  transformers = pytest.importorskip("transformers")
  monkeypatch.setenv("DPJAX_HOME", str(tmp_path / "home"))

  def write(words):
    model_dir = tmp_path / "bert"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
      vocab_size=len(vocab),
      hidden_size=16,
      num_hidden_layers=2,
      num_attention_heads=2,
      intermediate_size=24,
      max_position_embeddings=32,
    )
    transformers.BertModel(cfg).save_pretrained(model_dir)
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(vocab=str(tmp_path / "vocab.txt")).save_pretrained(model_dir)
    return str(model_dir)

  return write
