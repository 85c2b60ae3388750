"""Every public function of dpjax says what it takes and what it gives back.

A public function (module level, or a method of a public class, whose name
has no leading underscore) has a docstring; one that takes arguments has an
"Args:" section, and one that takes arguments and returns a value has a
"Returns:" (or "Yields:") section. Properties, flax's `setup`/`__call__` and
the overrides of documented hooks (`Callback.on_*`, dp-accounting's
`get_epsilon`/`get_delta`, a `Mechanism`'s methods) are exempt: their contract is written once where
it is defined. So is a shipped config's `get_config()` (configs/): its
module docstring says what the run is, and `dpjax train --list` shows it.
"""

from __future__ import annotations

import ast
import os
from typing import Iterator, List, Tuple

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dpjax")
HOOKS = {"on_start", "on_step", "on_log", "on_end", "get_epsilon", "get_delta", "setup"}
# A mechanism's methods are documented once, on `dpjax.core.mechanisms.base.Mechanism`:
# the public methods that class defines, read from its source.
MECHANISM_METHODS = {
  item.name
  for node in ast.parse(open(os.path.join(ROOT, "core", "mechanisms", "base.py")).read()).body
  if isinstance(node, ast.ClassDef) and node.name == "Mechanism"
  for item in node.body
  if isinstance(item, ast.FunctionDef) and not item.name.startswith("_")
}
assert {"transform", "step_event", "noise_variance"} <= MECHANISM_METHODS


def _public_functions(tree: ast.Module) -> Iterator[Tuple[str, ast.FunctionDef, bool]]:
  for node in tree.body:
    if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
      yield node.name, node, False
    elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
      for item in node.body:
        if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
          yield f"{node.name}.{item.name}", item, True


def _is_property(fn: ast.FunctionDef) -> bool:
  return any(
    getattr(d, "id", None) == "property" or getattr(d, "attr", None) == "setter"
    for d in fn.decorator_list
  )


def _returns_value(fn: ast.FunctionDef) -> bool:
  """A `return <value>` in `fn` itself (not in a function nested inside it)."""
  stack: List[ast.AST] = list(fn.body)
  while stack:
    node = stack.pop()
    if isinstance(node, ast.Return) and node.value is not None:
      return True
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
      stack.extend(ast.iter_child_nodes(node))
  return False


def missing_sections(source: str, config: bool = False) -> List[str]:
  """'name: what is missing' for each public function of `source` that lacks a section."""
  out = []
  for name, fn, is_method in _public_functions(ast.parse(source)):
    if _is_property(fn) or (is_method and fn.name in HOOKS):
      continue
    if is_method and fn.name in MECHANISM_METHODS and not name.startswith("Mechanism."):
      continue
    if config and name == "get_config":
      continue
    doc = ast.get_docstring(fn) or ""
    args = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]
    args = [a for a in args if a not in ("self", "cls")]
    if fn.args.vararg:
      args.append(fn.args.vararg.arg)
    lacks = []
    if not doc:
      lacks.append("a docstring")
    if args and "Args:" not in doc:
      lacks.append("Args")
    if args and _returns_value(fn) and "Returns:" not in doc and "Yields:" not in doc:
      lacks.append("Returns")
    if lacks:
      out.append(f"{name}: {', '.join(lacks)}")
  return out


def test_every_public_function_documents_its_arguments_and_result():
  problems = []
  configs = os.path.join(os.path.dirname(ROOT), "configs")  # shipped as dpjax.configs
  for top in (ROOT, configs):
    for folder, _, files in os.walk(top):
      for f in sorted(files):
        if f.endswith(".py"):
          path = os.path.join(folder, f)
          with open(path) as fh:
            rel = os.path.relpath(path, os.path.dirname(ROOT))
            problems += [f"{rel} {m}" for m in missing_sections(fh.read(), top == configs)]
  assert not problems, "\n".join(problems)


def test_the_check_finds_what_is_missing():
  src = '''
def documented(x):
  """Doubles.

  Args:
    x: a number.

  Returns:
    2 x.
  """
  return 2 * x

def no_returns(x):
  """Doubles.

  Args:
    x: a number.
  """
  def inner():
    return 1
  return 2 * x

def nested_return_only(x):
  """Calls back.

  Args:
    x: a callback.
  """
  def inner():
    return 1
  x(inner)

def bare(x):
  return x

def _private(x):
  return x

class Thing:
  @property
  def size(self):
    return 1

  def grow(self, by):
    """Grows."""
'''
  assert missing_sections(src) == [
    "no_returns: Returns",
    "bare: a docstring, Args, Returns",
    "Thing.grow: Args",
  ]
