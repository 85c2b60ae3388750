import json

from dpjax import accounting, cli


def test_account_epsilon_matches_library(capsys):
  assert cli.main(["account", "--sampling-rate", "0.01", "--steps", "100",
                   "--noise-multiplier", "1.0"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["epsilon"] == accounting.epsilon(accounting.dpsgd_event(1.0, 0.01, 100), 1e-5)


def test_bad_input_exits_2_with_message(capsys):
  assert cli.main(["account", "--sampling-rate", "2.0", "--steps", "10",
                   "--target-epsilon", "1"]) == 2
  assert "sampling_rate must be in (0, 1]" in capsys.readouterr().err
  assert cli.main(["train", "configs/does_not_exist.py"]) == 2
  assert "config file not found" in capsys.readouterr().err


def test_assets_list(capsys):
  assert cli.main(["assets", "list"]) == 0
  out = capsys.readouterr().out
  assert "minilm" in out and "rt-polarity" in out


def test_account_labels_estimates_and_vacuous_bounds(capsys):
  import json
  assert cli.main(["account", "--sampling-rate", "0.01", "--steps", "100",
                   "--noise-multiplier", "1.0", "--accountant", "edgeworth"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["upper_bound"] is False and out["epsilon"] > 0
  assert cli.main(["account", "--sampling-rate", "0.01", "--steps", "100",
                   "--noise-multiplier", "1.0", "--accountant", "edgeworth-bound"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["upper_bound"] is True and "vacuous" in out["note"]


def test_account_user_level(capsys):
  from dpjax.accounting import user_level
  assert cli.main(["account", "--sampling-rate", "0.05", "--steps", "10", "--noise-multiplier",
                   "1.0", "--unit", "user", "--user-sampling", "els", "--G", "3"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["privacy_unit"] == "user"
  assert out["epsilon"] == user_level.els_epsilon(1.0, 0.05, 10, 3, 1e-5)
  assert cli.main(["account", "--sampling-rate", "0.05", "--steps", "10", "--noise-multiplier",
                   "1.0", "--unit", "user", "--user-sampling", "els", "--G", "3",
                   "--accountant", "rdp"]) == 2
  assert "accountant='pld'" in capsys.readouterr().err


def test_account_lmo(capsys, tmp_path, monkeypatch):
  from dpjax.accounting import lmo
  monkeypatch.setenv("DPJAX_HOME", str(tmp_path))
  params = {"a1": 0.3, "a3": 0.2, "a4": 0.5, "theta": 1, "k": 2, "lam": 1, "Ua": 1, "Ub": 2}
  assert cli.main(["account", "lmo", "--sampling-rate", "0.05", "--steps", "10",
                   "--params", json.dumps(params)]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["epsilon"] == lmo.lmo_epsilon(lmo.LMOParams(**params), 0.05, 10, 1e-5)
  grid = {"a": [0.3, 1.0], "theta_k": [[0.5, 1]], "lam": [5.0], "Ub_Ua": [[2, 1]]}
  assert cli.main(["account", "lmo", "--sampling-rate", "0.05", "--steps", "10",
                   "--target-epsilon", "2", "--grid", json.dumps(grid)]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["epsilon"] <= 2 and out["upper_bound"] is True


def test_distributed_train_needs_a_shared_workdir():
  import pytest
  with pytest.raises(SystemExit, match="--distributed needs --workdir"):
    cli.main(["train", "configs/synthetic.py", "--distributed"])
