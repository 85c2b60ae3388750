"""Loading experiment configs: a Python file with `get_config()`, plus overrides."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
from typing import Sequence


# The checkout dpjax is installed from (editable installs): its configs/ are
# found from any working directory.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_config_path(path: str) -> str:
  """`path` as given, else relative to the dpjax checkout (e.g. "configs/quickstart.py")."""
  if os.path.isfile(path):
    return path
  if not os.path.isabs(path):
    candidate = os.path.join(REPO_ROOT, path)
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(f"config file not found: {path} (looked in {os.getcwd()} and "
                          f"{REPO_ROOT})")


def load_config(path: str, overrides: Sequence[str] = ()):
  """Runs `path`'s `get_config()` and applies `key.sub=value` overrides."""
  path = resolve_config_path(path)
  spec = importlib.util.spec_from_file_location("dpjax_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} defines no get_config()")
  cfg = module.get_config()
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"override must look like key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    if parts[-1] not in node:
      raise ValueError(f"unknown config key {key!r} in {path}")
    with cfg.unlocked() if hasattr(cfg, "unlocked") else contextlib.nullcontext():
      node[parts[-1]] = value
  return cfg
