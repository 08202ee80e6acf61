"""The device mesh and the logical-axis rules: sharding is configuration, not code.

Mesh axes are ``(data, fsdp, tensor)``. Model code names logical axes on parameters
(``nn.with_logical_partitioning``) and activations (``nn.with_logical_constraint``); the rules
below map those names onto mesh axes. The batch is split over ``data`` and ``fsdp``; parameters
(and with them the optimizer state) are split along ``embed`` over ``fsdp`` and along
``heads``/``mlp`` over ``tensor`` (Megatron-style).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lcm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("sonar", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("time", None),
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
)


class MeshError(UserError):
  """The configured mesh does not fit the devices or the batch."""


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolves ``config.mesh`` (one axis may be -1 = the rest) against the device count."""
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise MeshError(f"config.mesh: at most one axis may be -1, got data={sizes[0]} fsdp={sizes[1]} "
                    f"tensor={sizes[2]}")
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"config.mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise MeshError(f"config.mesh: {dict(zip(MESH_AXES, sizes))} does not divide the "
                      f"{num_devices} available devices ({num_devices} % {fixed} != 0)")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise MeshError(f"config.mesh: data*fsdp*tensor = {'*'.join(map(str, sizes))} = "
                    f"{math.prod(sizes)} != {num_devices} available devices")
  return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh with Auto axis types (sharding propagated by XLA)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    dev_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except  (irregular device sets, e.g. CPU)
    dev_array = np.asarray(devices).reshape(shape)
  return Mesh(dev_array, MESH_AXES)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def check_batch(global_batch: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
  """The global batch must split into microbatches that split over data x fsdp."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % grad_accum_steps:
    raise MeshError(f"config.data.global_batch_size={global_batch} is not divisible by "
                    f"config.optimizer.grad_accum_steps={grad_accum_steps}")
  micro = global_batch // grad_accum_steps
  if micro % shards:
    raise MeshError(f"config.data.global_batch_size={global_batch} (microbatch {micro}) is not "
                    f"divisible by the mesh's data*fsdp = {shards} batch shards")


def logical_to_sharding(logical_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """Maps a tree of logical PartitionSpecs (from ``nn.get_partition_spec``) to NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, list(rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch_from_local(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays sharded over data x fsdp."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
          for k, v in batch.items()}


@contextlib.contextmanager
def activate(mesh: Mesh, rules=LOGICAL_RULES):
  """Mesh + logical rules in scope, so ``nn.with_logical_constraint`` in model code takes effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    yield


def jit_under_mesh(fn, mesh: Mesh, **jit_kwargs):
  """``jax.jit(fn)`` whose calls (and so its tracing) run under :func:`activate`."""
  jitted = jax.jit(fn, **jit_kwargs)

  def call(*args):
    with activate(mesh):
      return jitted(*args)
  call.jitted = jitted
  return call


# The arrays of a global batch (lcm_jax.data's keys) and their ranks.
BATCH_NDIM = {"embeddings": 3, "segment_ids": 2, "positions": 2, "target_mask": 2}


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
  """The shardings of a global batch's arrays over ``data x fsdp`` (train and eval steps)."""
  return {k: batch_sharding(mesh, nd) for k, nd in BATCH_NDIM.items()}
