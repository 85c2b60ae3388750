"""Loading experiment configs: a Python file with `get_config()`, plus overrides."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
from typing import Dict, Sequence

from dpjax.training import spec as spec_lib


def _config_dir() -> str:
  """Where the shipped configs are: the `dpjax.configs` package (the repository's top-level
  configs/, which setup.py maps to that name; a wheel holds them under dpjax/configs/), or
  configs/ beside the package in a checkout on sys.path that was not installed."""
  found = importlib.util.find_spec("dpjax.configs")  # found, not imported: nothing runs
  if found is not None and found.submodule_search_locations:
    return list(found.submodule_search_locations)[0]
  return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


# The shipped configs: found the same way from a checkout, an editable install or a wheel.
CONFIG_DIR = _config_dir()


def _shipped_name(path: str) -> str:
  """ "configs/dp_flat/full.py", "dp_flat/full.py" and "dp_flat/full" -> "dp_flat/full"."""
  name = path.replace(os.sep, "/")
  if name.startswith("./"):
    name = name[2:]
  if name.startswith("configs/"):
    name = name[len("configs/") :]
  return name[:-3] if name.endswith(".py") else name


def list_configs() -> Dict[str, str]:
  """The shipped configs: name (as `dpjax train NAME` takes it) -> the first line of its docstring.

  Example:
    >>> "quickstart" in list_configs()
    True

  Returns:
    A dict sorted by name.
  """
  out = {}
  for dirpath, _, files in os.walk(CONFIG_DIR):
    for f in files:
      if f.endswith(".py") and f != "__init__.py":
        full = os.path.join(dirpath, f)
        rel = os.path.relpath(full, CONFIG_DIR)[:-3].replace(os.sep, "/")
        with open(full) as fh:
          doc = ast.get_docstring(ast.parse(fh.read())) or ""
        out[rel] = doc.strip().splitlines()[0] if doc.strip() else ""
  return dict(sorted(out.items()))


def resolve_config_path(path: str) -> str:
  """`path` as given if that file exists, else the shipped config of that name.

  "configs/quickstart.py", "quickstart.py" and "quickstart" all name
  configs/quickstart.py (`list_configs`, installed as dpjax/configs/), from
  any working directory.

  Args:
    path: a config file's path, or a shipped config's name.

  Returns:
    An existing path (raises FileNotFoundError naming what was tried and the
    shipped names).
  """
  if os.path.isfile(path):
    return path
  if not os.path.isabs(path):
    candidate = os.path.join(CONFIG_DIR, *_shipped_name(path).split("/")) + ".py"
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(
    f"config file not found: {path} (not a file in {os.getcwd()}, nor a shipped config; "
    f"shipped: {', '.join(list_configs())})"
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
  if not path.endswith(".py"):
    raise ValueError(f"{path}: a config is a Python file (.py) defining get_config()")
  try:  # anything the file does wrong is one line naming it
    spec = importlib.util.spec_from_file_location("dpjax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ValueError("it defines no get_config()")
    cfg = module.get_config()
  except Exception as e:  # noqa: BLE001 - a user's file: its error, named, in one line
    if isinstance(e, SyntaxError):
      raise ValueError(f"{path} line {e.lineno}: SyntaxError: {e.msg}") from None
    raise ValueError(f"{path}: {type(e).__name__}: {e}") from None
  if not hasattr(cfg, "keys"):
    raise ValueError(f"{path}: get_config() must return a ConfigDict, got {type(cfg).__name__}")
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
    if node is cfg and key in spec_lib.BY_NAME:  # the key table's type and range, now
      spec_lib.check_value(spec_lib.BY_NAME[key], value)
    with cfg.unlocked() if hasattr(cfg, "unlocked") else contextlib.nullcontext():
      try:
        node[parts[-1]] = value
      except TypeError as e:  # a type-safe ConfigDict field
        raise ValueError(f"--set {item}: {e}") from None
  return cfg
