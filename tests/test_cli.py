import json
import os

import pytest

from dpjax import cli
from dpjax.core import accounting


def test_account_epsilon_matches_library(capsys):
  assert (
    cli.main(["account", "--sampling-rate", "0.01", "--steps", "100", "--noise-multiplier", "1.0"])
    == 0
  )
  out = json.loads(capsys.readouterr().out)
  assert out["epsilon"] == accounting.epsilon(accounting.dpsgd_event(1.0, 0.01, 100), 1e-5)


def test_bad_input_exits_2_with_message(capsys):
  assert (
    cli.main(["account", "--sampling-rate", "2.0", "--steps", "10", "--target-epsilon", "1"]) == 2
  )
  assert "sampling_rate must be in (0, 1]" in capsys.readouterr().err
  assert cli.main(["train", "configs/does_not_exist.py"]) == 2
  assert "config file not found" in capsys.readouterr().err


def test_assets_list(capsys):
  assert cli.main(["assets", "list"]) == 0
  out = capsys.readouterr().out
  assert "minilm" in out and "rt-polarity" in out


def test_account_labels_estimates_and_vacuous_bounds(capsys):
  import json

  assert (
    cli.main(
      [
        "account",
        "--sampling-rate",
        "0.01",
        "--steps",
        "100",
        "--noise-multiplier",
        "1.0",
        "--accountant",
        "edgeworth",
      ]
    )
    == 0
  )
  out = json.loads(capsys.readouterr().out)
  assert out["upper_bound"] is False and out["epsilon"] > 0
  assert (
    cli.main(
      [
        "account",
        "--sampling-rate",
        "0.01",
        "--steps",
        "100",
        "--noise-multiplier",
        "1.0",
        "--accountant",
        "edgeworth-bound",
      ]
    )
    == 0
  )
  out = json.loads(capsys.readouterr().out)
  assert out["upper_bound"] is True and "vacuous" in out["note"]


def test_account_user_level(capsys):
  from dpjax.core.accounting import user_level

  assert (
    cli.main(
      [
        "account",
        "--sampling-rate",
        "0.05",
        "--steps",
        "10",
        "--noise-multiplier",
        "1.0",
        "--unit",
        "user",
        "--user-sampling",
        "els",
        "--G",
        "3",
      ]
    )
    == 0
  )
  out = json.loads(capsys.readouterr().out)
  assert out["privacy_unit"] == "user"
  assert out["epsilon"] == pytest.approx(user_level.els_epsilon(1.0, 0.05, 10, 3, 1e-5), rel=1e-9)
  assert (
    cli.main(
      [
        "account",
        "--sampling-rate",
        "0.05",
        "--steps",
        "10",
        "--noise-multiplier",
        "1.0",
        "--unit",
        "user",
        "--user-sampling",
        "els",
        "--G",
        "3",
        "--accountant",
        "rdp",
      ]
    )
    == 2
  )
  assert "accountant='pld'" in capsys.readouterr().err


def test_account_lmo(capsys, tmp_path, monkeypatch):
  from dpjax.core.accounting import lmo

  monkeypatch.setenv("DPJAX_HOME", str(tmp_path))
  params = {"a1": 0.3, "a3": 0.2, "a4": 0.5, "theta": 1, "k": 2, "lam": 1, "Ua": 1, "Ub": 2}
  assert (
    cli.main(
      ["account", "lmo", "--sampling-rate", "0.05", "--steps", "10", "--params", json.dumps(params)]
    )
    == 0
  )
  out = json.loads(capsys.readouterr().out)
  assert out["epsilon"] == lmo.lmo_epsilon(lmo.LMOParams(**params), 0.05, 10, 1e-5)
  grid = {"a": [0.3, 1.0], "theta_k": [[0.5, 1]], "lam": [5.0], "Ub_Ua": [[2, 1]]}
  assert (
    cli.main(
      [
        "account",
        "lmo",
        "--sampling-rate",
        "0.05",
        "--steps",
        "10",
        "--target-epsilon",
        "2",
        "--grid",
        json.dumps(grid),
      ]
    )
    == 0
  )
  out = json.loads(capsys.readouterr().out)
  assert out["epsilon"] <= 2 and out["upper_bound"] is True


