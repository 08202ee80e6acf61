"""Orbax checkpoints: train state, data-iterator state and metadata saved together, per step.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,meta}``. ``state`` is the train-state pytree
(params, buffers, optimizer state, step, rng), ``data`` the Grain iterator state, ``meta`` a JSON
dict (config, mesh). Saves are asynchronous; Orbax writes to a temporary directory and renames it
when complete, so a killed process never leaves a checkpoint that ``latest_step`` would pick up.

``data`` holds one JSON file per data shard (read-and-pack stream, ``config.data.data_shards``),
``data_shard_<k>-of-<K>.json``, written by the process that runs shard ``k``: the Grain state of
that stream alone. A restart with any process count that divides ``K`` reads the files of its own
shards, so it resumes the data exactly. Checkpoints of earlier versions hold one file per process
(``process_<p>-of-<P>.json``, Grain's own layout); they resume with the same process count.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

from etils import epath
import flax.linen as nn
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from lcm_jax import families
from lcm_jax import sharding
from lcm_jax.errors import UserError


class CheckpointError(UserError):
  pass


# ----------------------------------------------------------------------------------------------
# The data-iterator state: one file per data shard

_SHARD_FILE = re.compile(r"data_shard_(\d+)-of-(\d+)\.json")
_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")  # Grain's per-process layout


def _shard_file(k: int, num_shards: int) -> str:
  return f"data_shard_{k}-of-{num_shards}.json"


def _per_shard(data_iter: Any) -> bool:
  """Whether ``data_iter`` keeps its state per data shard (a ``lcm_jax.data.TrainIterator``)."""
  return hasattr(data_iter, "data_shards") and hasattr(data_iter, "num_data_shards")


class DataStateHandler:
  """Orbax handler for the data iterator: one file per data shard (see the module docstring).

  Every process writes the files of its own data shards into the same directory. An iterator
  without per-shard state (any other Grain ``DatasetIterator``) is saved as Grain does, one file
  per process. Restore reads whichever layout the checkpoint has; :meth:`Checkpointer.restore`
  checks beforehand that it fits this run.
  """

  def save(self, directory: epath.Path, item: Any = None, args: Any = None) -> None:
    it = item if item is not None else args.item
    if not _per_shard(it):
      grain.checkpoint.CheckpointHandler().save(directory, item=it)
      return
    state = it.get_state()
    for k in it.data_shards:
      (directory / _shard_file(k, it.num_data_shards)).write_text(
          json.dumps(state["states"][str(k)], indent=1))

  def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> Any:
    it = item if item is not None else args.item
    names = [p.name for p in directory.iterdir()]
    if not _per_shard(it) or not any(_SHARD_FILE.fullmatch(n) for n in names):
      if _per_shard(it):  # an earlier version's checkpoint: one state per process
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        it.set_process_state(json.loads((directory / name).read_text()))
        it.start_prefetch()
        return it
      return grain.checkpoint.CheckpointHandler().restore(directory, item=it)
    states = {str(k): json.loads((directory / _shard_file(k, it.num_data_shards)).read_text())
              for k in it.data_shards}
    it.set_state({"data_shards": it.num_data_shards, "states": states})
    it.start_prefetch()
    return it

  def structure(self, directory: epath.Path) -> Any:
    del directory
    return None

  def metadata(self, directory: epath.Path) -> Any:
    del directory
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass

  @classmethod
  def typestr(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  item: Any


# config.model fields a run may change when it resumes: they change how the model computes, not
# the shapes of what it saved.
RESUMABLE_MODEL_FIELDS = frozenset({"dropout", "dtype", "remat_policy", "attention_impl"})


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with the three items lcm_jax saves."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, create: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self._mgr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": DataStateHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def _existing_step(self, step: int | None, purpose: str) -> int:
    """``step`` (latest if None), checked to exist; CheckpointError otherwise."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"{self.directory}: no checkpoint {purpose}")
    if step not in self.all_steps():
      raise CheckpointError(f"{self.directory}: no checkpoint for step {step} "
                            f"(available: {self.all_steps()})")
    return step

  def save(self, step: int, state: Any, data_iter: Any | None, meta: dict[str, Any],
           *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      items["data"] = DataStateSave(data_iter)
    return self._mgr.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int | None, abstract_state: Any, data_iter: Any | None = None):
    """Restores ``state`` onto the shardings in ``abstract_state`` (any mesh) and the iterator.

    The data-iterator state resumes on any process count that divides the number of data shards
    it was saved with (CheckpointError if this run's data shards differ, see
    :meth:`_check_data_state`).
    """
    step = self._existing_step(step, "to restore")
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      self._check_data_state(step, data_iter)
      items["data"] = DataStateRestore(data_iter)
    restored = self._mgr.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def _check_data_state(self, step: int, data_iter: Any) -> None:
    """Checks that the saved data-iterator state of ``step`` fits ``data_iter``; CheckpointError.

    Per data shard (``data_shard_<k>-of-<K>.json``): ``data_iter`` must have the same ``K`` and
    every one of its shards must have a file. Per process (earlier versions, or an iterator
    without per-shard state): the same process count.
    """
    data_dir = os.path.join(self.directory, str(step), "data")
    names = os.listdir(data_dir) if os.path.isdir(data_dir) else []
    shard_files = [m for name in names if (m := _SHARD_FILE.fullmatch(name))]
    process_files = [m for name in names if (m := _PROCESS_FILE.fullmatch(name))]
    later = ("the model state itself restores onto any mesh: to continue without the data "
             "position, start a new workdir with --config.train.init_from=WORKDIR@STEP")
    if not shard_files and not process_files:
      raise CheckpointError(f"{data_dir}: no data-iterator state in this checkpoint ({later})")
    if shard_files and _per_shard(data_iter):
      counts = sorted({int(m.group(2)) for m in shard_files})
      saved, have = counts[-1], data_iter.num_data_shards
      if len(counts) > 1:
        raise CheckpointError(f"{data_dir}: data-iterator states for {counts} data shards mixed "
                              "in one checkpoint; it was not written by one run")
      if saved != have:
        raise CheckpointError(
            f"{data_dir}: the data-iterator state was saved by {saved} data shard(s) "
            f"(config.data.data_shards, 0 = one per process), this run has {have} "
            f"({jax.process_count()} process(es)); resume with --config.data.data_shards={saved} "
            f"on a process count that divides {saved} ({later})")
      present = {int(m.group(1)) for m in shard_files}
      missing = [k for k in data_iter.data_shards if k not in present]
      if missing:
        raise CheckpointError(
            f"{data_dir}: incomplete data-iterator state: no "
            f"{', '.join(_shard_file(k, saved) for k in missing[:3])}"
            f"{f' (+{len(missing) - 3} more)' if len(missing) > 3 else ''}")
      return
    if shard_files:  # a per-shard state, but an iterator that cannot take it
      raise CheckpointError(f"{data_dir}: the data-iterator state is per data shard; this "
                            f"iterator ({type(data_iter).__name__}) keeps one state per process")
    counts = sorted({int(m.group(2)) for m in process_files})
    if counts != [jax.process_count()]:
      raise CheckpointError(
          f"{data_dir}: the data-iterator state was saved by {counts[0]} process(es) (one file "
          f"per process, an earlier lcm_jax), this run has {jax.process_count()}; resume with "
          f"{counts[0]} processes ({later})")
    if _per_shard(data_iter):
      mine = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
      if not os.path.isfile(mine):
        raise CheckpointError(f"{data_dir}: incomplete data-iterator state: no {mine}")
      if len(data_iter.data_shards) > 1:
        with open(mine) as f:
          state = json.load(f)
        parents = state.get("parents") if isinstance(state, dict) else None
        if not isinstance(parents, list) or len(parents) != len(data_iter.data_shards):
          raise CheckpointError(
              f"{mine}: this per-process data-iterator state of an earlier lcm_jax ran "
              f"{len(data_iter.data_shards)} data shards behind one Grain prefetch "
              "(config.data.worker_count > 0) and cannot be split into data shards; resume with "
              f"the lcm_jax version that wrote it ({later})")

  def restore_weights(self, step: int | None, abstract_weights: dict[str, Any]) -> dict[str, Any]:
    """Restores only ``params`` and ``buffers`` (no optimizer state, step or data iterator).

    ``abstract_weights`` is ``{"params": ..., "buffers": ...}`` of ShapeDtypeStructs with target
    shardings. Used to start fine-tuning from a pre-trained run whose optimizer may differ.
    """
    step = self._existing_step(step, "to initialise from")
    path = os.path.join(self.directory, str(step), "state")
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_weights)
    with ocp.PyTreeCheckpointer() as ckptr:
      try:
        restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item=abstract_weights, restore_args=restore_args, partial_restore=True))
      except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot restore params/buffers for this model config "
                              f"({type(e).__name__}: {str(e)[:300]})") from None
    # partial_restore hands back the abstract leaf for a key the checkpoint does not have.
    leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
    missing = [jax.tree_util.keystr(p) for p, x in leaves if isinstance(x, jax.ShapeDtypeStruct)]
    if missing:
      raise CheckpointError(f"{path}: cannot restore params/buffers for this model config: the "
                            f"checkpoint has no {', '.join(missing[:3])}"
                            f"{f' (+{len(missing) - 3} more)' if len(missing) > 3 else ''}")
    return restored

  def saved_config(self, step: int) -> dict[str, Any] | None:
    """The config (as a dict) that the run which wrote checkpoint ``step`` had; None if unknown."""
    meta_dir = os.path.join(self.directory, str(step), "meta")
    try:
      meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception:  # pylint: disable=broad-except  # an old or foreign checkpoint: no meta
      return None
    text = meta.get("config") if isinstance(meta, dict) else None
    try:
      return json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
      raise CheckpointError(f"{meta_dir}: field 'config' is not valid JSON") from None

  def check_model_config(self, step: int, model_config: Mapping[str, Any]) -> None:
    """Refuses to resume checkpoint ``step`` with a model that differs from the one that wrote it.

    Only how-to-compute fields may differ (:data:`RESUMABLE_MODEL_FIELDS`); any
    other difference (``model_dim``, ``family``, ``sonar_embed_dim``, layer counts, ...) raises a
    :class:`CheckpointError` naming the fields, their saved and current values.
    """
    saved = self.saved_config(step)
    if not saved or not isinstance(saved.get("model"), dict):
      return
    current = dict(model_config)
    # Fields only one side has are not compared: earlier versions saved every family's fields.
    diffs = [f"{k}={saved['model'][k]!r} (the config has {current[k]!r})"
             for k in sorted(set(saved["model"]) & set(current))
             if k not in RESUMABLE_MODEL_FIELDS and saved["model"][k] != current[k]]
    if diffs:
      raise CheckpointError(
          f"{os.path.join(self.directory, str(step))} was written with model "
          f"{', '.join(diffs)}: this workdir holds another model; use a new --workdir (or "
          "--config.train.init_from=WORKDIR to start a new run from compatible weights)")

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: restore places shards directly there."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------------------------
# Reading a workdir's checkpoints from the tools (evaluate, generate, export, fine-tuning)

