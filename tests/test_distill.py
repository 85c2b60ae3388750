"""DistilDP pieces: the distillation loss, the DP label histogram, budget report, generation."""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib

from dpjax.core import accounting
from dpjax.models.decoder import Decoder, DecoderConfig
from dpjax.models.decoder import init_params as init_decoder
from dpjax.pipelines import distill

CFG = DecoderConfig(
  family="llama",
  vocab_size=40,
  hidden_size=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  intermediate_size=48,
  rope_theta=100.0,
  pad_token_id=0,
  eos_token_id=1,
)


def _batch(seed=0, B=3, T=7):
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(2, 40, (B, T)), jnp.int32)
  mask = np.ones((B, T), np.int32)
  mask[0, :2] = 0  # left padding
  mask[min(1, B - 1), -3:] = 0  # right padding
  return ids, jnp.asarray(mask)


def _logits(params, ids, mask, cfg=CFG):
  return Decoder(cfg).apply({"params": params}, ids, mask, return_hidden=True)


def test_kl_is_zero_when_student_is_teacher_and_ce_matches_causal_loss():
  from dpjax.models.decoder import causal_lm_loss

  params = init_decoder(CFG, jax.random.PRNGKey(0))
  ids, mask = _batch()
  logits, _, hidden = _logits(params, ids, mask)
  loss, parts = distill.distillation_loss(
    logits,
    logits,
    ids,
    mask,
    lam=0.4,
    alpha=1.0,
    student_hidden=hidden[-1],
    teacher_hidden=hidden[-1],
  )
  assert float(parts["kl"]) == pytest.approx(0.0, abs=1e-6)
  assert float(parts["mse"]) == 0.0
  total, count = causal_lm_loss(logits, ids, mask, reduction="sum")
  ce = float(jnp.sum(total) / jnp.sum(count))  # token mean over the batch
  assert float(parts["ce"]) == pytest.approx(ce, rel=1e-6)
  assert float(loss) == pytest.approx(0.6 * ce, rel=1e-6)


def test_kl_matches_a_direct_computation_with_temperature():
  rng = np.random.default_rng(1)
  s = jnp.asarray(rng.normal(size=(2, 5, 40)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(2, 5, 40)), jnp.float32)
  ids, mask = _batch(B=2, T=5)
  T = 2.0
  loss, parts = distill.distillation_loss(s, t, ids, mask, lam=0.5, temperature=T)
  ps = np.asarray(jax.nn.softmax(s / T, -1))[:, :-1]
  pt = np.asarray(jax.nn.softmax(t / T, -1))[:, :-1]
  kl = np.sum(pt * (np.log(pt) - np.log(ps)), -1)
  w = np.asarray(mask[:, 1:] * mask[:, :-1], np.float64)
  assert float(parts["kl"]) == pytest.approx(np.sum(kl * w) / w.sum(), rel=1e-5)
  assert float(loss) == pytest.approx(
    0.5 * float(parts["ce"]) + 0.5 * T * T * float(parts["kl"]), rel=1e-6
  )


def test_masked_positions_do_not_change_the_loss():
  rng = np.random.default_rng(2)
  s = rng.normal(size=(3, 7, 40)).astype(np.float32)
  t = rng.normal(size=(3, 7, 40)).astype(np.float32)
  hs, ht = rng.normal(size=(3, 7, 16)), rng.normal(size=(3, 7, 16))
  ids, mask = _batch()
  proj = distill.init_projection(jax.random.PRNGKey(0), 16, 16)
  kw = dict(lam=0.4, alpha=0.3, projection=lambda h: distill.apply_projection(proj, h))
  base, _ = distill.distillation_loss(
    jnp.asarray(s),
    jnp.asarray(t),
    ids,
    mask,
    student_hidden=jnp.asarray(hs),
    teacher_hidden=jnp.asarray(ht),
    **kw,
  )
  pad = np.asarray(mask) == 0
  s2, t2, hs2 = s.copy(), t.copy(), hs.copy()
  s2[pad] += 50.0
  t2[pad] -= 30.0
  hs2[pad] = 1e3
  ids2 = np.where(pad, 5, np.asarray(ids))
  other, _ = distill.distillation_loss(
    jnp.asarray(s2),
    jnp.asarray(t2),
    jnp.asarray(ids2),
    mask,
    student_hidden=jnp.asarray(hs2),
    teacher_hidden=jnp.asarray(ht),
    **kw,
  )
  assert float(other) == pytest.approx(float(base), rel=1e-6)
  # ... while a change at a real position does change it.
  s3 = s.copy()
  s3[2, 3, 7] += 5.0  # one logit (a shift of all logits is softmax-invariant)
  changed, _ = distill.distillation_loss(
    jnp.asarray(s3),
    jnp.asarray(t),
    ids,
    mask,
    student_hidden=jnp.asarray(hs),
    teacher_hidden=jnp.asarray(ht),
    **kw,
  )
  assert abs(float(changed) - float(base)) > 1e-4


