"""The causal_lm task: own text/JSONL data, completion-only loss, LoRA from the CLI."""

import json
import os

import jax
import numpy as np
import pytest

from dpjax.cli import main
from dpjax.models.decoder import Decoder
from dpjax.tasks import build_task
from dpjax.tasks.causal_lm import read_examples
from dpjax.training.config import CONFIG_DIR, load_config

torch = pytest.importorskip("torch", reason="torch builds the tiny checkpoint")
transformers = pytest.importorskip("transformers")

CONFIG = os.path.join(CONFIG_DIR, "lm_lora.py")
WORDS = "the a king queen speaks loud soft and night day comes goes to of my lord".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  from tokenizers import Tokenizer, models, pre_tokenizers

  path = tmp_path_factory.mktemp("tiny-llama")
  vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
  )
  fast.save_pretrained(path)
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
    vocab_size=len(vocab),
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
  )
  transformers.LlamaForCausalLM(cfg).save_pretrained(path)
  return str(path)


def _sentences(n, seed=0):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, rng.integers(3, 8))) for _ in range(n)]


def _jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def _cfg(model_dir, data, **over):
  cfg = load_config(CONFIG)
  cfg.task.model, cfg.task.data, cfg.task.seq_len = model_dir, data, 16
  cfg.task.dev_fraction, cfg.task.max_eval = 0.2, 16
  cfg.batch_size, cfg.physical_batch_size, cfg.steps, cfg.log_every = 8, 16, 3, 3
  for k, v in over.items():
    cfg[k] = v
  return cfg


def test_completion_only_loss(model_dir, tmp_path):
  rows = [{"prompt": p, "completion": c} for p, c in zip(_sentences(40), _sentences(40, 1))]
  task = build_task(_cfg(model_dir, _jsonl(tmp_path / "pc.jsonl", rows)))
  ex = {k: v[0] for k, v in task.train.items()}
  ids, mask, lm = ex["input_ids"], ex["attention_mask"], ex["loss_mask"]
  n_prompt = int(np.argmax(lm))  # BOS + prompt tokens come before the first counted one
  assert n_prompt > 1 and lm[:n_prompt].sum() == 0 and lm.sum() > 0
  assert np.all(lm <= mask) and ids[int(mask.sum()) - 1] == 2  # ends with EOS, counted
  loss, metrics = task.loss_fn(task.params, ex, task.frozen)
  from dpjax.models import adapters

  with adapters.lora(task.params, alpha=16):
    logits, _ = Decoder(task.info["decoder"]).apply({"params": task.frozen}, ids[None])
  logp = jax.nn.log_softmax(logits[0], -1)
  targets = [t for t in range(1, int(mask.sum())) if lm[t]]
  want = -np.mean([float(logp[t - 1, ids[t]]) for t in targets])
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(metrics["tokens"]) == len(targets)


def test_bad_rows_are_refused_with_their_line(tmp_path):
  with pytest.raises(ValueError, match=r"bad.jsonl:2: needs 'text', or 'prompt' and 'completion'"):
    read_examples(_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"prompt": "b"}]))
  with pytest.raises(ValueError, match="mixes 'text' rows"):
    read_examples(
      _jsonl(tmp_path / "mix.jsonl", [{"text": "a"}, {"prompt": "b", "completion": "c"}])
    )
  with pytest.raises(ValueError, match="must be a .txt or .jsonl"):
    read_examples(str(_jsonl(tmp_path / "x.csv", [{"text": "a"}])))


@pytest.mark.parametrize("unit", ["example", pytest.param("user", marks=pytest.mark.slow)])
def test_cli_lora_run_reports_privacy_and_perplexity(model_dir, tmp_path, capsys, unit):
  users = [{"text": s, "user_id": f"u{i % 20}"} for i, s in enumerate(_sentences(120))]
  data = _jsonl(tmp_path / "d.jsonl", users)
  sets = [
    f"task.model={model_dir}",
    f"task.data={data}",
    "task.seq_len=16",
    "task.dev_fraction=0.2",
    "batch_size=16",
    "physical_batch_size=16",
    "steps=3",
    "log_every=3",
    f"privacy_unit={unit}",
  ]
  if unit == "user":
    sets += ["users_per_step=4", "max_examples_per_user=4"]
  work = tmp_path / "run"
  argv = ["train", CONFIG, "--no-progress", "--workdir", str(work)]
  assert main(argv + sum((["--set", s] for s in sets), [])) == 0
  out = capsys.readouterr().out
  summary = json.loads(out.splitlines()[0])
  assert summary["dev_perplexity_before"] > 1 and summary["dev_perplexity"] > 1
  assert 0 < summary["epsilon"] <= 3.0 and summary["privacy_unit"] == unit
  assert "samples (prompt | greedy continuation):" in out
  assert (work / "samples.txt").read_text().count("|") == 3
  params = json.load(open(work / "privacy.json"))
  assert params["privacy_unit"] == unit