def test_distributed_train_needs_a_shared_workdir():
  import pytest

  with pytest.raises(SystemExit, match="--distributed needs --workdir"):
    cli.main(["train", "configs/synthetic.py", "--distributed"])


BAD_TRAIN = [
  (["target_epsilon=3", "noise_multiplier=0.5"], "contradict each other"),
  (
    ["accountant='foo'", "target_epsilon=None", "noise_multiplier=1.0"],
    "accountant must be one of",
  ),
  (["noise_multiplier=0", "target_epsilon=None"], "noise_multiplier must be finite and > 0, got 0"),
  (["learning_rate=-0.1"], "learning_rate must be finite and > 0, got -0.1"),
  (["steps=abc"], "steps must be an integer, got 'abc'"),
  (["target_epsilon=inf"], "target_epsilon must be in (0, 1000]"),
  # Extremes the accountant cannot finish: refused in one line before the first step.
  (["target_epsilon=1e9"], "target_epsilon must be in (0, 1000] (calibration beyond it"),
  (["steps=1000000000000"], "steps must be in [1, 10000000]"),
  (
    ["noise_multiplier=1e-9", "target_epsilon=None", "steps=3"],
    "cannot be accounted: Gaussian noise multiplier 1e-09 < 0.1",
  ),
  (
    ["noise_multiplier=0.15", "target_epsilon=None", "steps=20000"],
    "cannot be accounted: its RDP epsilon at delta 1e-7 is",
  ),
  (["tsk.x=1"], "unknown config key 'tsk'"),
  (["task.nope=1"], "unknown config key 'task.nope'"),
  (["log_every=0"], "log_every must be >= 1, got 0"),
  (["mechanism='laplace'"], "needs l1_clip_norm"),
  (["batch_size=100000"], "must be in (0, 1]: lower batch_size"),
  (["private=False", "privacy_unit='user'"], "privacy_unit='user' needs private=True"),
  (["delta=1.5"], "delta must be in (0, 1), got 1.5"),
  (["dp_sam={'rho': 0.1, 'mode': 'raw'}"], "dp_sam.mode must be one of"),
  # The key table's types and ranges, nested dicts included (each once traceback or silent).
  (["batch_size=1e-300"], "batch_size must be finite and >= 1"),
  (["l2_clip_norm=1e308"], "l2_clip_norm must be finite, > 0 and <= 1e9"),
  (["dp_sam={'rho': 'x'}"], "dp_sam.rho must be a finite number >= 0, got 'x'"),
  (["dp_sam={'rho': 0.1, 'layerwise': 'maybe'}"], "dp_sam.layerwise must be True or False"),
  (
    ["weight_anchor={'lam': 'x', 'reference': 'init'}"],
    "weight_anchor.lam must be a finite number >= 0",
  ),
  (
    ["weight_anchor={'lam': 1, 'reference': 'no/such/file'}"],
    "weight_anchor.reference must be 'init' or an existing file",
  ),
  (["learning_rates={'layer_': 'fast'}"], "learning_rates maps non-empty parameter-name prefixes"),
  (["target_epsilon=True"], "target_epsilon must be an integer or a number or None, got True"),
  (["lmo_grid={'nope': 1}"], "lmo_grid takes a, theta_k, lam, Ub_Ua; got unknown 'nope'"),
  (["physical_batch_size=10000000"], "physical_batch_size=10000000 exceeds the 4000 training"),
  (["mf_strategy='blt'", "mf_buffers=1000"], "mf_buffers=1000 exceeds steps=100"),
]


def _refused_in_one_line(capsys, argv, sets, msg, out_dir) -> None:
  """`dpjax ARGV --set ...` exits 2 with one stderr line holding `msg`, writing no `out_dir`."""
  for s in sets:
    argv = argv + ["--set", s]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("dpjax: error: ") and msg in err[0], err
  assert not out_dir.exists()


@pytest.mark.parametrize("sets,msg", BAD_TRAIN)
def test_bad_train_inputs_exit_2_with_one_line_and_no_files(tmp_path, capsys, sets, msg):
  workdir = tmp_path / "run"
  argv = ["train", "configs/synthetic.py", "--workdir", str(workdir), "--no-progress"]
  _refused_in_one_line(capsys, argv, sets, msg, workdir)


