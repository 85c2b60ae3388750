"""requirements.txt: every package and version of the environment CI tests with.

    python .ci/pins.py write   # in a fresh venv after `pip install -e ".[test,parity,docs,wandb]"`
    python .ci/pins.py check   # this environment is exactly requirements.txt (.ci/run)

setup.cfg keeps the loose install requirements (floors); requirements.txt pins
what CI installs (`pip install -r requirements.txt -e ".[test,parity,docs,wandb]"`)
and what a RESULTS.md figure's revision was measured with. `check` fails, one
line per package, when the installed set differs from the pins: a dependency
setup.cfg added that is not pinned, a pin nothing needs any more, or a
version the resolver had to move.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Dict, Iterable, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINS = os.path.join(ROOT, "requirements.txt")
HEADER = """\
# The environment CI tests with: every package and version, pinned (the loose install
# requirements and their floors are setup.cfg's). Generated in a fresh venv by
#   pip install -e ".[test,parity,docs,wandb]" && python .ci/pins.py write
# and checked by .ci/run (`python .ci/pins.py check`). Rebuild the environment a
# RESULTS.md figure was measured in from its revision's copy of this file:
#   pip install -r requirements.txt -e .
# (torch is the CPU build: add --extra-index-url https://download.pytorch.org/whl/cpu
# where the package index has only the CUDA one.)
"""


def _name(name: str) -> str:
  """The normalised project name (PEP 503): case, '_' and '.' do not matter."""
  return re.sub(r"[-_.]+", "-", name).lower()


def parse(lines: Iterable[str]) -> Dict[str, str]:
  """{normalised name: version} of `name==version` lines; a local label (+cpu) dropped.

  Args:
    lines: requirements or `pip freeze` lines (comments, blanks and editable
      or direct-reference lines skipped).

  Returns:
    The pins.
  """
  out = {}
  for line in lines:
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-") or " @ " in line:
      continue
    name, sep, version = line.partition("==")
    if not sep:
      raise ValueError(f"not a pin (name==version): {line!r}")
    out[_name(name)] = version.split("+", 1)[0].strip()
  return out


def differences(installed: Dict[str, str], pinned: Dict[str, str]) -> List[str]:
  """One line per package where `installed` is not `pinned`.

  Args:
    installed: what the environment holds.
    pinned: what requirements.txt says.

  Returns:
    The lines (empty when they agree).
  """
  out = []
  for name in sorted(set(installed) | set(pinned)):
    have, want = installed.get(name), pinned.get(name)
    if want is None:
      out.append(f"{name}=={have} is installed but not pinned")
    elif have is None:
      out.append(f"{name}=={want} is pinned but not installed")
    elif have != want:
      out.append(f"{name} is {have}, pinned {want}")
  return out


def _installed() -> Dict[str, str]:
  done = subprocess.run(
    [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
    check=True,
    capture_output=True,
    text=True,
  )
  return parse(done.stdout.splitlines())


def main(argv: List[str]) -> int:
  if argv == ["write"]:
    pins = _installed()
    with open(PINS, "w") as f:
      f.write(HEADER + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    print(f"wrote {len(pins)} pins to {PINS}")
    return 0
  if argv == ["check"]:
    with open(PINS) as f:
      diff = differences(_installed(), parse(f))
    for line in diff:
      print(f"requirements.txt is out of date: {line}", file=sys.stderr)
    if diff:
      print("regenerate it: see the head of .ci/pins.py", file=sys.stderr)
    return 1 if diff else 0
  print("usage: python .ci/pins.py write|check", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
