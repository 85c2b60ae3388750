"""The package layout: one-way dependencies, no import cycles, no hidden imports.

Every import statement of every module under dpjax/ is read from its source
(module level and inside functions alike), so a cycle cannot hide behind an
import inside a function. The layers and what each may import are the rule
written in the README's layout section.
"""

from __future__ import annotations

import ast
import glob
import os
import re
import sys
from typing import Dict, List, Set, Tuple

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dpjax")

# Layer -> the layers it may import (besides itself). Longest prefix wins.
ALLOWED: Dict[str, Set[str]] = {
  "dpjax.core": set(),
  "dpjax.assets": set(),
  "dpjax.models": set(),
  "dpjax.data": {"dpjax.assets"},
  "dpjax.methods": {"dpjax.core", "dpjax.models", "dpjax.assets"},
  "dpjax.training": {"dpjax.core", "dpjax.methods", "dpjax.assets"},
  "dpjax.tasks": {"dpjax.core", "dpjax.training", "dpjax.models", "dpjax.data", "dpjax.assets"},
  "dpjax.pipelines": {
    "dpjax.core",
    "dpjax.methods",
    "dpjax.training",
    "dpjax.tasks",
    "dpjax.models",
    "dpjax.data",
    "dpjax.assets",
  },
  "dpjax.auditing": {
    "dpjax.core",
    "dpjax.methods",
    "dpjax.training",
    "dpjax.tasks",
    "dpjax.models",
    "dpjax.data",
    "dpjax.assets",
  },
  "dpjax.cli": {
    "dpjax.auditing",
    "dpjax.core",
    "dpjax.methods",
    "dpjax.training",
    "dpjax.tasks",
    "dpjax.pipelines",
    "dpjax.models",
    "dpjax.data",
    "dpjax.assets",
  },
}
# The shipped config files sit on top, beside the CLI (one builds on another
# through `dpjax.training.config`).
ALLOWED["dpjax.configs"] = ALLOWED["dpjax.cli"]
ALLOWED["dpjax.__main__"] = {"dpjax.cli"}  # `python -m dpjax`
FACADE = "dpjax"  # dpjax/__init__.py re-exports the public names; nothing imports it
# What the private core may import from outside dpjax: flax because ghost clipping
# intercepts linen layers, attr because DpEvents are attrs classes.
CORE_THIRD_PARTY = {"jax", "optax", "chex", "numpy", "scipy", "dp_accounting", "attr", "flax"}


def _modules() -> Dict[str, str]:
  """Module name -> file: the package, and the top-level configs/ it ships as dpjax.configs."""
  out = {}
  top = os.path.dirname(ROOT)
  for base, prefix in ((ROOT, ["dpjax"]), (os.path.join(top, "configs"), ["dpjax", "configs"])):
    for dirpath, _, files in os.walk(base):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(dirpath, f), base)
          parts = prefix + rel[:-3].split(os.sep)
          if parts[-1] == "__init__":
            parts = parts[:-1]
          out[".".join(parts)] = os.path.join(dirpath, f)
  return out


MODULES = _modules()