BAD_DISTILL = [
  ("configs/synthetic.py", [], "not a distill config: it has no teacher section"),
  ("configs/distil_shakespeare.py", ["teacher.steps='abc'"], "steps must be an integer, got 'abc'"),
  ("configs/distil_shakespeare.py", ["total_epsilon=-1"], "total_epsilon must be in (0, 1000]"),
  ("configs/distil_shakespeare.py", ["histogram.epsilon=5.0"], "must be below total_epsilon=2"),
  ("configs/distil_shakespeare.py", ["histogram.mechanism='lap'"], "histogram.mechanism must be"),
  ("configs/distil_shakespeare.py", ["generation.top_p=0.0"], "generation.top_p must be in (0, 1]"),
  ("configs/distil_shakespeare.py", ["student.steps=0"], "student.steps must be in [1, "),
  ("configs/distil_shakespeare.py", ["student.lam='x'"], "student.lam='x'"),
  ("configs/distil_shakespeare.py", ["student.model={'layers': 1}"], "got 'layers'"),
  (
    "configs/distil_shakespeare.py",
    ["student.model={'hidden_size': 64}", "student.init_from_public=None"],
    "student.init_from_public must be a bool",
  ),
  ("configs/distil_shakespeare.py", ["student.model={'num_heads': 4}"], "num_layers is missing"),
  (
    "configs/distil_shakespeare.py",
    ["teacher.task.control_code=False"],
    "teacher.task.control_code must be True",
  ),
]


@pytest.mark.parametrize("config,sets,msg", BAD_DISTILL)
def test_bad_distill_inputs_exit_2_before_any_fetch(
  tmp_path, capsys, monkeypatch, config, sets, msg
):
  from dpjax import assets

  def no_fetch(*a, **k):
    raise AssertionError("an asset was fetched before the config was checked")

  monkeypatch.setattr(assets, "fetch", no_fetch)
  run_dir = tmp_path / "run"
  argv = ["distill", config, "--run-dir", str(run_dir), "--no-progress"]
  _refused_in_one_line(capsys, argv, sets, msg, run_dir)