def test_loss_errors():
  s = jnp.zeros((1, 4, 40))
  ids, mask = _batch(B=1, T=4)
  with pytest.raises(ValueError, match="differ"):
    distill.distillation_loss(s, jnp.zeros((1, 4, 41)), ids, mask)
  with pytest.raises(ValueError, match="needs student_hidden"):
    distill.distillation_loss(s, s, ids, mask, alpha=1.0)
  with pytest.raises(ValueError, match="pass a projection"):
    distill.distillation_loss(
      s,
      s,
      ids,
      mask,
      alpha=1.0,
      student_hidden=jnp.zeros((1, 4, 8)),
      teacher_hidden=jnp.zeros((1, 4, 16)),
    )
  with pytest.raises(ValueError, match="lam"):
    distill.distillation_loss(s, s, ids, mask, lam=1.5)


def test_histogram_noise_meets_its_epsilon_and_counts_sum():
  sigma = distill.histogram_noise("gaussian", 1.0, 1e-6)
  one = pld_lib.from_gaussian_mechanism(sigma, value_discretization_interval=1e-4)
  assert one.get_epsilon_for_delta(1e-6) <= 1.0 + 1e-9
  assert (
    pld_lib.from_gaussian_mechanism(
      sigma * 0.99, value_discretization_interval=1e-4
    ).get_epsilon_for_delta(1e-6)
    > 1.0 - 0.01
  )
  assert distill.histogram_noise("laplace", 0.5, 0.0) == 2.0
  labels = ["a"] * 700 + ["b"] * 200 + ["c"] * 100
  h = distill.dp_label_histogram(labels, ["a", "b", "c"], 1.0, 1e-6, rng=np.random.default_rng(0))
  assert h["counts"]["a"] == pytest.approx(700, abs=6 * sigma)
  assert sum(h["proportions"].values()) == pytest.approx(1.0)
  counts = distill.prompt_counts(h["proportions"], 101)
  assert sum(counts.values()) == 101 and counts["a"] > counts["b"] > counts["c"]
  with pytest.raises(ValueError, match="outside the declared classes"):
    distill.dp_label_histogram(["z"], ["a"], 1.0, 1e-6)
  with pytest.raises(ValueError):
    distill.histogram_noise("gaussian", 0.0, 1e-6)


def test_budget_report_charges_only_teacher_and_histogram():
  teacher = [accounting.dpsgd_event(1.1, 0.05, 200)]
  h = {"mechanism": "gaussian", "noise": 20.0}
  rep = distill.budget_report(teacher, h, 1e-5)
  assert rep["generation"] == 0.0 and rep["student"] == 0.0
  assert rep["teacher"] == pytest.approx(accounting.epsilon_spent(1.1, 0.05, 200, 1e-5), rel=1e-9)
  # Independent: dp-accounting's PLD accountant over both events.
  acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
  acc.compose(accounting.dpsgd_event(1.1, 0.05, 200))
  acc.compose(dp_accounting.GaussianDpEvent(20.0))
  assert rep["total"] == pytest.approx(acc.get_epsilon(1e-5), rel=0.01)
  assert rep["total"] > rep["teacher"]
  no_hist = distill.budget_report(teacher, None, 1e-5)
  assert no_hist["total"] == pytest.approx(no_hist["teacher"], rel=1e-9)


def test_synthesize_is_reproducible_and_follows_counts():
  params = init_decoder(CFG, jax.random.PRNGKey(3))
  prompts = {"x": [5, 6, 7], "y": [8, 9]}
  counts = {"x": 3, "y": 2}
  kw = dict(batch_size=2, max_new_tokens=6, top_k=10, top_p=0.9, progress=False)
  a = distill.synthesize(CFG, params, prompts, counts, jax.random.PRNGKey(0), **kw)
  b = distill.synthesize(CFG, params, prompts, counts, jax.random.PRNGKey(0), **kw)
  c = distill.synthesize(CFG, params, prompts, counts, jax.random.PRNGKey(1), **kw)
  assert a["label"] == ["x", "x", "x", "y", "y"]
  assert a["tokens"] == b["tokens"]
  assert a["tokens"] != c["tokens"]
  assert all(len(t) <= 6 and 1 not in t for t in a["tokens"])
  assert a["tokens_per_s"] > 0
  with pytest.raises(ValueError, match="no prompt"):
    distill.synthesize(CFG, params, prompts, {"z": 1}, jax.random.PRNGKey(0), **kw)