def checkpoint_step(workdir: str, step: int | None) -> int:
  """The checkpoint step to use in ``workdir`` (latest if ``step`` is None), checked to exist.

  A step counts once Orbax finalised it (``_CHECKPOINT_METADATA``): a save killed half-way is
  never picked up.
  """
  directory = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()
                 and os.path.isdir(os.path.join(directory, d))) if os.path.isdir(directory) else []
  steps = [s for s in steps
           if os.path.exists(os.path.join(directory, str(s), "_CHECKPOINT_METADATA"))]
  if not steps:
    raise CheckpointError(f"--workdir: {workdir} has no checkpoints ({directory} is missing or "
                          "empty)")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise CheckpointError(f"--step: {directory} has no checkpoint for step {step} (available: "
                          f"{steps})")
  return step


def load_config(workdir: str, step: int) -> ml_collections.ConfigDict:
  """The training config saved with checkpoint ``step`` of ``workdir``.

  ``config.model`` keeps only its family's fields: configs saved by earlier versions carried
  every family's fields.
  """
  ckpt = Checkpointer(workdir, create=False, async_save=False)
  try:
    saved = ckpt.saved_config(step)
  finally:
    ckpt.close()
  meta = os.path.join(ckpt.directory, str(step), "meta")
  if saved is None:
    raise CheckpointError(f"{meta}: field 'config': missing or unreadable; pass --config")
  config = ml_collections.ConfigDict(saved)
  model = families.model_config(config.model, strict=False)
  config.model = ml_collections.ConfigDict(
      {k: v for k, v in config.model.to_dict().items() if k in families.of(model).fields})
  return config


