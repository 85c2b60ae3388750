"""Recorded rows of the experiments (`experiments/results/<name>.jsonl`): append, load, dedupe.

A row is one run's outcome beside the settings that identify it. Each
experiment says which fields of a row are its spec (`spec_of(row)`); a row's
identity is the hash of that spec, so a grid resumes by skipping the specs it
already holds and a rerun of the same spec supersedes the older row. Every
appended row records the code revision and the machine that produced it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
from typing import Any, Callable, Dict, Iterable, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

Row = Dict[str, Any]


def path(name: str) -> str:
  """The JSONL file of experiment `name`."""
  return os.path.join(RESULTS, f"{name}.jsonl")


def revision() -> str:
  """The checkout's commit (short hash, "+dirty" with local edits), or "unknown"."""
  try:
    rev = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=no"],
      cwd=HERE,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
    return rev + ("+dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def machine() -> str:
  """The processor's model name and core count, e.g. "AMD EPYC, 2 cores"."""
  name = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          name = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{name}, {os.cpu_count()} cores"


def _canonical(v):
  if isinstance(v, float) and v.is_integer() and math.isfinite(v):
    return int(v)  # 3.0 and 3 name the same setting
  if isinstance(v, dict):
    return {str(k): _canonical(x) for k, x in sorted(v.items())}
  if isinstance(v, (list, tuple)):
    return [_canonical(x) for x in v]
  return v


def spec_hash(spec: Dict[str, Any]) -> str:
  """A stable hash of a spec: key order, tuples vs lists and 3.0 vs 3 do not matter."""
  blob = json.dumps(_canonical(spec), sort_keys=True, default=str)
  return hashlib.sha1(blob.encode()).hexdigest()[:16]


def load(name: str) -> List[Row]:
  """Every row of experiment `name`, in the order recorded ([] before the first)."""
  if not os.path.exists(path(name)):
    return []
  with open(path(name)) as f:
    return [json.loads(line) for line in f if line.strip()]


def append(name: str, rows: Iterable[Row]) -> None:
  """Appends rows (each stamped with the code revision and machine) to experiment `name`."""
  os.makedirs(RESULTS, exist_ok=True)
  rev, host = revision(), machine()
  with open(path(name), "a") as f:
    for r in rows:
      stamp = {"revision": r.get("revision", rev), "machine": r.get("machine", host)}
      f.write(json.dumps({**r, **stamp}, default=float) + "\n")


def dedupe(rows: Iterable[Row], spec_of: Callable[[Row], Dict[str, Any]]) -> Dict[str, Row]:
  """spec hash -> the LAST row recorded with that spec (a rerun supersedes)."""
  out: Dict[str, Row] = {}
  for r in rows:
    out[spec_hash(spec_of(r))] = r
  return out


def find(index: Dict[str, Row], spec: Dict[str, Any]) -> Optional[Row]:
  """The recorded row of `spec` in a `dedupe` index, or None."""
  return index.get(spec_hash(spec))
