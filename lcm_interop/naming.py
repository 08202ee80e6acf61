"""Flax parameter trees <-> reference (fairseq2 / PyTorch) state-dict keys.

The Flax names already mirror the reference, so the mapping is mechanical:
  * path components are joined with ``.``;
  * a Dense ``kernel`` (in, out) becomes ``weight`` (out, in) (transpose); ``bias``, RMSNorm
    ``weight`` and an embedding table's ``weight`` (:data:`~lcm_interop.reference.EMBEDDING_TABLES`,
    e.g. the One-Tower's ``pos_encoder``) are unchanged;
  * an unscanned stack's ``layers_N`` becomes ``layers.N``; a scanned stack's ``layers`` (params
    stacked on axis 0) is split into ``layers.0`` ... ``layers.{N-1}``;
  * the ``buffers`` collection (the frozen normalizer) maps the same way.

The generic :func:`flax_to_reference` / :func:`reference_to_flax` serve every family; the
wrappers :func:`to_reference` / :func:`from_reference` also check the keys and shapes against
:func:`reference_shapes` of the config's family (:data:`lcm_interop.reference.REFERENCE_FAMILIES`).
NumPy only at import time (flax is imported to unbox partitioned trees).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from lcm_interop.reference import EMBEDDING_TABLES, reference_shapes
from lcm_jax.errors import UserError

__all__ = ["flax_to_reference", "reference_to_flax", "to_reference", "from_reference",
           "reference_shapes"]

_UNSCANNED_LAYER = re.compile(r"^layers_(\d+)$")
_BUFFER_MODULES = ("sonar_normalizer",)  # reference modules whose tensors are Flax 'buffers'


# ----------------------------------------------------------------------------------------------
# Generic conversion

def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out: dict[tuple[str, ...], Any] = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (str(key),)))
    else:
      out[prefix + (str(key),)] = value
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _unwrap(tree: Any, collection: str) -> Mapping[str, Any]:
  """Accepts a collection's tree or a variables dict holding it; unboxes partitioning metadata."""
  if tree is None:
    return {}
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  tree = nn.meta.unbox(tree)
  if hasattr(tree, "unfreeze"):
    tree = tree.unfreeze()
  if set(tree) == {collection}:
    tree = tree[collection]
  return tree


def _leaf_to_reference(path: tuple[str, ...], value: np.ndarray) -> tuple[str, np.ndarray]:
  if path[-1] == "kernel":
    return ".".join(path[:-1] + ("weight",)), np.ascontiguousarray(np.swapaxes(value, -1, -2))
  return ".".join(path), value


def flax_to_reference(params: Any, buffers: Any = None) -> dict[str, np.ndarray]:
  """Converts Flax ``params`` (+ ``buffers``) trees, scanned or not, to reference keys."""
  flat = {**_flatten(_unwrap(params, "params")), **_flatten(_unwrap(buffers, "buffers"))}
  out: dict[str, np.ndarray] = {}
  for path, value in flat.items():
    value = np.asarray(value)
    if "layers" in path:  # scanned stack: split the leading axis into layers.0 ... layers.N-1
      k = path.index("layers")
      for i in range(value.shape[0]):
        key, v = _leaf_to_reference(path[:k + 1] + (str(i),) + path[k + 1:], value[i])
        out[key] = v
      continue
    path = tuple(f"layers.{m.group(1)}" if (m := _UNSCANNED_LAYER.match(p)) else p for p in path)
    key, v = _leaf_to_reference(path, value)
    out[key] = v
  return out


def reference_to_flax(state_dict: Mapping[str, Any],
                      scan_layers: bool) -> tuple[dict[str, Any], dict[str, Any]]:
  """The inverse of :func:`flax_to_reference`: returns ``(params, buffers)`` nested dicts of
  NumPy arrays (no partitioning metadata), stacks scanned as the model's ``scan_layers`` says."""
  params: dict[tuple[str, ...], Any] = {}
  buffers: dict[tuple[str, ...], Any] = {}
  stacked: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    path = tuple(key.split("."))
    target = buffers if any(m in path for m in _BUFFER_MODULES) else params
    if (path[-1] == "weight" and value.ndim == 2  # a Linear: (out, in) -> kernel (in, out)
        and not any(m in path for m in EMBEDDING_TABLES)):
      path = path[:-1] + ("kernel",)
      value = np.ascontiguousarray(np.swapaxes(value, -1, -2))
    if "layers" in path:
      k = path.index("layers")
      index = int(path[k + 1])
      if scan_layers:
        stacked.setdefault(path[:k + 1] + path[k + 2:], {})[index] = value
        continue
      path = path[:k] + (f"layers_{index}",) + path[k + 2:]
    target[path] = value
  for path, by_index in stacked.items():
    if sorted(by_index) != list(range(len(by_index))):
      raise UserError(f"reference_to_flax: {'.'.join(path)}: layers {sorted(by_index)} are not "
                       "0..N-1")
    params[path] = np.stack([by_index[i] for i in range(len(by_index))])
  return _unflatten(params), _unflatten(buffers)


# ----------------------------------------------------------------------------------------------
# Checked wrappers (the spec's key list of the config's family)

def _check_shapes(state: Mapping[str, Any], cfg: Any, where: str) -> None:
  expected = reference_shapes(cfg)
  missing = sorted(set(expected) - set(state))
  unexpected = sorted(set(state) - set(expected))
  if missing or unexpected:
    raise UserError(f"{where}: keys differ from the reference: missing {missing[:8]}"
                     f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                     f"{'...' if len(unexpected) > 8 else ''}")
  for key, shape in expected.items():
    if tuple(np.shape(state[key])) != shape:
      raise UserError(f"{where}: {key}: shape {tuple(np.shape(state[key]))}, reference {shape}")


def to_reference(params: Any, buffers: Any, cfg: Any) -> dict[str, np.ndarray]:
  """Flax ``params`` and ``buffers`` (scanned or unscanned) of a ``cfg.family`` model -> reference
  state dict of NumPy arrays (Linear weights (out, in)). Raises if keys or shapes differ from the
  spec."""
  state = flax_to_reference(params, buffers)
  _check_shapes(state, cfg, "to_reference")
  return state


def from_reference(state_dict: Mapping[str, Any],
                   cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reference state dict -> ``(params, buffers)`` laid out for ``cfg`` (``cfg.scan_layers``)."""
  _check_shapes(state_dict, cfg, "from_reference")
  return reference_to_flax(state_dict, cfg.scan_layers)
