"""Orbax checkpoints: train state, data-iterator state and metadata saved together, per step.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,meta}``. ``state`` is the train-state pytree
(params, buffers, optimizer state, step, rng), ``data`` the Grain iterator state (one file per
process), ``meta`` a JSON dict (config, mesh). Saves are asynchronous; Orbax writes to a temporary
directory and renames it when complete, so a killed process never leaves a checkpoint that
``latest_step`` would pick up.
"""

from __future__ import annotations

import os
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  pass


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
                       "data": grain.checkpoint.CheckpointHandler(),
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
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self._mgr.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int | None, abstract_state: Any, data_iter: Any | None = None):
    """Restores ``state`` onto the shardings in ``abstract_state`` (any mesh) and the iterator."""
    step = self._existing_step(step, "to restore")
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      self._check_data_processes(step)
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._mgr.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def _check_data_processes(self, step: int) -> None:
    """The Grain state is one file per process: it resumes only with the same process count."""
    data_dir = os.path.join(self.directory, str(step), "data")
    counts = sorted({int(m.group(1)) for name in (os.listdir(data_dir) if os.path.isdir(data_dir)
                                                 else [])
                     if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", name))})
    if counts and counts != [jax.process_count()]:
      raise CheckpointError(
          f"{data_dir}: the data-iterator state was saved by {counts[0]} process(es), this run has "
          f"{jax.process_count()}; resume with {counts[0]} processes (the model state itself "
          "restores onto any mesh: to continue on another process count without the data "
          "position, start a new workdir with --config.train.init_from=WORKDIR@STEP)")

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

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: restore places shards directly there."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
