"""The shape of the house: imports in lcm_jax/ go one way.

* no import circle between lcm_jax's modules (imports anywhere in a file count, function-level
  ones included);
* lcm_jax/ never imports data_prep/ (the PyTorch-side tools) or lcm_interop/ (PyTorch interop);
* every family file is registered, and only lcm_jax/families/ names a family.
"""

from __future__ import annotations

import ast
import os
import re

from lcm_jax import families
from tests.helpers import ROOT

PACKAGE = os.path.join(ROOT, "lcm_jax")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, module: str) -> set[str]:
  """Every module ``path`` imports (absolute names; relative imports resolved)."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  is_pkg = path.endswith("__init__.py")
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = module.split(".")
        parts = parts if is_pkg else parts[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      out.add(base)
      out.update(f"{base}.{a.name}" for a in node.names)
  return out


def _graph() -> dict[str, set[str]]:
  files = {}
  for d, _, names in os.walk(PACKAGE):
    for n in names:
      if n.endswith(".py"):
        p = os.path.join(d, n)
        files[_module_name(p)] = p
  graph = {}
  for mod, path in files.items():
    targets = set()
    for name in _imports(path, mod):
      # "from lcm_jax import x" names the module lcm_jax.x when it exists, else the package.
      while name and name not in files:
        name = name.rpartition(".")[0]
      if name and name != mod and not mod.startswith(name + "."):
        targets.add(name)
    graph[mod] = targets
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_circle_in_lcm_jax():
  assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_circle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _python_files(top: str):
  for d, _, names in os.walk(os.path.join(ROOT, top)):
    for n in sorted(names):
      if n.endswith(".py"):
        yield os.path.join(d, n)


def test_lcm_jax_never_imports_the_pytorch_side():
  bad = {}
  for p in _python_files("lcm_jax"):
    hits = sorted(i for i in _imports(p, _module_name(p))
                  if i.split(".")[0] in ("data_prep", "lcm_interop", "torch"))
    if hits:
      bad[os.path.relpath(p, ROOT)] = hits
  assert bad == {}


def _code_strings(path: str) -> list[tuple[int, str]]:
  """(line, text) of every string constant in ``path`` that is not documentation (a docstring or
  another bare string statement, e.g. an attribute's docstring)."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  docs = {id(node.value) for node in ast.walk(tree)
          if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
  return [(node.lineno, node.value) for node in ast.walk(tree)
          if isinstance(node, ast.Constant) and isinstance(node.value, str)
          and id(node) not in docs]


def test_only_the_families_package_names_a_family():
  """No string in lcm_jax/ (outside lcm_jax/families/), benchmarks/ or data_prep/ names a
  family: the tools look families up instead of comparing names."""
  pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in families.REGISTRY) + r")\b")
  families_dir = os.path.join(PACKAGE, "families") + os.sep
  offenders = {}
  for top in ("lcm_jax", "benchmarks", "data_prep"):
    for p in _python_files(top):
      if p.startswith(families_dir):
        continue
      lines = sorted({line for line, text in _code_strings(p) if pattern.search(text)})
      if lines:
        offenders[os.path.relpath(p, ROOT)] = lines
  assert offenders == {}


def test_every_family_file_is_registered():
  files = {f"lcm_jax.families.{n[:-3]}" for n in os.listdir(os.path.join(PACKAGE, "families"))
           if n.endswith(".py") and n not in ("__init__.py", "family.py")}
  registered = set()
  for module in files:
    family = getattr(__import__(module, fromlist=["FAMILY"]), "FAMILY", None)
    if family is not None and families.REGISTRY.get(family.name) is family:
      registered.add(module)
  assert registered == files