@pytest.mark.parametrize(
  "argv,msg",
  [
    (
      ["--sampling-rate", "5", "--steps", "0", "--delta", "7", "--noise-multiplier", "1"],
      "sampling_rate must be in (0, 1]",
    ),
    (
      ["--sampling-rate", "0.1", "--steps", "0", "--noise-multiplier", "1"],
      "steps must be an integer >= 1",
    ),
    (
      ["--sampling-rate", "0.1", "--steps", "5", "--delta", "7", "--noise-multiplier", "1"],
      "delta must be in (0, 1)",
    ),
    (
      ["--sampling-rate", "0.1", "--steps", "5", "--noise-multiplier", "0"],
      "noise_multiplier must be finite and > 0",
    ),
    (
      ["--sampling-rate", "0.1", "--steps", "5", "--noise-multiplier", "1", "--accountant", "x"],
      "--accountant must be one of",
    ),
    (
      ["--sampling-rate", "0.1", "--steps", "20", "--noise-multiplier", "0.05"],
      "cannot be accounted: Gaussian noise multiplier 0.05 < 0.1",
    ),
    (
      ["--sampling-rate", "0.01", "--steps", "1000000000000", "--noise-multiplier", "1"],
      "--steps must be at most 10000000",
    ),
    (
      ["--sampling-rate", "0.01", "--steps", "100", "--target-epsilon", "1e9"],
      "--target-epsilon must be in (0, 1000]",
    ),
  ],
)
def test_bad_account_inputs_exit_2(capsys, argv, msg):
  assert cli.main(["account"] + argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and msg in err[0], err


def test_every_key_is_listed_and_settable(capsys):
  from dpjax.training import spec
  from dpjax.training.config import load_config

  assert cli.main(["config", "configs/synthetic.py"]) == 0
  out = capsys.readouterr().out
  with pytest.raises(SystemExit):
    cli.main(["train", "--help"])
  help_text = capsys.readouterr().out
  for k in spec.KEYS:
    if k.name == "task":
      continue
    assert f"\n{k.name} " in "\n" + out and f"  {k.name} " in help_text, k.name
    str_value = repr(k.options()[0]) if k.options() else repr(k.default)
    number = "1" if k.default is None else repr(k.default)
    value = {bool: "True", str: str_value, dict: "None"}.get(k.kind[0], number)
    cfg = load_config("configs/synthetic.py", [f"{k.name}={value}"])
    assert k.name in cfg


def test_laplace_is_settable_end_to_end(tmp_path, capsys):
  w = tmp_path / "w"
  assert (
    cli.main(
      [
        "train",
        "configs/synthetic.py",
        "--workdir",
        str(w),
        "--no-progress",
        "--set",
        "mechanism='laplace'",
        "--set",
        "l1_clip_norm=1.0",
        "--set",
        "sampling_rate=0.02",
        "--set",
        "steps=2",
        "--set",
        "noise_multiplier=2.0",
        "--set",
        "target_epsilon=None",
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  p = json.load(open(w / "privacy.json"))
  assert p["ledger"][0]["mechanism"] == "laplace" and p["ledger"][0]["sampling_rate"] == 0.02
  want = accounting.epsilon(accounting.dpsgd_event(2.0, 0.02, 2, "laplace"), 1e-5)
  assert p["epsilon"] == pytest.approx(want, rel=1e-12)
  assert f"({p['epsilon']:.3f}, 1e-05)-DP per example" in out

  # Strict JSON everywhere in the run directory.
  def no_constants(name):
    raise AssertionError(f"non-JSON constant {name}")

  for line in open(w / "metrics.jsonl"):
    json.loads(line, parse_constant=no_constants)
  json.loads(open(w / "privacy.json").read(), parse_constant=no_constants)


def test_configs_are_found_from_any_directory(tmp_path, monkeypatch):
  """`dpjax train configs/X.py` (and `X`) works outside the checkout (the README's first line)."""
  from dpjax.training.config import CONFIG_DIR, list_configs, load_config, resolve_config_path

  monkeypatch.chdir(tmp_path)
  want = os.path.join(CONFIG_DIR, "quickstart.py")
  for name in ("configs/quickstart.py", "quickstart.py", "quickstart"):
    assert os.path.samefile(resolve_config_path(name), want)
  assert os.path.samefile(
    resolve_config_path("configs/dp_flat/full.py"), os.path.join(CONFIG_DIR, "dp_flat", "full.py")
  )
  assert load_config("synthetic").task.name == "synthetic"
  # a file of that name in the working directory wins over the shipped one
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "quickstart.py").write_text("def get_config(): pass\n")
  assert os.path.samefile(resolve_config_path("configs/quickstart.py"), "configs/quickstart.py")
  shipped = {
    os.path.relpath(os.path.join(d, f), CONFIG_DIR)[:-3]
    for d, _, fs in os.walk(CONFIG_DIR)
    for f in fs
    if f.endswith(".py") and f != "__init__.py"
  }
  assert set(list_configs()) == shipped and "dp_flat/full" in shipped
  assert all(list_configs().values())  # every config says what it is
  with pytest.raises(FileNotFoundError, match="nor a shipped config; shipped: .*quickstart"):
    resolve_config_path("nope")


def test_version_and_list(capsys):
  import importlib.metadata

  with pytest.raises(SystemExit) as e:
    cli.main(["--version"])
  assert e.value.code == 0
  assert capsys.readouterr().out.strip() == f"dpjax {importlib.metadata.version('dpjax')}"
  assert cli.main(["train", "--list"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert any(line.startswith("quickstart ") and "MiniLM" in line for line in lines)
  assert any(line.startswith("dp_flat/full ") for line in lines)


@pytest.mark.parametrize(
  "text, msg",
  [
    ("x =", "line 1: SyntaxError"),
    ("def get_config():\n  raise RuntimeError('boom')", "RuntimeError: boom"),
    ("def get_config():\n  return None", "get_config() must return a ConfigDict, got NoneType"),
    ("import no_such_module_here", "ModuleNotFoundError"),
    ("y = 1", "it defines no get_config()"),
  ],
)
def test_a_config_file_that_fails_is_one_line_naming_it(tmp_path, capsys, text, msg):
  path = tmp_path / "mine.py"
  path.write_text(text)
  assert cli.main(["train", str(path), "--workdir", str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(path) in err[0] and msg in err[0], err
  assert not (tmp_path / "w").exists()


def test_bad_workdirs_and_config_overrides_are_one_line(tmp_path, capsys):
  (tmp_path / "afile").write_text("")
  (tmp_path / "c.json").write_text("{}")
  for argv, msg in [
    (["train", "synthetic", "--workdir", str(tmp_path / "afile")], "is a file, not a directory"),
    (["train", "synthetic", "--workdir", ""], "--workdir must name a directory, got ''"),
    (["train", str(tmp_path / "c.json")], "a config is a Python file (.py)"),
    (["config", "synthetic", "--set", "steps=-1"], "steps must be in [1, 10000000]"),
    (["config", "--set", "steps=-1"], "--set steps=-1 needs a config to apply to"),
  ]:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], (argv, err)


def test_the_lmo_grid_keys_are_the_search_grids():
  from dpjax.methods.lmo_search import PAPER_GRID
  from dpjax.training.spec import LMO_GRID_KEYS

  assert set(LMO_GRID_KEYS) == set(PAPER_GRID)


def test_account_lmo_grid_takes_only_its_keys(capsys):
  base = ["account", "lmo", "--sampling-rate", "0.02", "--steps", "30", "--target-epsilon", "3"]
  for grid in ('{"nope": 1}', "[1, 2]", "{not json"):
    assert cli.main(base + ["--grid", grid]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--grid" in err[0], err


def test_export_checks_the_run_before_loading_anything(tmp_path, capsys, monkeypatch):
  from dpjax.pipelines import export

  loaded = []
  monkeypatch.setattr(export, "base_model", lambda t: loaded.append(t))
  run = tmp_path / "run"
  run.mkdir()
  for text, msg in [
    ('{"steps": 3}', "is not a run's config (KeyError"),
    ("{not json", "is not a run's config (JSONDecodeError"),
    ('{"task": {"name": "causal_lm"}}', "no trained parameters (the run has not finished"),
  ]:
    (run / "config.json").write_text(text)
    assert cli.main(["export", str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
  (run / "trained.npz").write_bytes(b"")  # a finished run's file; its record missing:
  (run / "config.json").write_text('{"task": {"name": "causal_lm", "lora": null}}')
  for argv, msg in [
    ([], "privacy.json: the run's privacy record is missing or unreadable"),
    (["--adapter"], "fine-tuned every weight (task.lora=None): it has no LoRA adapter"),
  ]:
    if argv:
      (run / "privacy.json").write_text('{"private": true, "steps": 3}')
    assert cli.main(["export", str(run), str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
  assert not loaded and not (tmp_path / "out").exists()


def test_a_run_says_where_it_writes_first_and_its_result_in_words(tmp_path, capsys):
  w = tmp_path / "w"
  argv = ["train", "synthetic", "--workdir", str(w), "--no-progress"]
  assert cli.main(argv + ["--set", "steps=2", "--set", "log_every=1"]) == 0
  out, err = capsys.readouterr()
  first = [line for line in err.splitlines() if not line.startswith("20")]  # not log rows
  assert first[0].startswith("privacy plan: ")
  assert first[1] == f"run directory: {w} (resume: --workdir {w})"
  lines = out.splitlines()
  summary = json.loads(lines[0])  # the JSON line for scripts, then the same in words
  assert lines[1] == (
    f"result: test accuracy {100 * summary['test_accuracy']:.2f} %, "
    f"dev accuracy {100 * summary['dev_accuracy']:.2f} %"
  )
  assert cli.result_line({"dev_perplexity": 12.345, "dev_perplexity_before": 20.0}) == (
    "result: dev perplexity 12.35, dev perplexity before training 20"
  )
  assert cli.result_line({"step": 3}) == ""
  from dpjax.training import rundir

  rows = [json.loads(line) for line in open(w / "metrics.jsonl")]
  rows = [r for r in rows if "step" in r and "event" not in r]
  eps = [r for r in rows if r.get("epsilon") is not None][-1]["epsilon"]
  assert rundir.curves_title("w", rows) == f"w: 2 steps, ({eps:.4g}, 1e-05)-DP per example"
  assert rundir.curves_title("w", [{"step": 5}]) == "w: 5 steps, not private"