def mesh_for(config: ml_collections.ConfigDict, devices: Any = None, *,
             check_batch: bool = False) -> jax.sharding.Mesh:
  """The mesh to restore a run onto THIS machine's ``devices`` (default: all): the run's own
  ``config.mesh`` if it fits (and, with ``check_batch``, divides ``config.data``'s batch), else
  all devices on ``fsdp`` (parameters sharded), else all on ``data``. Updates ``config.mesh`` to
  the mesh chosen. Every tool that restores a run uses this one policy."""
  candidates = [dict(config.mesh), {"data": 1, "fsdp": -1, "tensor": 1},
                {"data": -1, "fsdp": 1, "tensor": 1}]
  for i, axes in enumerate(candidates):
    try:
      mesh = sharding.make_mesh(ml_collections.ConfigDict(axes), devices)
      if check_batch:
        sharding.check_batch(config.data.global_batch_size, mesh,
                             config.optimizer.get("grad_accum_steps", 1))
    except sharding.MeshError:
      if i == len(candidates) - 1:
        raise
      continue
    config.mesh.update(axes)
    return mesh
  raise AssertionError("unreachable")


def restore_variables(config: ml_collections.ConfigDict, workdir: str, step: int,
                      devices: Any = None) -> tuple[Any, dict[str, Any], jax.sharding.Mesh]:
  """Builds the family's model and restores ``params``/``buffers`` of ``step`` onto ``devices``
  (default: the local ones) with the run's sharding rules on :func:`mesh_for`'s mesh. Returns
  ``(model, variables, mesh)``."""
  devices = list(devices if devices is not None else jax.local_devices())
  model_cfg = families.model_config(config.model, strict=False)
  mesh = mesh_for(config, devices)
  model = families.of(model_cfg).build(model_cfg)

  def init(rng: jax.Array) -> dict[str, Any]:
    v = model.init({"params": rng, "dropout": rng}, *families.init_inputs(model_cfg, 2),
                   deterministic=True)
    return {"params": v["params"], "buffers": v.get("buffers", {})}

  boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
  abstract = abstract_with_shardings(nn.unbox(boxed), shardings)
  ckpt = Checkpointer(workdir, create=False, async_save=False)
  try:
    variables = ckpt.restore_weights(step, abstract)
  finally:
    ckpt.close()
  return model, variables, mesh

