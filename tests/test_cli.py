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
