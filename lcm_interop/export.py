r"""Orbax checkpoint <-> PyTorch checkpoint in the format of the reference implementation.

  # export: a training run's checkpoint -> DIR/{model.pt, model_card.yaml, normalizer.pt, ...}
  python -m lcm_interop.export --workdir=W [--step=S] --out=DIR \
      [--dtype=float32|bfloat16|float16] [--name=NAME] [--config=FILE[:VARIANT]] [--overwrite] \
      [--relative_checkpoint]
  # import: an exported (or reference) card -> an Orbax checkpoint a run can start from
  python -m lcm_interop.export --from_torch=DIR/model_card.yaml --workdir=W [--step=0]
  python -m lcm_jax.main --config=configs/mse_1b6.py:sft --config.train.init_from=W ...

Export restores ``params`` and ``buffers`` of the checkpoint (latest unless ``--step``) on ONE
CPU device (no training mesh, no optimizer state), with the config saved in the checkpoint's
``meta`` (or ``--config``), and writes, atomically (a temporary directory beside ``DIR``, renamed
when complete; an existing non-empty ``DIR`` needs ``--overwrite``):

* ``model.pt``: ``torch.save({"model": state_dict, "model_key": "model"})``. ``state_dict`` has
  exactly the reference keys and shapes for the family
  (:func:`lcm_interop.reference.reference_shapes`; Linear weights (out, in)), the frozen
  normalizer's ``center``/``scale`` included, every tensor in ``--dtype``. A finite value that
  becomes infinite in that dtype (float16 max 65504, bfloat16 ~3.4e38), a non-finite value, or a
  normalizer ``scale`` that underflows to 0 is an error naming the key.
* ``model_card.yaml``: a fairseq2 asset card::

    name: NAME                              # default: the basename of DIR
    model_family: base_lcm | two_tower_diffusion_lcm | one_tower_diffusion_lcm
    model_arch: toy_base_lcm | toy_two_tower_diffusion_lcm   # base that model_config overrides
                                            # (none for the One-Tower: the reference lacks it)
    checkpoint: file:///abs/DIR/model.pt    # absolute URI (--relative_checkpoint: model.pt)
    model_config: {...}                     # the reference's config fields, see below
    lcm_jax: {format_version, dtype, step, model_config: <every ModelConfig field>,
              reference_compatible, notes}  # ignored by the reference; makes import lossless

* ``normalizer.pt`` (``{"model": {"center", "scale"}, "model_key": "model"}``) and
  ``normalizer_card.yaml`` (``name: NAME_sonar_normalizer``, ``model_family: sonar_normalizer``,
  ``model_arch: base``, ``model_config: {dim: S}``, ``checkpoint: file:///abs/DIR/normalizer.pt``):
  the card that ``model_config.sonar_normalizer_name`` names; the reference builds the model's
  normalizer from it (by NAME, through its asset store) before loading ``model.pt`` (whose own
  ``center``/``scale`` then overwrite it).

Loading in the reference (fairseq2 0.3.0rc1, which it pins): ``DIR`` is an asset directory.
Its asset store reads, when fairseq2 is imported, every ``*.yaml`` under ``$FAIRSEQ2_USER_ASSET_DIR``
(default ``~/.config/fairseq2/assets``, read recursively), so::

  export FAIRSEQ2_USER_ASSET_DIR=/abs/DIR     # or copy/symlink DIR under ~/.config/fairseq2/assets
  python -c "from lcm.utils.card_utils import load_model_from_card as f; print(f('NAME'))"

registers both cards; the model then loads by card name, or by the path
``/abs/DIR/model_card.yaml`` (the reference's ``load_model_from_card`` parses a card given by
path itself: no base directory, so its checkpoint must be an absolute URI, which is why the
export writes absolute ``file://`` URIs; the normalizer card is still looked up by name, so the
directory must be registered either way). The URIs name the final ``DIR``: a moved directory
needs re-registering and, for loading by path, a re-export (or ``--relative_checkpoint``, whose
relative names the asset store resolves against the card's directory). Card names must be
unique across the registered directories and may not contain ``@``.

Reference config field names (``model_config``), followed from facebookresearch/large_concept_model:
  * ``lcm/models/abstract_lcm/builder.py`` ``AbstractLCModelConfig``: ``model_type``,
    ``sonar_embed_dim``, ``sonar_normalizer_name``;
  * ``lcm/models/base_lcm/builder.py`` ``BaseLCModelConfig``: ``max_seq_len``, ``model_dim``,
    ``model_output_dim``, ``frontend`` (``lcm/models/base_lcm/frontend.py`` ``LCMFrontendConfig``:
    ``dropout_p``, ``pre_linear_bias``, ``pre_linear_init_fn``, ``scale_embeddings``,
    ``weight_normalization``), ``lcm`` (TransformerConfig), ``postnet`` (ProjectionConfig);
  * ``lcm/nn/transformer/factory.py`` ``TransformerConfig``: ``num_layers``, ``num_attn_heads``,
    ``dropout_p``, ``final_dropout_p``, ``attention_dropout_p``, ``ffn_inner_dim``, ``use_swiglu``,
    ``pos_embedding_style``, ``rope_theta``, ``layer_normalization_style``, ``norm_order_style``,
    ``final_norm_order_style``, ``enable_qk_layernorm``, ``mha_qkv_weight_normalization``,
    ``mha_output_weight_normalization``, ``mha_output_proj_bias``, ``scale_residual``;
  * ``lcm/nn/projection.py`` ``ProjectionConfig``: ``dropout_p``, ``linear_bias``,
    ``linear_init_fn``, ``weight_normalization``, ``activation_name``;
  * ``lcm/models/two_tower_diffusion_lcm/builder.py`` ``TwoTowerDiffusionLCModelConfig``:
    ``max_seq_len``, ``model_dim``, ``frontend`` (``EncoderFrontendConfig``: ``dropout_p``,
    ``pre_linear_bias``, ``pre_linear_init_fn``, ``weight_normalization``), ``context_encoder``
    (TransformerConfig), ``denoiser`` (``lcm/nn/denoisers/factory.py`` ``DenoiserConfig`` =
    TransformerConfig + ``pre_denoiser``, ``post_denoiser`` (ProjectionConfig) and
    ``timestep_embed_dim``, which there is the DiT embedding OUTPUT size and must equal
    ``model_dim``; its sinusoidal input size is fixed at 256), ``noise_scheduler``
    (``lcm/nn/schedulers/ddim.py`` ``DDIMSchedulerConfig``: ``num_diffusion_train_steps``,
    ``beta_start``, ``beta_end``, ``beta_schedule``, ``sigmoid_schedule_alpha``,
    ``sigmoid_schedule_beta``, ``prediction_type``, ``set_alpha_to_one``,
    ``rescale_betas_zero_snr``, ``clip_sample``, ``thresholding``), ``trained_with_cf_guidance``;
  * ``lcm/models/sonar_normalizer/builder.py`` ``SonarNormalizerConfig``: ``dim``; the cards in
    ``lcm/cards/*.yaml`` for the card fields (``name``, ``model_family``, ``model_arch``,
    ``checkpoint``) and the arch names (``lcm/models/*/archs.py``).

Reference compatibility: the reference fixes a few things lcm_jax makes configurable (RMSNorm eps
1e-5, the SwiGLU multiple 256, 256 sinusoidal timestep features). A config that differs exports
fine (``lcm_jax.reference_compatible: false`` with ``notes``, and a warning), loads in
:mod:`lcm_interop.torch_models` and imports back, but the reference cannot build it.

The One-Tower diffusion LCM has no counterpart in the reference: its export is a card of lcm_jax's
own (``model_family: one_tower_diffusion_lcm``, no ``model_arch``, ``model_config`` in the same
style: ``frontend`` with ``pos_embedding_style: learned`` and ``timestep_features``, ``lcm``,
``postnet``, ``noise_scheduler``; keys in :func:`lcm_interop.reference.one_tower_shapes`), always
``reference_compatible: false`` with a note saying so. The reference cannot load it; the import
below and :mod:`lcm_interop.torch_models` do.

Everything about the format (families, keys, cards) is JAX-free in :mod:`lcm_interop.reference`
(one :class:`~lcm_interop.reference.ReferenceFamily` entry per family) and re-exported here; this
module, the converter, is the only one of lcm_interop that needs both JAX and torch.

Import (``--from_torch``) reads the card (``model_family`` must have an entry in
:data:`~lcm_interop.reference.REFERENCE_FAMILIES`; the
reference config is ``model_arch``'s (the reference archs ``toy_base_lcm``, ``base_lcm_1_6B``,
``toy_two_tower_diffusion_lcm``, ``two_tower_diffusion_lcm_1_6B``, ``two_tower_diffusion_lcm_7B``)
merged with ``model_config``; ``checkpoint`` may be a path relative to the card (older
exports), an absolute path or a ``file://`` URI; for an absolute one, a file of the same name
beside the card is used when there is one (a copied or moved export directory reads its own
files; the reference follows the URI); fields lcm_jax cannot represent, e.g. ``use_swiglu: false``, are
errors; ``lcm_jax.model_config``, when present, supplies the fields the reference lacks), loads
the checkpoint (any float dtype, converted to float32), checks its keys and shapes against the
spec (a missing or extra key is an error naming it and the file), and writes
``W/checkpoints/<step>/`` (default step 0) with ``state`` = ``{"params", "buffers"}`` (the
layout of the config's ``scan_layers``) and ``meta`` = ``{"config": {"model": ..., "mesh": ...}}``,
again atomically (``W`` must not exist or be empty). ``config.train.init_from=W`` (restores only
params and buffers), ``python -m lcm_jax.generate --workdir=W`` and a re-export all read it; it
is not a workdir to resume training in (no optimizer state). JAX -> torch -> JAX is bitwise
lossless in float32.

User errors print one ``error: ...`` line naming the file/key/field and exit with status 2;
nothing is written then.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shutil
import sys
import tempfile
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from lcm_interop import naming
from lcm_interop import reference
# The reference format (JAX-free), re-exported: the converter's API is one module.
from lcm_interop.reference import (CARD_FILE, EXPORT_DTYPES, FORMAT_VERSION,  # noqa: F401
                                   MODEL_FILE, NORMALIZER_CARD_FILE, NORMALIZER_FILE,
                                   NORMALIZER_SUFFIXES, REFERENCE_ARCHS, REFERENCE_FAMILIES,
                                   ExportError, _torch, _yaml, check_card_name, check_state_dict,
                                   checkpoint_uri, compatibility_notes, load_torch_state_dict,
                                   read_card, reference_model_config)
from lcm_jax.models.config import ModelConfig

def model_config_from_card(card: Mapping[str, Any], where: str) -> "ModelConfig":
  """The :class:`~lcm_jax.models.config.ModelConfig` of a model card (see the module docstring).
  ``where`` (the card's path) prefixes every error."""
  values = reference.model_values_from_card(card, where)
  try:
    return ModelConfig.from_config(values)
  except (TypeError, ValueError) as e:
    raise ExportError(f"{where}: field 'model_config': {e}") from None


def load_card(card_path: str) -> tuple[dict[str, Any], "ModelConfig", dict[str, Any], str]:
  """Reads a card and its checkpoint: ``(card, config, state dict (torch tensors, checked),
  checkpoint path)``."""
  card, values, state, ckpt = reference.load_card(card_path)
  try:
    cfg = ModelConfig.from_config(values)
  except (TypeError, ValueError) as e:
    raise ExportError(f"{card_path}: field 'model_config': {e}") from None
  return card, cfg, state, ckpt


# ----------------------------------------------------------------------------------------------
# State dicts

def torch_dtype(name: str) -> Any:
  """``float32`` | ``bfloat16`` | ``float16`` -> the torch dtype."""
  if name not in EXPORT_DTYPES:
    raise ExportError(f"--dtype: {name!r} not in {EXPORT_DTYPES}")
  return getattr(_torch(), name)


def to_torch_state_dict(params: Any, buffers: Any, cfg: ModelConfig,
                        dtype: str = "float32") -> dict[str, Any]:
  """Flax params/buffers -> reference state dict of torch tensors in ``dtype``.

  Raises :class:`ExportError` naming the key if a value is not finite, overflows the dtype, or a
  normalizer scale underflows to 0.
  """
  torch = _torch()
  tdtype = torch_dtype(dtype)
  state = naming.flax_to_reference(params, buffers)
  check_state_dict(state, cfg, "export")
  out = {}
  for key in naming.reference_shapes(cfg):  # the spec's order
    value = np.asarray(state.pop(key))  # pop: one extra copy of the model at most
    if not np.issubdtype(value.dtype, np.floating):
      raise ExportError(f"export: key '{key}': dtype {value.dtype} is not a float type")
    source = torch.from_numpy(np.array(value, np.float32, order="C", copy=True))  # owns its data
    if not bool(torch.isfinite(source).all()):
      raise ExportError(f"export: key '{key}': the checkpoint holds non-finite values")
    tensor = source.to(tdtype)
    if not bool(torch.isfinite(tensor).all()):
      raise ExportError(f"export: key '{key}': values up to {float(source.abs().max()):.6g} "
                        f"overflow {dtype} (max {float(torch.finfo(tdtype).max):.6g})")
    if key.endswith("sonar_normalizer.scale") and bool((tensor == 0).any()):
      raise ExportError(f"export: key '{key}': a normalizer scale underflows to 0 in {dtype}")
    out[key] = tensor
  return out



# ----------------------------------------------------------------------------------------------
# Atomic directories

def _prepare_target(path: str, overwrite: bool, flag: str) -> None:
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise ExportError(f"{flag}: {path} exists and is not a directory")
    if os.listdir(path) and not overwrite:
      raise ExportError(f"{flag}: {path} exists and is not empty" +
                        (" (pass --overwrite to replace it)" if flag == "--out" else ""))


def _publish(tmp: str, path: str) -> None:
  """Renames the finished temporary directory ``tmp`` to ``path`` (replacing it)."""
  from lcm_jax.normalizer import apply_umask_permissions  # pylint: disable=g-import-not-at-top
  apply_umask_permissions(tmp)
  old = None
  if os.path.exists(path):
    if os.listdir(path):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
      os.rmdir(old)
      os.rename(path, old)
    else:
      os.rmdir(path)
  os.rename(tmp, path)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def _temp_dir_beside(path: str) -> str:
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.tmp-", dir=parent)


# ----------------------------------------------------------------------------------------------
# Export

def export_weights(params: Any, buffers: Any, cfg: ModelConfig, out_dir: str, *,
                   name: Optional[str] = None, dtype: str = "float32",
                   step: Optional[int] = None, overwrite: bool = False,
                   relative_checkpoint: bool = False) -> dict[str, Any]:
  """Writes ``out_dir`` (see the module docstring) from Flax ``params``/``buffers`` (scanned or
  not) of a ``cfg`` model. Returns a summary dict (``card``, ``notes``, ``num_tensors``, ...).

  The cards' ``checkpoint`` fields are absolute ``file://`` URIs of the final ``out_dir`` (what
  the reference needs for a card given by path), or, with ``relative_checkpoint``, the bare
  file names (a movable directory, loadable by the reference only through its asset store)."""
  torch, yaml = _torch(), _yaml()
  out_dir = os.path.abspath(out_dir)
  _prepare_target(out_dir, overwrite, "--out")
  name = check_card_name(name or os.path.basename(out_dir))
  normalizer_name = f"{name}_sonar_normalizer"
  where = (lambda f: f) if relative_checkpoint else (
      lambda f: checkpoint_uri(os.path.join(out_dir, f)))
  family = reference.of(cfg)
  state = to_torch_state_dict(params, buffers, cfg, dtype)
  notes = compatibility_notes(cfg)
  card = {"name": name, "model_family": cfg.family}
  if family.export_arch is not None:
    card["model_arch"] = family.export_arch
  card.update({
      "checkpoint": where(MODEL_FILE),
      "model_config": reference_model_config(cfg, normalizer_name),
      "lcm_jax": {"format_version": FORMAT_VERSION, "dtype": dtype, "step": step,
                  "model_config": dataclasses.asdict(cfg), "reference_compatible": not notes,
                  "notes": notes},
  })
  normalizer_card = {"name": normalizer_name, "model_family": "sonar_normalizer",
                     "model_arch": "base", "model_config": {"dim": cfg.sonar_embed_dim},
                     "checkpoint": where(NORMALIZER_FILE)}
  normalizer_state = {k: state[f"{family.normalizer}.{k}"].clone() for k in ("center", "scale")}
  tmp = _temp_dir_beside(out_dir)
  try:
    torch.save({"model": state, "model_key": "model"}, os.path.join(tmp, MODEL_FILE))
    torch.save({"model": normalizer_state, "model_key": "model"},
               os.path.join(tmp, NORMALIZER_FILE))
    for fname, content in ((CARD_FILE, card), (NORMALIZER_CARD_FILE, normalizer_card)):
      with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
        yaml.safe_dump(content, f, sort_keys=False, default_flow_style=False)
    _publish(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"out": out_dir, "card": os.path.join(out_dir, CARD_FILE), "family": cfg.family,
          "num_tensors": len(state), "dtype": dtype, "notes": notes, "step": step,
          "name": name, "normalizer_name": normalizer_name}


def load_config_file(spec: str) -> Any:
  """``FILE[:VARIANT]`` -> ``get_config(VARIANT)`` of that Python config file (as
  ``ml_collections.config_flags`` does)."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise ExportError(f"--config: {path} does not exist")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:  # configs import each other as the ``configs`` package
    sys.path.insert(0, root)
  spec_ = importlib.util.spec_from_file_location("_lcm_jax_export_config", path)
  module = importlib.util.module_from_spec(spec_)
  try:
    spec_.loader.exec_module(module)  # type: ignore[union-attr]
    return module.get_config(variant) if variant else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(f"--config: {spec}: {type(e).__name__}: {e}") from None


def export_checkpoint(workdir: str, out_dir: str, *, step: Optional[int] = None,
                      dtype: str = "float32", name: Optional[str] = None,
                      config: Any = None, overwrite: bool = False,
                      relative_checkpoint: bool = False) -> dict[str, Any]:
  """Restores ``params``/``buffers`` of ``workdir``'s checkpoint ``step`` (latest if None) on one
  CPU device and writes ``out_dir`` with :func:`export_weights`."""
  import jax  # pylint: disable=g-import-not-at-top
  from lcm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  torch_dtype(dtype)  # bad --dtype before any work
  _prepare_target(os.path.abspath(out_dir), overwrite, "--out")
  check_card_name(name or os.path.basename(os.path.abspath(out_dir)))
  step = ckpt_lib.checkpoint_step(workdir, step)
  if config is None:
    config = ckpt_lib.load_config(workdir, step)
  from lcm_jax import families  # pylint: disable=g-import-not-at-top
  try:
    cfg = families.model_config(config.model, strict=False)
  except (AttributeError, TypeError) as e:
    raise ExportError(f"{workdir}: the checkpoint's config has no valid 'model' ({e})") from None
  _, variables, _ = ckpt_lib.restore_variables(config, workdir, step,
                                               devices=[jax.devices("cpu")[0]])
  variables = jax.device_get(variables)
  summary = export_weights(variables["params"], variables["buffers"], cfg, out_dir, name=name,
                           dtype=dtype, step=step, overwrite=overwrite,
                           relative_checkpoint=relative_checkpoint)
  return dict(summary, workdir=workdir)


# ----------------------------------------------------------------------------------------------
# Import

def _abstract_variables(cfg: ModelConfig) -> dict[str, Any]:
  """Shapes/dtypes of ``{"params", "buffers"}`` of a freshly built ``cfg`` model."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from lcm_jax import families  # pylint: disable=g-import-not-at-top
  v = nn.unbox(families.abstract_variables(cfg))
  return {"params": v["params"], "buffers": v.get("buffers", {})}


def flax_variables_from_torch(state: Mapping[str, Any], cfg: ModelConfig,
                              where: str = "state dict") -> dict[str, Any]:
  """Reference state dict (torch tensors or arrays, any float dtype) -> ``{"params", "buffers"}``
  NumPy float32 trees laid out for ``cfg`` (``scan_layers``), checked against a fresh model."""
  import jax  # pylint: disable=g-import-not-at-top
  check_state_dict(state, cfg, where)
  arrays = {}
  for key, value in state.items():
    if hasattr(value, "detach"):
      value = value.detach().to("cpu").float().numpy()
    arrays[key] = np.asarray(value, np.float32)
  params, buffers = naming.reference_to_flax(arrays, cfg.scan_layers)
  variables = {"params": params, "buffers": buffers}
  expected = _abstract_variables(cfg)
  got = jax.tree_util.tree_flatten_with_path(variables)[0]
  want = jax.tree_util.tree_flatten_with_path(expected)[0]
  if [p for p, _ in got] != [p for p, _ in want]:
    raise ExportError(f"{where}: the converted tree does not match a {cfg.family} model")
  for (path, a), (_, b) in zip(got, want):
    if a.shape != b.shape:
      raise ExportError(f"{where}: {jax.tree_util.keystr(path)}: shape {a.shape}, the model "
                        f"expects {b.shape}")
  return variables


def import_checkpoint(card_path: str, workdir: str, *, step: int = 0) -> dict[str, Any]:
  """Writes ``workdir/checkpoints/<step>`` from an exported (or reference) model card."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from lcm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  if step < 0:
    raise ExportError(f"--step: expected >= 0, got {step}")
  workdir = os.path.abspath(workdir)
  _prepare_target(workdir, False, "--workdir")
  _, cfg, state, ckpt = load_card(card_path)
  variables = flax_variables_from_torch(state, cfg, ckpt)
  config = ml_collections.ConfigDict({"model": dataclasses.asdict(cfg),
                                      "mesh": {"data": -1, "fsdp": 1, "tensor": 1}})
  meta = {"config": config.to_json(), "imported_from": os.path.abspath(card_path)}
  tmp = _temp_dir_beside(workdir)
  try:
    saver = ckpt_lib.Checkpointer(tmp, keep=1, async_save=False)
    try:
      saver.save(step, variables, None, meta, force=True)
    finally:
      saver.close()
    _publish(tmp, workdir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"workdir": workdir, "step": step, "family": cfg.family, "card": card_path,
          "num_tensors": len(state)}


# ----------------------------------------------------------------------------------------------
# CLI

class _Parser(argparse.ArgumentParser):
  """argparse with one ``error: ...`` line (and status 2) for bad arguments."""

  def error(self, message: str) -> Any:  # type: ignore[override]
    print(f"error: {message} (see --help)", file=sys.stderr)
    raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(
      prog="python -m lcm_interop.export",
      description="Export an lcm_jax Orbax checkpoint to the reference PyTorch format\n"
                  "(model.pt + model_card.yaml + normalizer card), or import such a card back\n"
                  "into an Orbax checkpoint that config.train.init_from can start from.\n"
                  "See the lcm_interop/export.py docstring for the formats.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="examples:\n"
             "  python -m lcm_interop.export --workdir=W [--step=S] --out=DIR [--dtype=bfloat16]\n"
             "  python -m lcm_interop.export --from_torch=DIR/model_card.yaml --workdir=W2\n"
             "  python -m lcm_jax.main ... --config.train.init_from=W2")
  p.add_argument("--workdir", help="export: the training workdir whose checkpoints/ to read; "
                 "import: the new workdir to create (must not exist or be empty).")
  p.add_argument("--step", type=int, default=None,
                 help="export: checkpoint step (default: the latest); import: the step to "
                 "write (default 0).")
  p.add_argument("--out", help="export: output directory (model.pt, model_card.yaml, "
                 "normalizer.pt, normalizer_card.yaml), written atomically.")
  p.add_argument("--dtype", default="float32", choices=EXPORT_DTYPES,
                 help="export: tensor dtype of model.pt (values that overflow it are an error).")
  p.add_argument("--name", default=None, help="export: card name (default: basename of --out).")
  p.add_argument("--config", default=None,
                 help="export: config FILE[:VARIANT] (default: the config saved in the "
                 "checkpoint's meta).")
  p.add_argument("--overwrite", action="store_true",
                 help="export: replace a non-empty --out directory.")
  p.add_argument("--relative_checkpoint", action="store_true",
                 help="export: write the cards' checkpoint fields as file names relative to "
                 "the card (a movable directory; the reference then loads it only by card name "
                 "through its asset store) instead of absolute file:// URIs (the default: also "
                 "loadable by card path).")
  p.add_argument("--from_torch", default=None, metavar="CARD",
                 help="import: a model_card.yaml (lcm_jax export or reference card).")
  return p


def run_cli(args: argparse.Namespace) -> str:
  """Everything the CLI does after parsing; returns the summary line. Raises user errors."""
  if args.from_torch:
    if (args.out or args.config or args.name or args.overwrite or args.dtype != "float32"
        or args.relative_checkpoint):
      raise ExportError("--from_torch: --out, --dtype, --name, --config, --overwrite and "
                        "--relative_checkpoint are export flags")
    if not args.workdir:
      raise ExportError("--workdir is required (the workdir to create)")
    s = import_checkpoint(args.from_torch, args.workdir,
                          step=0 if args.step is None else args.step)
    return (f"imported {s['family']} ({s['num_tensors']} tensors) from {s['card']} -> "
            f"{s['workdir']} step {s['step']} (start a run with "
            f"--config.train.init_from={s['workdir']})")
  for flag in ("workdir", "out"):
    if not getattr(args, flag):
      raise ExportError(f"--{flag} is required")
  config = load_config_file(args.config) if args.config else None
  s = export_checkpoint(args.workdir, args.out, step=args.step, dtype=args.dtype,
                        name=args.name, config=config, overwrite=args.overwrite,
                        relative_checkpoint=args.relative_checkpoint)
  for note in s["notes"]:
    print(f"warning: not loadable by the reference: {note}", file=sys.stderr)
  return (f"exported {s['family']} step {s['step']} of {s['workdir']} ({s['num_tensors']} "
          f"tensors, {s['dtype']}) -> {s['out']} (reference: FAIRSEQ2_USER_ASSET_DIR={s['out']}, "
          f"card {s['name']!r})")


def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI entry point: user errors -> one ``error:`` line on stderr and exit status 2."""
  import absl.logging  # pylint: disable=g-import-not-at-top
  from lcm_jax.errors import USER_ERRORS  # pylint: disable=g-import-not-at-top
  absl.logging.set_verbosity(absl.logging.WARNING)  # Orbax logs every step at INFO
  parser = build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # argparse prints its own usage + error line
    return 0 if e.code == 0 else 2
  try:
    line = run_cli(args)
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
