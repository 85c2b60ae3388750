"""The text-classification task end to end on tiny local fixtures (no download)."""

import os

import jax
import numpy as np
import pytest

from dpjax.tasks import build_task
from dpjax.training.config import CONFIG_DIR, load_config
from dpjax.training.loop import train

torch = pytest.importorskip("torch", reason="torch (CPU) writes the tiny BERT fixture")
transformers = pytest.importorskip("transformers")

QUICKSTART = os.path.join(CONFIG_DIR, "quickstart.py")
WORDS = ["good", "great", "fine", "bad", "awful", "dull", "film", "plot", "the", "a"]


@pytest.fixture
def fixtures(tmp_path, tiny_bert):
  model_dir = tiny_bert(WORDS)
  rng = np.random.default_rng(0)
  lines = []
  for i in range(400):
    pos = i % 2 == 0
    words = list(rng.choice(WORDS[:3] if pos else WORDS[3:6], 2)) + list(rng.choice(WORDS[6:], 2))
    rng.shuffle(words)
    lines.append(f"{i}\t{'2.0' if pos else '-2.0'}\t{' '.join(words)} {i}")
  data_dir = tmp_path / "rt"
  data_dir.mkdir()
  (data_dir / "movieReviewSnippets_GroundTruth.txt").write_text("\n".join(lines) + "\n")
  return str(model_dir), str(data_dir)


# Private learning on the synthetic task runs by default (test_loop); this one
# builds the MiniLM-shaped encoder and is opt-in (-m slow).
@pytest.mark.parametrize(
  "train_layers", [pytest.param(0, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow)]
)
def test_private_text_classification_learns(fixtures, train_layers):
  model_dir, data_dir = fixtures
  cfg = load_config(
    QUICKSTART,
    [
      f"task.model='{model_dir}'",
      f"task.data='{data_dir}'",
      "task.max_length=8",
      f"task.train_layers={train_layers}",
      "steps=30",
      "batch_size=64",
      "physical_batch_size=64",
      "learning_rate=0.05",
      "target_epsilon=8.0",
    ],
  )
  task = build_task(cfg)
  assert set(task.params) == ({"classifier"} if train_layers == 0 else {"classifier", "layer_1"})
  result = train(cfg, task, None, progress=False)
  assert result.final_metrics["epsilon"] <= 8.0
  assert result.final_metrics["test_accuracy"] > 0.75  # sentiment words decide the label
  again = build_task(cfg)  # frozen features now come from the cache, identically
  np.testing.assert_array_equal(again.train["hidden"], task.train["hidden"])


def test_bad_model_path(fixtures):
  _, data_dir = fixtures
  cfg = load_config(QUICKSTART, ["task.model='/no/such/dir'", f"task.data='{data_dir}'"])
  with pytest.raises(FileNotFoundError, match="neither a known asset"):
    build_task(cfg)


def test_prefix_tuning_task_freezes_layers_and_removes_prefixes(fixtures):
  model_dir, data_dir = fixtures
  base = [
    f"task.model='{model_dir}'",
    f"task.data='{data_dir}'",
    "task.max_length=8",
    "task.train_layers=1",
    "steps=30",
    "batch_size=64",
    "physical_batch_size=64",
    "learning_rate=0.05",
    "target_epsilon=8.0",
  ]
  cfg = load_config(QUICKSTART, base + ["task.prefix_tokens=3"])
  task = build_task(cfg)
  assert set(task.params) == {"classifier", "prefix"} and set(task.frozen) == {"layer_1"}
  assert set(task.params["prefix"]) == {"layer_1"}
  assert task.params["prefix"]["layer_1"]["key"].shape == (3, 2, 8)  # [P, heads, head dim]
  result = train(cfg, task, None, progress=False)
  assert result.final_metrics["test_accuracy"] > 0.75
  # A removed prefix is no prefix: same logits as the plain model's frozen layer.
  off = build_task(
    load_config(QUICKSTART, base + ["task.prefix_tokens=3", "task.prefix_layers=[False]"])
  )
  assert off.params["prefix"] == {}
  plain = build_task(load_config(QUICKSTART, base))
  ex = jax.tree.map(lambda x: x[0], off.train)
  got, _ = off.loss_fn(off.params, ex, off.frozen)
  want, _ = plain.loss_fn(plain.params, ex, plain.frozen)
  assert float(got) == float(want)
