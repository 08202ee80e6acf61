"""The recipes: one module per family and size, ``get_config(variant)`` each (``base.py``: the
defaults they share)."""

import functools
import importlib
import os


@functools.cache
def tiny_recipes() -> dict:
  """family name -> the first recipe module (by file name) whose ``tiny`` variant trains that
  family: how the tests and benchmarks find a family's recipe without naming it."""
  found = {}
  for file in sorted(os.listdir(os.path.dirname(os.path.abspath(__file__)))):
    if not file.endswith(".py") or file.startswith("_") or file == "base.py":
      continue
    module = importlib.import_module(f"configs.{file[:-3]}")
    try:
      family = module.get_config("tiny").model.family
    except Exception:  # pylint: disable=broad-except  # a recipe without a tiny variant
      continue
    found.setdefault(family, module)
  return found
