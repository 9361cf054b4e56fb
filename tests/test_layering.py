"""The package's layers import only downward, and never from inside a function.

Layers, lowest first (a module may import its own layer or lower ones):

0. the top-level helpers named in :data:`LAYERS` (``checks``), ``data``,
   ``models``
1. ``algorithms``
2. ``privacy`` (DP aggregation, accounting, release)
3. ``engine`` (the compiled round)
4. ``evaluation`` (central, per-client personalization, clusters)
5. ``training`` (setup, the runner, workdir)
6. ``audit`` (runs whole experiments with canaries)
7. ``experiments`` (entry points, studies, benchmarks: may import anything)

Every ``fedjax_lab`` module is parsed with :mod:`ast` (nothing is imported);
an import of ``fedjax_lab.<pkg>`` inside a function or class body (the usual
way to dodge a cycle) is reported as well, whatever its layer. Imports under
``if TYPE_CHECKING:`` count like any other: a type hint naming a higher layer
is still an upward dependency. A subpackage or top-level module missing from
the table fails too, so the table stays complete (a new top-level module,
say a public API, must be given its layer here).
"""

from __future__ import annotations

import ast
import pathlib
import sys
from typing import Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "fedjax_lab"

# Subpackage (or top-level module) name -> layer; "" is the package itself.
LAYERS = {
    "": 0, "checks": 0, "data": 0, "models": 0,
    "algorithms": 1,
    "privacy": 2,
    "engine": 3,
    "evaluation": 4,
    "training": 5,
    "audit": 6,
    "experiments": 7,
}


def _module_name(path: pathlib.Path) -> str:
  """``fedjax_lab/a/b.py`` -> ``fedjax_lab.a.b`` (``__init__`` dropped)."""
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _section(module: str) -> str:
  """The layer key of a dotted name under ``fedjax_lab`` (or experiments)."""
  parts = module.split(".")
  if parts[0] == "experiments":
    return "experiments"
  return parts[1] if len(parts) > 1 else ""


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
  """The absolute module a (possibly relative) ``from`` import names."""
  if not node.level:
    return node.module or ""
  base = module.split(".")
  if not is_package:
    base = base[:-1]
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
  """The fedjax_lab / experiments names an import statement binds, dotted.

  ``from fedjax_lab.engine import round`` gives ``fedjax_lab.engine.round``,
  ``from fedjax_lab.engine.strategy import Strategy`` gives
  ``fedjax_lab.engine.strategy.Strategy``: only the second part (the
  subpackage) decides the layer.
  """
  if isinstance(node, ast.Import):
    names = [alias.name for alias in node.names]
  else:
    source = _resolve(node, module, is_package)
    if source == PACKAGE:
      names = [f"{PACKAGE}.{alias.name}" for alias in node.names]
    else:
      names = [f"{source}.{alias.name}" for alias in node.names]
  return [n for n in names
          if n.split(".")[0] in (PACKAGE, "experiments")]


def _imports(tree: ast.Module) -> Iterator[tuple[ast.AST, bool]]:
  """Every import statement, with whether it sits in a function or class."""

  def walk(node: ast.AST, nested: bool) -> Iterator[tuple[ast.AST, bool]]:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        yield child, nested
      inner = nested or isinstance(
          child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda,
                  ast.ClassDef))
      yield from walk(child, inner)

  yield from walk(tree, False)


def _modules() -> list[pathlib.Path]:
  return sorted((ROOT / PACKAGE).rglob("*.py"))


def layering_violations() -> list[str]:
  """One line per upward, function-level or unmapped fedjax_lab import."""
  problems = []
  for path in _modules():
    module = _module_name(path)
    own = _section(module)
    where = path.relative_to(ROOT)
    if own not in LAYERS:
      problems.append(f"{where}: subpackage {own!r} has no layer in "
                      "tests/test_layering.py")
      continue
    tree = ast.parse(path.read_text(), str(path))
    for node, nested in _imports(tree):
      for target in _targets(node, module, path.name == "__init__.py"):
        section = _section(target)
        if nested:
          problems.append(f"{where}:{node.lineno}: function-level import "
                          f"of {target}")
        if section not in LAYERS:
          problems.append(f"{where}:{node.lineno}: {target} has no layer")
        elif LAYERS[section] > LAYERS[own]:
          problems.append(
              f"{where}:{node.lineno}: {own or PACKAGE} (layer "
              f"{LAYERS[own]}) imports {target} (layer {LAYERS[section]})")
  return problems


def test_layers_import_only_downward():
  problems = layering_violations()
  assert not problems, ("imports against the layering (see this test's "
                        "docstring):\n" + "\n".join(problems))


def test_every_subpackage_has_a_layer():
  sections = {_section(_module_name(p)) for p in _modules()}
  assert sections <= set(LAYERS), sorted(sections - set(LAYERS))


@pytest.mark.parametrize("source, expected", [
    ("from fedjax_lab.training import loop\n", ["fedjax_lab/engine/x.py:1"]),
    ("def f():\n  from fedjax_lab.data import cohort\n",
     ["function-level import of fedjax_lab.data.cohort"]),
    ("from .. import training\n", ["imports fedjax_lab.training"]),
    ("import experiments.run\n", ["imports experiments.run"]),
    ("from fedjax_lab.algorithms import base\nimport numpy\n", []),
])
def test_the_checker_catches_what_it_should(tmp_path, monkeypatch, source,
                                            expected):
  """The checker itself, on a fake engine module."""
  fake = tmp_path / PACKAGE / "engine"
  fake.mkdir(parents=True)
  (fake / "x.py").write_text(source)
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  problems = layering_violations()
  assert len(problems) == len(expected), problems
  for problem, text in zip(problems, expected):
    assert text in problem
