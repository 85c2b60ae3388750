"""The LLM, own-data and scaling guides' commands run end to end as written, at small steps.

docs/lora.md and docs/own-data.md name the user's data and model by placeholders
(`my.jsonl`, `/path/to/hf_dir`, `my.csv`, `RUN_DIR`, `OUT_DIR`). Each command is read
from the guide, its placeholders replaced by tiny stand-ins written here (a random
Llama and BERT, a few hundred rows), a few `--set` keys appended for small steps and
a tiny model, and run by the CLI in order, so an export runs on the guide's own
training run. Needs torch, which the guides install (`.[llm]`): skipped without it,
and run by `.ci/run` once the extras are in. The commands on the shipped assets (the
quickstart's, the user-level guide's) are validated by `test_docs_commands.py`, and
the quickstart runs whole in the notebook CI executes; `--distributed` needs hosts.
"""

import os
import shlex

import pytest

pytest.importorskip("torch", reason="torch (the guides' llm extra) writes the tiny models")

from dpjax import cli  # noqa: E402
from tests.test_causal_lm import _jsonl, _sentences, model_dir  # noqa: E402, F401 (a fixture)
from tests.test_docs_commands import DOCUMENTED, ROOT  # noqa: E402
from tests.test_tables import WORDS, _rows, _write  # noqa: E402


def _sets(*kvs):
  return [a for kv in kvs for a in ("--set", kv)]


SMALL = ["--no-progress"] + _sets("steps=2", "log_every=2", "checkpoint_every=2")


def _commands(guide):
  return [shlex.split(c)[1:] for where, c in DOCUMENTED if where == guide]


def _filled(argv, stand_ins):
  """`argv` with each placeholder (a whole argument, or the value of a --set) replaced."""
  out = []
  for a in argv:
    key, eq, value = a.rpartition("=")
    out.append(f"{key}={stand_ins[value]}" if eq and value in stand_ins else stand_ins.get(a, a))
  return out


def test_the_lora_guide_trains_and_exports_both_ways(model_dir, tmp_path, monkeypatch):  # noqa: F811
  monkeypatch.chdir(ROOT)
  run = tmp_path / "run"
  stand_ins = {
    "my.jsonl": _jsonl(tmp_path / "my.jsonl", [{"text": s} for s in _sentences(120)]),
    "/path/to/hf_dir": model_dir,
    "RUN_DIR": str(run),
  }
  small = ["--workdir", str(run)] + _sets(
    "task.seq_len=16", "task.dev_fraction=0.2", "batch_size=16", "physical_batch_size=16"
  )
  commands = _commands("lora.md")
  assert [c[0] for c in commands] == ["train", "export", "export"]
  for i, argv in enumerate(commands):
    stand_ins["OUT_DIR"] = str(tmp_path / f"out{i}")
    extra = SMALL + small if argv[0] == "train" else []
    assert cli.main(_filled(argv, stand_ins) + extra) == 0, argv
    if argv[0] == "export":
      out = tmp_path / f"out{i}"
      want = "adapter_config.json" if "--adapter" in argv else "config.json"
      assert (out / want).is_file() and (out / "privacy.json").is_file()
      assert "epsilon" in (out / "README.md").read_text()


def test_the_own_data_guide_trains_on_a_table(tiny_bert, tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  rows = _rows(300)
  stand_ins = {"my.csv": _write(rows, str(tmp_path / "my.csv"))}
  (argv,) = _commands("own-data.md")
  small = ["--workdir", str(tmp_path / "run")]
  small += _sets(f"task.model={tiny_bert(WORDS)}", "task.max_length=8")
  assert cli.main(_filled(argv, stand_ins) + SMALL + small) == 0
  assert os.path.isfile(tmp_path / "run" / "privacy.json")


def test_the_scaling_guides_mesh_command_trains(tmp_path, monkeypatch):
  """docs/scaling.md's one-host mesh (4 x 2 of the 8 virtual CPU devices the tests make)."""
  monkeypatch.chdir(ROOT)
  meshes = [c for c in _commands("scaling.md") if c[0] == "train" and "--distributed" not in c]
  assert meshes
  for argv in meshes:
    assert cli.main(argv + SMALL + ["--workdir", str(tmp_path / "run")]) == 0
    assert os.path.isfile(tmp_path / "run" / "privacy.json")
