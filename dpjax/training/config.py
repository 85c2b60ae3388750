"""Loading experiment configs: a Python file with `get_config()`, plus overrides."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
from typing import Sequence

from dpjax.training import spec as spec_lib

# The checkout dpjax is installed from (editable installs): its configs/ are
# found from any working directory.
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def resolve_config_path(path: str) -> str:
  """`path` as given, else relative to the dpjax checkout (e.g. "configs/quickstart.py").

  Args:
    path: a config file's path.

  Returns:
    An existing path (raises FileNotFoundError naming both places tried).
  """
  if os.path.isfile(path):
    return path
  if not os.path.isabs(path):
    candidate = os.path.join(REPO_ROOT, path)
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(
    f"config file not found: {path} (looked in {os.getcwd()} and {REPO_ROOT})"
  )


def load_config(path: str, overrides: Sequence[str] = ()):
  """Runs `path`'s `get_config()`, fills every undeclared training key with its default
  (`dpjax.training.spec.KEYS`; for a `dpjax distill` config, in its teacher section) and applies
  `key.sub=value` overrides.

  Values are Python literals (`steps=400`, `dp_sam={'rho': 0.05}`, `noise_multiplier=None`);
  anything else is taken as a string. An unknown key, or a key below a value that is not
  a section, is a `ValueError` naming it.

  Args:
    path: the config file (`resolve_config_path`).
    overrides: `key.sub=value` strings, applied in order.

  Returns:
    The ConfigDict.
  """
  path = resolve_config_path(path)
  spec = importlib.util.spec_from_file_location("dpjax_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} defines no get_config()")
  cfg = module.get_config()
  if spec_lib.is_train_config(cfg):
    cfg = spec_lib.with_defaults(cfg)
  elif "teacher" in cfg and spec_lib.is_train_config(cfg.teacher):
    with cfg.unlocked() if hasattr(cfg, "unlocked") else contextlib.nullcontext():
      cfg.teacher = spec_lib.with_defaults(cfg.teacher)
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"override must look like key=value, got {item!r}")
    key, raw = item.split("=", 1)
    if raw.strip().lower() in ("inf", "+inf", "-inf", "nan"):
      value = float(raw)
    else:
      try:
        value = ast.literal_eval(raw)
      except (ValueError, SyntaxError):
        value = raw
    node = cfg
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
      if not hasattr(node, "keys") or p not in node:
        raise ValueError(
          f"unknown config key {'.'.join(parts[: i + 1])!r} in {path} "
          f"(from --set {item}); `dpjax config {path}` lists the keys"
        )
      node = node[p]
    if not hasattr(node, "keys") or parts[-1] not in node:
      raise ValueError(
        f"unknown config key {key!r} in {path} (from --set {item}); "
        f"`dpjax config {path}` lists the keys"
      )
    with cfg.unlocked() if hasattr(cfg, "unlocked") else contextlib.nullcontext():
      try:
        node[parts[-1]] = value
      except TypeError as e:  # a type-safe ConfigDict field
        raise ValueError(f"--set {item}: {e}") from None
  return cfg