def _imports(name: str, path: str) -> List[Tuple[str, int, bool]]:
  """(imported name, line, inside a function) for every import in the module."""
  tree = ast.parse(open(path).read(), path)
  is_pkg = path.endswith("__init__.py")
  out = []

  def visit(node, in_fn: bool):
    for child in ast.iter_child_nodes(node):
      fn = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        out.extend((a.name, child.lineno, in_fn) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          pkg = name.split(".") if is_pkg else name.split(".")[:-1]
          pkg = pkg[: len(pkg) - (child.level - 1)]
          base = ".".join(pkg + ([base] if base else []))
        for a in child.names:
          full = f"{base}.{a.name}"
          out.append((full if full in MODULES else base, child.lineno, in_fn))
      visit(child, fn)

  visit(tree, False)
  return out


def _internal(target: str) -> str:
  """The dpjax module an import statement loads (the longest known prefix), or ''."""
  parts = target.split(".")
  for k in range(len(parts), 0, -1):
    cand = ".".join(parts[:k])
    if cand in MODULES:
      return cand
  return ""


def _layer(module: str) -> str:
  best = ""
  for layer in ALLOWED:
    if (module == layer or module.startswith(layer + ".")) and len(layer) > len(best):
      best = layer
  return best


def _graph() -> Dict[str, Set[str]]:
  g = {m: set() for m in MODULES}
  for m, path in MODULES.items():
    for target, _, _ in _imports(m, path):
      t = _internal(target)
      if t and t != m:
        g[m].add(t)
  return g


def test_every_module_has_a_layer():
  missing = [m for m in MODULES if m != FACADE and not _layer(m)]
  assert not missing, f"modules outside every layer of ALLOWED: {missing}"


def test_no_upward_or_sideways_imports():
  bad = []
  for m, path in MODULES.items():
    if m == FACADE:
      continue
    mine = _layer(m)
    for target, line, _ in _imports(m, path):
      t = _internal(target)
      if not t or t == m:
        continue
      if t == FACADE:
        bad.append(f"{path}:{line}: imports the facade `dpjax` itself")
        continue
      theirs = _layer(t)
      if theirs != mine and theirs not in ALLOWED[mine]:
        bad.append(f"{path}:{line}: {m} ({mine}) imports {t} ({theirs})")
  assert not bad, "\n".join(bad)


def test_no_import_cycles():
  g = _graph()
  index, low, on_stack, stack, cycles = {}, {}, set(), [], []
  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

  def strongconnect(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in g[v]:
      if w not in index:
        strongconnect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        cycles.append(sorted(comp))

  for v in sorted(g):
    if v not in index:
      strongconnect(v)
  assert not cycles, f"import cycles: {cycles}"


def test_no_dpjax_imports_inside_functions():
  hidden = [
    f"{path}:{line}: {target}"
    for m, path in MODULES.items()
    for target, line, in_fn in _imports(m, path)
    if in_fn and _internal(target)
  ]
  assert not hidden, "dpjax imports inside functions (hoist them):\n" + "\n".join(hidden)


def test_core_imports_only_its_dependencies():
  bad = []
  for m, path in MODULES.items():
    if _layer(m) != "dpjax.core":
      continue
    for target, line, _ in _imports(m, path):
      top = target.split(".")[0]
      if top in ("dpjax", "__future__") or top in sys.stdlib_module_names:
        continue
      if top not in CORE_THIRD_PARTY:
        bad.append(f"{path}:{line}: {target}")
  assert not bad, "the private core imports outside jax/optax/dp-accounting:\n" + "\n".join(bad)


@pytest.mark.parametrize("case", ["cycle", "upward"])
def test_the_checks_catch_a_violation(case, monkeypatch):
  """The checks above fail on a planted cycle and on a planted upward import."""
  real = _imports

  def planted(name, path):
    out = real(name, path)
    if case == "cycle" and name == "dpjax.core.checks":
      out.append(("dpjax.core.mechanisms", 1, True))  # mechanisms -> ... -> checks
    if case == "upward" and name == "dpjax.core.mechanisms":
      out.append(("dpjax.training.plan", 1, False))
    return out

  monkeypatch.setattr(sys.modules[__name__], "_imports", planted)
  test = test_no_import_cycles if case == "cycle" else test_no_upward_or_sideways_imports
  with pytest.raises(AssertionError):
    test()


# Functions over MAX_FUNCTION_LINES, each with why it is one function. Shrink, never grow.
LONG_FUNCTIONS = {
  "dpjax/pipelines/distill.py::run": (
    "DistilDP's three resumable stages in order; each stage's skip-if-done reads the last's files"
  ),
  "dpjax/core/clipping/ghost.py::clip_chunk": (
    "one traced pass: the norms of every intercepted layer must be summed in the trace that "
    "captured them"
  ),
  "dpjax/tasks/text_classification.py::text_classification": (
    "the task builder: data, tokenizer, model, trained subset and loss read in one order"
  ),
  "dpjax/cli.py::parser": "the argument parser: one add_argument per option of every command",
  "dpjax/data/tables.py::load_labelled_text": (
    "one pass over the records that names the first bad one (text, split, label, pair)"
  ),
}
MAX_FUNCTION_LINES = 120
MAX_FIT_LINES = 80  # the step loop reads in one screen


# Modules over MAX_MODULE_LINES, each with why it is one module; the module's docstring
# says so too. Shrink, never grow.
LONG_MODULES = {
  "dpjax/core/accounting/lmo.py": "LMO-DP's soundness argument and the code of each of its steps",
}
MAX_MODULE_LINES = 650


def test_no_module_is_longer_than_one_concept_needs():
  long = set()
  for path in MODULES.values():
    rel = os.path.relpath(path, os.path.dirname(ROOT))
    with open(path) as f:
      if sum(1 for _ in f) > MAX_MODULE_LINES:
        long.add(rel)
  assert long <= set(LONG_MODULES), sorted(long - set(LONG_MODULES))
  assert not set(LONG_MODULES) - long, f"no longer long: {sorted(set(LONG_MODULES) - long)}"


def _function_lengths() -> Dict[str, int]:
  out = {}
  for path in _modules().values():
    rel = os.path.relpath(path, os.path.dirname(ROOT))
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        out[f"{rel}::{node.name}"] = node.end_lineno - node.lineno + 1
  return out


def test_no_function_is_longer_than_a_screen_or_two_unless_it_says_why():
  lengths = _function_lengths()
  long = {k for k, n in lengths.items() if n > MAX_FUNCTION_LINES}
  assert long <= set(LONG_FUNCTIONS), sorted(long - set(LONG_FUNCTIONS))
  assert lengths["dpjax/training/loop.py::fit"] <= MAX_FIT_LINES
  stale = sorted(k for k in LONG_FUNCTIONS if lengths.get(k, 0) <= MAX_FUNCTION_LINES)
  assert not stale, f"no longer long (remove from LONG_FUNCTIONS): {stale}"


def test_the_facades_short_paths_are_importable_modules():
  import importlib

  import dpjax

  for short, full in {
    "accounting": "dpjax.core.accounting",
    "mechanisms": "dpjax.core.mechanisms",
    "flatness": "dpjax.methods.flatness",
    "distill": "dpjax.pipelines.distill",
  }.items():
    assert importlib.import_module(f"dpjax.{short}") is importlib.import_module(full)
    assert getattr(dpjax, short) is importlib.import_module(full)
  from dpjax.mechanisms import gaussian  # noqa: F401  (the form users write)


# Where dpjax/training/ still names a built-in mechanism or a privacy variant (correlated
# noise, user-level sampling, DP-SAM's mode) in its code, and why. Everything else a
# mechanism decides (its noise, its event, its norm, its accountants, its record) is asked
# of its object (`dpjax.core.mechanisms`), which is what lets a user's own registered
# mechanism train without an edit here (tests/test_howto_mechanism.py); a variant is asked
# of the object it made (the sampler's `per_user`, DP-SAM's `charged`, the plan's bands).
# The spec module (spec.py, keys.py) is where the names are declared and their
# combinations checked, once, at the boundary: it is not scanned.
MECHANISM_NAMES = ("gaussian", "laplace", "lmo")
VARIANT_NAMES = ("blt", "optimal", "sqrt", "example", "user", "els", "uls", "free", "charged")
NAMED_MECHANISMS = {
  "dpjax/training/plan.py::_unit_sampler": "the unit and its sampling pick the sampler, once",
  "dpjax/training/plan.py::_correlation": "BLT's fitted parameters, or BandMF's coefficients",
  "dpjax/training/plan.py::<module>": (
    "SAMPLINGS, each sampling's builder; SEARCHES, the one mechanism a target epsilon searches"
  ),
}
SPEC_MODULES = ("spec.py", "keys.py")


def _mechanism_branches() -> List[str]:
  """'file::function' for each comparison, dict key or `get(...)` naming a mechanism or a
  variant, outside the spec module."""
  found = []
  for path in sorted(glob.glob(os.path.join(ROOT, "training", "*.py"))):
    rel = os.path.relpath(path, os.path.dirname(ROOT))
    if os.path.basename(path) in SPEC_MODULES:
      continue

    def names(node) -> bool:
      if isinstance(node, ast.Constant):
        return node.value in MECHANISM_NAMES + VARIANT_NAMES
      return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(map(names, node.elts))

    def visit(node, where):
      for child in ast.iter_child_nodes(node):
        here = child.name if isinstance(child, (ast.FunctionDef, ast.ClassDef)) else where
        if isinstance(child, ast.Compare) and any(map(names, [child.left, *child.comparators])):
          found.append(f"{rel}::{where}")
        elif isinstance(child, ast.Dict) and any(k is not None and names(k) for k in child.keys):
          found.append(f"{rel}::{where}")
        elif isinstance(child, ast.Call) and any(map(names, child.args)):
          fn = child.func
          if (fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")) == "get":
            found.append(f"{rel}::{where}")
        visit(child, here)

    visit(ast.parse(open(path).read(), path), "<module>")
  return found


def test_training_asks_the_mechanism_object_not_its_name():
  found = _mechanism_branches()
  assert len(found) <= 5 and set(found) <= set(NAMED_MECHANISMS), sorted(
    set(found) - set(NAMED_MECHANISMS)
  )
  stale = sorted(set(NAMED_MECHANISMS) - set(found))
  assert not stale, f"no longer naming a mechanism (remove from NAMED_MECHANISMS): {stale}"


# Names a config, a spec or one of their sections goes by in dpjax's code.
CONFIG_NAMES = {"cfg", "config", "spec", "t", "s", "tcfg", "hist", "hist_cfg", "section"}


def _config_gets() -> List[str]:
  """'file:line: text' for each `.get(` on a config or a section of it outside the spec."""
  found = []
  for path in sorted(glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)):
    rel = os.path.relpath(path, os.path.dirname(ROOT))
    if rel in ("dpjax/training/spec.py", "dpjax/training/keys.py"):
      continue
    for node in ast.walk(ast.parse(open(path).read(), path)):
      if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        continue
      if node.func.attr != "get":
        continue
      root = node.func.value
      while isinstance(root, (ast.Attribute, ast.Subscript)):
        root = root.value
      if isinstance(root, ast.Name) and root.id in CONFIG_NAMES:
        found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
  return found


def test_config_sections_are_read_as_declared_not_with_get_defaults():
  # A key's default is declared once (the key table, a task's DEFAULTS, a distill
  # section's keys) and read as an attribute; `.get(key, default)` would write a
  # second default where the key is read.
  found = _config_gets()
  assert not found, "\n".join(found)


def test_the_api_reference_renders_every_module():
  # docs/api.md is generated from the docstrings module by module: a new module is
  # documented when it is listed there (the command line and the shipped configs have
  # their own pages: `dpjax --help`, `dpjax train --list`).
  with open(os.path.join(os.path.dirname(ROOT), "docs", "api.md")) as f:
    listed = set(re.findall(r"^::: ([\w.]+)$", f.read(), flags=re.M))
  modules = {
    name
    for name in MODULES
    if not name.startswith("dpjax.configs") and name not in ("dpjax.cli", "dpjax.__main__")
  }
  packages = {name for name in modules if MODULES[name].endswith("__init__.py")}
  missing = sorted(modules - packages - listed)
  assert not missing, f"not in docs/api.md: {missing}"
  assert listed <= modules, sorted(listed - modules)