PLAY = """THE TRAGEDY OF TESTING

ACT I.

Scene I. A platform.

{speeches}
THE END
"""


def _fixture_plays(tmp_path):
  rng = np.random.default_rng(0)
  words = ["night", "king", "sword", "love", "fair", "cold", "crown", "ghost"]
  for play in ("hamlet", "tempest", "henry_v"):
    speeches = ""
    for i in range(60):
      who = ["Ber.", "Fran.", "Hor.", "Mar.", "First Clown."][i % 5]
      line = " ".join(rng.choice(words, 6))
      speeches += f"{who}\n{line.capitalize()}.\n\n"
    (tmp_path / f"{play}_gut.txt").write_text(PLAY.format(speeches=speeches))
  return str(tmp_path)


@pytest.mark.slow
def test_pipeline_spends_only_teacher_and_histogram_and_resumes(tmp_path):
  from dpjax.training.config import load_config

  cfg = load_config("configs/distil_shakespeare.py")
  (tmp_path / "plays").mkdir()
  data = _fixture_plays(tmp_path / "plays")
  tiny = dict(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
  cfg.teacher.task.update(
    data=data, seq_len=24, pretrain_steps=0, max_eval=32, heldout_fraction=0.3, model=tiny
  )
  cfg.teacher.update(
    steps=3, batch_size=32, physical_batch_size=32, log_every=3, checkpoint_every=3
  )
  cfg.generation.update(num_samples=10, batch_size=4)
  cfg.student.update(model=dict(tiny, num_layers=1), steps=2, batch_size=4)
  run_dir = str(tmp_path / "run")
  rep = distill.run(cfg, run_dir, progress=False)
  b = rep["budget"]
  assert b["total"] <= cfg.total_epsilon and b["total"] > 0.9 * cfg.total_epsilon
  assert b["generation"] == 0.0 and b["student"] == 0.0
  assert 0 < b["histogram"] <= 0.1 + 1e-9 and b["teacher"] < b["total"]
  import datasets

  syn = datasets.load_from_disk(f"{run_dir}/synthetic")
  assert len(syn) == rep["synthetic_samples"] == 10
  assert set(syn["label"]) <= {"comedy", "history", "romance", "tragedy"}
  assert np.isfinite(rep["student_test_perplexity"]) and rep["student_test_perplexity"] > 1
  # A second call (given the teacher task prebuilt) skips every finished
  # stage and reports the same.
  from dpjax.tasks import build_task

  mtime = (tmp_path / "run" / "synthetic_info.json").stat().st_mtime
  again = distill.run(cfg, run_dir, progress=False, task=build_task(cfg.teacher))
  assert (tmp_path / "run" / "synthetic_info.json").stat().st_mtime == mtime
  assert again["student_test_perplexity"] == pytest.approx(rep["student_test_perplexity"])


@pytest.mark.slow
def test_pipeline_with_a_gguf_teacher(tmp_path):
  """The same pipeline with a pretrained GGUF decoder and its BPE tokenizer (SmolLM2's path)."""
  pytest.importorskip("torch")
  from dpjax.training.config import load_config
  from tests import hf_tiny
  from tests.test_gguf import write_gguf

  ref = hf_tiny.model("llama", vocab_size=264, hidden_size=64, num_attention_heads=4)
  path = tmp_path / "teacher.gguf"
  write_gguf(path, ref)
  (tmp_path / "plays").mkdir()
  cfg = load_config("configs/distil_shakespeare.py")
  import ml_collections

  task = dict(
    cfg.teacher.task.to_dict(),
    data=_fixture_plays(tmp_path / "plays"),
    model=str(path),
    seq_len=24,
    max_eval=16,
    heldout_fraction=0.3,
  )
  cfg.teacher.task = ml_collections.ConfigDict(task)
  cfg.teacher.update(
    steps=2, batch_size=16, physical_batch_size=16, log_every=2, checkpoint_every=2
  )
  cfg.generation.update(num_samples=6, batch_size=3)
  cfg.student.update(model=dict(num_layers=1), steps=2, batch_size=3)
  rep = distill.run(cfg, str(tmp_path / "run"), progress=False)
  assert rep["budget"]["total"] <= cfg.total_epsilon
  assert np.isfinite(rep["student_test_perplexity"])
  import datasets

  syn = datasets.load_from_disk(str(tmp_path / "run" / "synthetic"))
  assert len(syn) == 6 and all(ids[0] == 1 for ids in syn["input_ids"])  # BOS, then the code
