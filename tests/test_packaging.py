"""dpjax installed from a wheel, not the checkout: the shipped configs run from anywhere."""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_installed_in_a_fresh_venv_runs_a_shipped_config(tmp_path):
  # Nothing of the checkout on the path (a PYTHONPATH to it would also make
  # pip see its egg-info as dpjax already installed).
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  dist, src = tmp_path / "dist", tmp_path / "src"  # built from a copy: the checkout stays clean
  shutil.copytree(
    ROOT, src, ignore=shutil.ignore_patterns(".venv*", ".git", "runs", "build", "*.egg-info")
  )
  subprocess.run(
    [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    + ["-w", str(dist), str(src)],
    check=True,
    cwd=tmp_path,
    env=env,
  )
  (wheel,) = glob.glob(str(dist / "dpjax-*.whl"))
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