@pytest.mark.parametrize("lora", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_export_round_trips_through_transformers(model_dir, tmp_path, lora):
  import ml_collections

  from dpjax.models import hf, hf_export
  from dpjax.tasks.causal_lm import base_model, merged_params
  from dpjax.training.rundir import load_trained

  data = _jsonl(tmp_path / "d.jsonl", [{"text": s} for s in _sentences(60)])
  work, out = tmp_path / "run", tmp_path / "hf"
  sets = [f"task.model={model_dir}", f"task.data={data}", "task.seq_len=16", "batch_size=16"]
  sets += ["physical_batch_size=16", "steps=2", "log_every=2", "learning_rate=0.05"]
  if not lora:
    sets.append("task.lora=None")
  argv = ["train", CONFIG, "--no-progress", "--workdir", str(work)]
  assert main(argv + sum((["--set", s] for s in sets), [])) == 0
  assert main(["export", str(work), "--to", "hf", str(out)]) == 0
  t = ml_collections.ConfigDict(json.load(open(work / "config.json"))["task"])
  _, mcfg, base = base_model(t)
  merged = merged_params(t, base, load_trained(str(work)))
  moved = max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(base))
  )
  assert moved > 1e-4  # the export carries what training changed
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  ids = np.asarray([[1, 5, 9, 7, 11, 4, 6, 2]], np.int32)
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  got, _ = Decoder(mcfg).apply({"params": merged}, ids)
  assert np.max(np.abs(np.asarray(got) - want)) < 1e-4
  tok = transformers.AutoTokenizer.from_pretrained(str(out))
  assert tok("the king speaks")["input_ids"][-3:] == [
    4 + WORDS.index(w) for w in ("the", "king", "speaks")
  ]
  reloaded = hf.convert(hf_export.to_hf_weights(mcfg, merged), hf.LLAMA_RULES)
  assert jax.tree.structure(reloaded) == jax.tree.structure(merged)
  for a, b in zip(jax.tree.leaves(reloaded), jax.tree.leaves(merged)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)
  with pytest.raises(FileExistsError):
    hf_export.export_decoder(mcfg, merged, str(out))
  # What servers and the hub read: the class, the generation ids, the card with the guarantee
  # of the run's privacy.json, and that record itself.
  assert json.load(open(out / "config.json"))["architectures"] == ["LlamaForCausalLM"]
  generation = json.load(open(out / "generation_config.json"))
  assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
  privacy = json.load(open(work / "privacy.json"))
  assert json.load(open(out / "privacy.json")) == privacy
  card = (out / "README.md").read_text()
  assert f"({privacy['epsilon']:.4g}, {privacy['delta']:g})-differential privacy per example" in (
    card
  )
  assert "| 0 | gaussian |" in card and privacy["assumes"] in card
  if not lora:
    assert main(["export", str(work), "--adapter", str(tmp_path / "no")]) == 2
    return
  # The PEFT adapter: loaded onto the base checkpoint by peft, the same logits as the merged
  # export.
  peft = pytest.importorskip("peft")
  adapter = tmp_path / "adapter"
  assert main(["export", str(work), "--adapter", str(adapter)]) == 0
  assert json.load(open(adapter / "privacy.json")) == privacy
  base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
  tuned = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
  with torch.no_grad():
    via_peft = tuned(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  assert np.max(np.abs(via_peft - want)) < 1e-4
  base_logits = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
  with torch.no_grad():
    before = base_logits(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  assert np.max(np.abs(via_peft - before)) > 1e-3  # the adapter carries the training


@pytest.mark.slow  # bf16 clipping stays in the default run (test_ghost)
def test_bfloat16_compute_keeps_float32_weights(model_dir, tmp_path):
  from dpjax.training.loop import train

  data = _jsonl(tmp_path / "t.jsonl", [{"text": s} for s in _sentences(64)])
  runs = {}
  for dtype in ("float32", "bfloat16"):
    cfg = _cfg(model_dir, data, noise_seed=3, clipping_method="ghost")
    cfg.task.dtype = dtype
    cfg.task.frozen_dtype = "float32"  # the compute dtype alone (storage: the test above)
    task = build_task(cfg)
    assert task.info["decoder"].dtype == dtype
    ex = {k: v[0] for k, v in task.train.items()}
    jaxpr = str(jax.make_jaxpr(lambda p: task.loss_fn(p, ex, task.frozen)[0])(task.params))
    assert ("bf16" in jaxpr) == (dtype == "bfloat16")  # the matmuls run in the compute dtype
    runs[dtype] = train(cfg, task, None, progress=False)
    leaves = jax.tree.leaves(runs[dtype].params)
    assert leaves and all(x.dtype == np.float32 for x in leaves)  # master weights
  f32, bf16 = runs["float32"], runs["bfloat16"]
  assert bf16.final_metrics["epsilon"] == f32.final_metrics["epsilon"]
  assert bf16.final_metrics["dev_loss"] == pytest.approx(f32.final_metrics["dev_loss"], rel=0.02)
  for a, b in zip(jax.tree.leaves(f32.params), jax.tree.leaves(bf16.params)):
    scale = float(np.max(np.abs(np.asarray(a)))) or 1.0
    assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) <= 0.05 * scale

  cfg = _cfg(model_dir, data)
  cfg.task.dtype = "float16"
  with pytest.raises(ValueError, match="task.dtype must be 'float32' or 'bfloat16'.*got 'float16'"):
    build_task(cfg)


def test_a_hub_model_id_is_a_snapshot_and_offline_is_one_line(
  model_dir, tmp_path, capsys, monkeypatch
):
  # `task.model=org/name@revision` downloads a snapshot through huggingface_hub (never the
  # network here: the download is replaced by the tiny checkpoint's directory).
  import huggingface_hub

  from dpjax.tasks.pretrained import HUB_FILES

  calls = []

  def snapshot(repo, revision=None, allow_patterns=None):
    calls.append((repo, revision, tuple(allow_patterns)))
    return model_dir

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
  data = _jsonl(tmp_path / "d.jsonl", [{"text": s} for s in _sentences(60)])
  sets = ["task.model=org/tiny-llama@0123abc", f"task.data={data}", "task.seq_len=16"]
  sets += ["batch_size=8", "physical_batch_size=16", "steps=2", "log_every=2"]
  argv = ["train", CONFIG, "--no-progress", "--workdir", str(tmp_path / "run")]
  assert main(argv + sum((["--set", s] for s in sets), [])) == 0
  assert calls == [("org/tiny-llama", "0123abc", HUB_FILES)]

  def offline(repo, revision=None, allow_patterns=None):
    raise huggingface_hub.errors.LocalEntryNotFoundError(
      "Cannot find the requested files in the local cache."
    )

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  capsys.readouterr()
  sets[0] = "task.model=org/not-cached"
  argv = ["train", CONFIG, "--no-progress", "--workdir", str(tmp_path / "run2")]
  assert main(argv + sum((["--set", s] for s in sets), [])) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert "'org/not-cached' is not a local path" in err[0] and "HF_HUB_OFFLINE is set" in err[0]
  assert not (tmp_path / "run2").exists() or not any((tmp_path / "run2").iterdir())


def test_lora_base_weights_are_stored_in_bfloat16_at_half_the_bytes_with_the_same_loss(
  model_dir, tmp_path
):
  # task.frozen_dtype (bfloat16 by default): the base model's weights, never trained with
  # LoRA, are stored in bfloat16; the factors stay float32. The loss equals the float32 base's
  # within bfloat16's rounding; the compiled loss takes half the frozen bytes; ghost clipping's
  # LoRA rule gives the vmap sum on the bfloat16 base.
  from dpjax.core.clipping import clipped_grad

  data = _jsonl(tmp_path / "d.jsonl", [{"text": s} for s in _sentences(40)])
  tasks = {}
  for dtype in ("float32", "bfloat16"):
    cfg = _cfg(model_dir, data)
    cfg.task.frozen_dtype = dtype
    tasks[dtype] = build_task(cfg)
  f32, bf16 = tasks["float32"], tasks["bfloat16"]
  assert {str(x.dtype) for x in jax.tree.leaves(bf16.frozen)} == {"bfloat16"}
  assert {str(x.dtype) for x in jax.tree.leaves(bf16.params)} == {"float32"}
  ex = {k: v[0] for k, v in bf16.train.items()}
  loss32, _ = f32.loss_fn(f32.params, ex, f32.frozen)
  loss16, _ = bf16.loss_fn(bf16.params, ex, bf16.frozen)
  assert float(loss16) == pytest.approx(float(loss32), rel=1e-2)
  assert float(loss16) != float(loss32)  # the base really is rounded

  def argument_bytes(task):
    compiled = jax.jit(task.loss_fn).lower(task.params, ex, task.frozen).compile()
    return compiled.memory_analysis().argument_size_in_bytes

  frozen32 = sum(x.nbytes for x in jax.tree.leaves(f32.frozen))
  assert argument_bytes(f32) - argument_bytes(bf16) == frozen32 // 2

  batch = {k: v[:4] for k, v in bf16.train.items()}
  sums = {}
  for method in ("vmap", "ghost"):
    fn = clipped_grad(bf16.loss_fn, has_aux=True, l2_clip_norm=0.01, method=method)
    sums[method], _ = fn(bf16.params, batch, bf16.frozen)
  for a, b in zip(jax.tree.leaves(sums["ghost"]), jax.tree.leaves(sums["vmap"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
