"""Federated algorithms, and the registry mapping ``config.algorithm`` to them.

Each algorithm module declares a :class:`~fedjax_lab.algorithms.recipe.Recipe`
next to its factory (how it is built from its config block, what it refuses
and why); one line below registers it. A user module or a test adds an
algorithm without editing this package: ``register(Recipe(...))``.
"""

from __future__ import annotations

from typing import Any

from fedjax_lab.algorithms import agnostic
from fedjax_lab.algorithms import fedavg
from fedjax_lab.algorithms import fedprox
from fedjax_lab.algorithms import hypcluster
from fedjax_lab.algorithms import mime
from fedjax_lab.algorithms import reptile
from fedjax_lab.algorithms import scaffold
from fedjax_lab.algorithms.recipe import BuildContext
from fedjax_lab.algorithms.recipe import Recipe

__all__ = ["BuildContext", "Recipe", "config_blocks", "get", "names",
           "register", "unregister"]

_RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe, replace: bool = False) -> Recipe:
  """Makes ``recipe`` buildable as ``config.algorithm = recipe.name``.

  Raises:
    ValueError: the name is taken (unless ``replace``), or the recipe shares
      a config block with another whose options differ.
  """
  if recipe.name in _RECIPES and not replace:
    raise ValueError(f"algorithm {recipe.name!r} is already registered; "
                     "pass replace=True to override it.")
  for other in _RECIPES.values():
    if (other.name != recipe.name and recipe.block is not None and
        other.block == recipe.block and
        other.option_defaults() != recipe.option_defaults()):
      raise ValueError(
          f"algorithm {recipe.name!r} shares config block {recipe.block!r} "
          f"with {other.name!r} but takes different options or defaults.")
  _RECIPES[recipe.name] = recipe
  return recipe


def unregister(name: str) -> None:
  """Removes a registered algorithm (e.g. a test's own)."""
  _RECIPES.pop(name, None)


def get(name: str) -> Recipe:
  """The recipe registered as ``name``.

  Raises:
    ValueError: no such algorithm (the message lists the registered ones).
  """
  if name not in _RECIPES:
    raise ValueError(f"algorithm must be one of {names()}, got {name!r}.")
  return _RECIPES[name]


def names() -> tuple[str, ...]:
  """The registered algorithm names, in registration order."""
  return tuple(_RECIPES)


def config_blocks() -> dict[str, dict[str, Any]]:
  """Every registered algorithm's config block with its defaults (block name
  -> {key: default}), in registration order: what the base config holds."""
  blocks = {}
  for recipe in _RECIPES.values():
    if recipe.block is not None and recipe.block not in blocks:
      blocks[recipe.block] = recipe.option_defaults()
  return blocks


register(fedavg.FEDAVG)
register(fedavg.FEDOPT)
register(fedavg.FEDSGD)
register(fedprox.RECIPE)
register(scaffold.RECIPE)
register(mime.MIME)
register(mime.MIMELITE)
register(reptile.RECIPE)
register(agnostic.RECIPE)
register(hypcluster.RECIPE)
