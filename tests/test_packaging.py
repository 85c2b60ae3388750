"""dpjax installed from a wheel, not the checkout: the shipped configs run from anywhere."""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_installed_in_a_fresh_venv_runs_a_shipped_config(tmp_path):
  # Nothing of the checkout on the path (a PYTHONPATH to it would also make
  # pip see its egg-info as dpjax already installed).
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  dist, src = tmp_path / "dist", tmp_path / "src"  # built from a copy: the checkout stays clean
  shutil.copytree(
    ROOT, src, ignore=shutil.ignore_patterns(".venv*", ".git", "runs", "build", "*.egg-info")
  )
  # Built as pip builds it on a fresh machine: in an isolated environment holding the build
  # requirements of pyproject.toml from the package index (a fresh venv's own setuptools has
  # no bdist_wheel, and nothing in the test extra should have to supply one).
  subprocess.run(
    [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
    check=True,
    cwd=tmp_path,
    env=env,
  )
  (wheel,) = glob.glob(str(dist / "dpjax-*.whl"))
  # The repository's one copy of the configs is the top-level configs/; the wheel ships each
  # file as dpjax/configs/<the same path>.
  assert not os.path.exists(src / "dpjax" / "configs")
  shipped = {
    os.path.relpath(p, src / "configs").replace(os.sep, "/")
    for p in glob.glob(str(src / "configs" / "**" / "*.py"), recursive=True)
  }
  assert {"quickstart.py", "dp_flat/full.py", "__init__.py"} <= shipped
  with zipfile.ZipFile(wheel) as whl:
    whl_names = whl.namelist()
    in_wheel = {
      n[len("dpjax/configs/") :] for n in whl.namelist() if n.startswith("dpjax/configs/")
    }
    assert {n for n in whl.namelist() if n.startswith("configs/")} == set()  # not top-level
  presets = glob.glob(os.path.join(src, "dpjax", "models", "presets", "*.json"))
  assert presets and {"dpjax/models/presets/" + os.path.basename(p) for p in presets} <= set(
    whl_names
  )  # `dpjax plan-memory`'s model shapes
  assert in_wheel == shipped
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  py = str(venv / "bin" / "python")

  def output(cmd, cwd=tmp_path):
    """stdout of `cmd` in the new venv's environment (raises on failure)."""
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=cwd, env=env)
    return done.stdout.strip()

  site = output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
  # The wheel installed by the new venv's own pip (no network); its third-party
  # dependencies are this environment's, seen through a .pth file, which does
  # not run this environment's editable finder.
  subprocess.run(
    [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
    check=True,
    cwd=tmp_path,
    env=env,
  )
  with open(os.path.join(site, "deps.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  where = output([py, "-c", "import dpjax, os; print(os.path.dirname(dpjax.__file__))"], elsewhere)
  assert os.path.samefile(where, os.path.join(site, "dpjax")), where  # not the checkout
  assert os.path.isfile(os.path.join(where, "configs", "dp_flat", "full.py"))
  out = subprocess.run(
    [str(venv / "bin" / "dpjax"), "train", "configs/synthetic.py", "--no-progress"]
    + ["--workdir", "run", "--set", "steps=3"],
    capture_output=True,
    text=True,
    cwd=elsewhere,
    env=env,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert (elsewhere / "run" / "privacy.json").is_file()
  listed = output([str(venv / "bin" / "dpjax"), "train", "--list"], elsewhere)
  assert "quickstart" in listed and "lm_lora" in listed


def _pins_module():
  import importlib.util

  spec = importlib.util.spec_from_file_location("pins", os.path.join(ROOT, ".ci", "pins.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_requirements_txt_pins_every_declared_requirement_within_its_range():
  # setup.cfg declares the loose requirements; requirements.txt pins the environment CI
  # tests with (.ci/run installs it and checks that the installed set is exactly it).
  import configparser

  from packaging.requirements import Requirement

  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  declared = cfg["options"]["install_requires"].splitlines()
  for extra in ("test", "parity", "docs", "wandb"):
    declared += cfg["options.extras_require"][extra].splitlines()
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    pins = _pins_module().parse(f)
  checked = 0
  for line in declared:
    line = line.split("#", 1)[0].strip()
    if not line:
      continue
    req = Requirement(line)
    name = _pins_module()._name(req.name)
    assert name in pins, f"{req.name} is declared in setup.cfg but not pinned"
    assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
    checked += 1
  assert checked >= 20 and {"jax", "flax", "optax", "torch", "pytest"} <= set(pins)


def test_the_pins_check_fails_on_each_kind_of_difference(monkeypatch, capsys):
  pins = _pins_module()
  assert pins.parse(["torch==2.13.0+cpu", "# a comment", "Foo_Bar.baz==1.0", ""]) == {
    "torch": "2.13.0",
    "foo-bar-baz": "1.0",
  }
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    pinned = pins.parse(f)
  monkeypatch.setattr(pins, "_installed", lambda: dict(pinned))
  assert pins.main(["check"]) == 0
  moved = dict(pinned, jax="0.0.1", newdep="1.0")
  del moved["flax"]
  monkeypatch.setattr(pins, "_installed", lambda: moved)
  assert pins.main(["check"]) == 1
  err = capsys.readouterr().err
  assert f"jax is 0.0.1, pinned {pinned['jax']}" in err
  assert "newdep==1.0 is installed but not pinned" in err
  assert f"flax=={pinned['flax']} is pinned but not installed" in err


def test_ci_reruns_the_files_the_readme_run_skipped_for_want_of_an_extra(tmp_path, monkeypatch):
  # .ci/run runs the README's test command before torch and peft are installed, then the
  # files whose tests skipped for want of them (a module skipped whole, or a test whose
  # fixture skipped), and not those skipped for another reason.
  import importlib.util

  spec = importlib.util.spec_from_file_location("skipped", os.path.join(ROOT, ".ci", "skipped.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  monkeypatch.chdir(ROOT)
  report = """<testsuites><testsuite>
  <testcase classname="" name="tests.test_causal_lm"><skipped message="collection skipped">
    could not import 'torch': No module named 'torch'</skipped></testcase>
  <testcase classname="tests.test_tables" name="test_own[.csv]"><skipped
    message="torch (CPU) writes the tiny BERT fixture" /></testcase>
  <testcase classname="tests.test_tables" name="test_other" />
  <testcase classname="tests.test_auditing_estimators" name="test_peer"><skipped
    message="could not import 'jax_privacy.auditing'" /></testcase>
  </testsuite></testsuites>"""
  assert module.skipped_files(report) == ["tests/test_causal_lm.py", "tests/test_tables.py"]


_ADVICE = (
  "import dpjax, os\n"
  "from transformers.utils import logging\n"
  "logging.get_logger('transformers').warning_advice('ADVICE')\n"
  "print(os.environ['TRANSFORMERS_NO_ADVISORY_WARNINGS'])\n"
)


def test_importing_dpjax_silences_transformers_advice_unless_the_user_set_it():
  """transformers' advice ("PyTorch was not found ...") is silenced by `import dpjax`; a
  user's own TRANSFORMERS_NO_ADVISORY_WARNINGS is kept."""
  env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
  got = subprocess.run(
    [sys.executable, "-c", _ADVICE], env=env, capture_output=True, text=True, check=True
  )
  assert "ADVICE" not in got.stderr + got.stdout and got.stdout.strip() == "1"
  env["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = ""  # the user's: advice shown
  got = subprocess.run(
    [sys.executable, "-c", _ADVICE], env=env, capture_output=True, text=True, check=True
  )
  assert "ADVICE" in got.stderr and got.stdout.strip() == ""
