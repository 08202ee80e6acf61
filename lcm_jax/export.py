r"""Orbax checkpoint <-> PyTorch checkpoint in the format of the reference implementation.

  # export: a training run's checkpoint -> DIR/{model.pt, model_card.yaml, normalizer.pt, ...}
  python -m lcm_jax.export --workdir=W [--step=S] --out=DIR \
      [--dtype=float32|bfloat16|float16] [--name=NAME] [--config=FILE[:VARIANT]] [--overwrite] \
      [--relative_checkpoint]
  # import: an exported (or reference) card -> an Orbax checkpoint a run can start from
  python -m lcm_jax.export --from_torch=DIR/model_card.yaml --workdir=W [--step=0]
  python -m lcm_jax.main --config=configs/mse_1b6.py:sft --config.train.init_from=W ...

Export restores ``params`` and ``buffers`` of the checkpoint (latest unless ``--step``) on ONE
CPU device (no training mesh, no optimizer state), with the config saved in the checkpoint's
``meta`` (or ``--config``), and writes, atomically (a temporary directory beside ``DIR``, renamed
when complete; an existing non-empty ``DIR`` needs ``--overwrite``):

* ``model.pt``: ``torch.save({"model": state_dict, "model_key": "model"})``. ``state_dict`` has
  exactly the reference keys and shapes of LCM_SPEC section 9 for the family
  (:func:`lcm_jax.models.naming.reference_shapes`; Linear weights (out, in)), the frozen
  normalizer's ``center``/``scale`` included, every tensor in ``--dtype``. A finite value that
  becomes infinite in that dtype (float16 max 65504, bfloat16 ~3.4e38), a non-finite value, or a
  normalizer ``scale`` that underflows to 0 is an error naming the key.
* ``model_card.yaml``: a fairseq2 asset card::

    name: NAME                              # default: the basename of DIR
    model_family: base_lcm | two_tower_diffusion_lcm
    model_arch: toy_base_lcm | toy_two_tower_diffusion_lcm   # base that model_config overrides
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
:mod:`lcm_jax.torch_models` and imports back, but the reference cannot build it.

Import (``--from_torch``) reads the card (``model_family`` must be one of the two families; the
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
import pathlib
import shutil
import sys
import tempfile
import urllib.parse
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from lcm_jax.errors import UserError
from lcm_jax.models import naming
from lcm_jax.models.config import FAMILIES, ModelConfig

FORMAT_VERSION = 1
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
MODEL_FILE = "model.pt"
CARD_FILE = "model_card.yaml"
NORMALIZER_FILE = "normalizer.pt"
NORMALIZER_CARD_FILE = "normalizer_card.yaml"
TOY_ARCHS = {"base_lcm": "toy_base_lcm", "two_tower_diffusion_lcm": "toy_two_tower_diffusion_lcm"}
REFERENCE_NORM_EPS = 1e-5
REFERENCE_FFN_MULTIPLE = 256
REFERENCE_TIMESTEP_FEATURES = 256
NORMALIZER_SUFFIXES = ("sonar_normalizer.center", "sonar_normalizer.scale")


class ExportError(UserError):
  """A user error of export/import: bad flags, files, cards, keys or values."""


# ----------------------------------------------------------------------------------------------
# torch / yaml (optional dependencies, imported lazily)

def _torch() -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ExportError("PyTorch is not installed (pip install 'lcm_jax[data]')") from None
  return torch


def _yaml() -> Any:
  try:
    import yaml  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ExportError("PyYAML is not installed (pip install pyyaml)") from None
  return yaml


def torch_dtype(name: str) -> Any:
  """``float32`` | ``bfloat16`` | ``float16`` -> the torch dtype."""
  if name not in EXPORT_DTYPES:
    raise ExportError(f"--dtype: {name!r} not in {EXPORT_DTYPES}")
  return getattr(_torch(), name)


# ----------------------------------------------------------------------------------------------
# ModelConfig -> reference config (the card's model_config)

def _transformer(cfg: ModelConfig, num_layers: int, pos_embedding_style: str) -> dict[str, Any]:
  return {"num_layers": num_layers, "num_attn_heads": cfg.num_heads, "dropout_p": cfg.dropout,
          "final_dropout_p": 0.0, "attention_dropout_p": 0.0,
          "ffn_inner_dim": cfg.ffn_inner_dim, "use_swiglu": True,
          "pos_embedding_style": pos_embedding_style, "rope_theta": cfg.rope_theta,
          "layer_normalization_style": "rms", "norm_order_style": "pre",
          "final_norm_order_style": None, "enable_qk_layernorm": False,
          "mha_qkv_weight_normalization": False, "mha_output_weight_normalization": False,
          "mha_output_proj_bias": True, "scale_residual": None}


def _projection() -> dict[str, Any]:
  return {"dropout_p": 0.0, "linear_bias": True, "linear_init_fn": "kaiming_uniform",
          "weight_normalization": False, "activation_name": None}


def reference_model_config(cfg: ModelConfig, normalizer_name: Optional[str]) -> dict[str, Any]:
  """The reference's config of ``cfg`` (BaseLCModelConfig / TwoTowerDiffusionLCModelConfig field
  names, nested dicts for the sub-configs), complete enough to override any ``model_arch``."""
  out: dict[str, Any] = {"model_type": cfg.family, "sonar_embed_dim": cfg.sonar_embed_dim,
                         "sonar_normalizer_name": normalizer_name,
                         "max_seq_len": cfg.max_seq_len, "model_dim": cfg.model_dim}
  frontend = {"dropout_p": 0.0, "pre_linear_bias": True, "pre_linear_init_fn": "kaiming_uniform",
              "weight_normalization": False}
  if cfg.family == "base_lcm":
    out["model_output_dim"] = cfg.sonar_embed_dim
    out["frontend"] = dict(frontend, scale_embeddings=False)
    out["lcm"] = _transformer(cfg, cfg.num_layers, "rope")
    out["postnet"] = _projection()
    return out
  out["frontend"] = frontend
  out["context_encoder"] = _transformer(cfg, cfg.num_layers, "rope")
  out["denoiser"] = dict(_transformer(cfg, cfg.denoiser_num_layers, "none"),
                         timestep_embed_dim=cfg.model_dim, pre_denoiser=_projection(),
                         post_denoiser=_projection())
  out["noise_scheduler"] = {
      "num_diffusion_train_steps": cfg.num_diffusion_train_steps,
      "beta_start": cfg.beta_start, "beta_end": cfg.beta_end, "beta_schedule": cfg.beta_schedule,
      "sigmoid_schedule_alpha": cfg.sigmoid_alpha, "sigmoid_schedule_beta": cfg.sigmoid_beta,
      "prediction_type": "sample", "set_alpha_to_one": True,
      "rescale_betas_zero_snr": cfg.rescale_zero_terminal_snr, "clip_sample": False,
      "thresholding": False}
  out["trained_with_cf_guidance"] = cfg.cfg_dropout > 0
  return out


def compatibility_notes(cfg: ModelConfig) -> list[str]:
  """Why the reference could not build ``cfg`` (empty list: it can)."""
  notes = []
  if cfg.norm_eps != REFERENCE_NORM_EPS:
    notes.append(f"norm_eps {cfg.norm_eps} (the reference's RMSNorm uses {REFERENCE_NORM_EPS})")
  if cfg.ffn_multiple_of != REFERENCE_FFN_MULTIPLE:
    notes.append(f"ffn_multiple_of {cfg.ffn_multiple_of} (the reference rounds the SwiGLU size "
                 f"to a multiple of {REFERENCE_FFN_MULTIPLE})")
  if cfg.family == "two_tower_diffusion_lcm":
    if cfg.timestep_embed_dim != REFERENCE_TIMESTEP_FEATURES:
      notes.append(f"timestep_embed_dim {cfg.timestep_embed_dim} (the reference's DiT timestep "
                   f"encoder has {REFERENCE_TIMESTEP_FEATURES} sinusoidal features)")
    if cfg.beta_schedule == "sigmoid":
      notes.append("beta_schedule 'sigmoid' follows lcm_jax's reading of paper eq. 14, not "
                   "verified against the reference's")
  return notes


# ----------------------------------------------------------------------------------------------
# Reference config (card) -> ModelConfig

_TRANSFORMER_DEFAULTS: dict[str, Any] = {
    "num_layers": 2, "num_attn_heads": 8, "dropout_p": 0.1, "final_dropout_p": 0.1,
    "attention_dropout_p": 0.0, "ffn_inner_dim": 4096, "use_swiglu": False,
    "pos_embedding_style": "learned", "rope_theta": 10000.0,
    "layer_normalization_style": "standard",
    "norm_order_style": "pre", "final_norm_order_style": None, "enable_qk_layernorm": False,
    "mha_qkv_weight_normalization": False, "mha_output_weight_normalization": False,
    "mha_output_proj_bias": False, "scale_residual": None}
_PROJECTION_DEFAULTS: dict[str, Any] = {"dropout_p": 0.0, "linear_bias": True,
                                        "weight_normalization": False, "activation_name": None}
_FRONTEND_DEFAULTS: dict[str, Any] = {"dropout_p": 0.0, "pre_linear_bias": True,
                                      "weight_normalization": False, "scale_embeddings": False}
_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_diffusion_train_steps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "squaredcos_cap_v2", "scaled_linear_exponent": 2.0,
    "sigmoid_schedule_alpha": 1.5, "sigmoid_schedule_beta": 0.0, "clip_sample": False,
    "set_alpha_to_one": True, "prediction_type": "sample", "thresholding": False,
    "rescale_betas_zero_snr": True}
_COMMON_DEFAULTS: dict[str, Any] = {"sonar_embed_dim": 1024, "sonar_normalizer_name": None,
                                    "max_seq_len": 2048, "model_dim": 1024}
REFERENCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "base_lcm": dict(_COMMON_DEFAULTS, model_type="base_lcm", model_output_dim=None,
                     frontend=_FRONTEND_DEFAULTS, lcm=_TRANSFORMER_DEFAULTS,
                     postnet=_PROJECTION_DEFAULTS),
    "two_tower_diffusion_lcm": dict(
        _COMMON_DEFAULTS, model_type="two_tower_diffusion_lcm", frontend=_FRONTEND_DEFAULTS,
        context_encoder=_TRANSFORMER_DEFAULTS,
        denoiser=dict(_TRANSFORMER_DEFAULTS, pos_embedding_style="none", timestep_embed_dim=1024,
                      pre_denoiser=_PROJECTION_DEFAULTS, post_denoiser=_PROJECTION_DEFAULTS),
        noise_scheduler=_SCHEDULER_DEFAULTS, trained_with_cf_guidance=False),
}
"""The reference dataclasses' defaults of the fields import reads (what a card leaves out)."""


def _stack_1b6(dim: int, heads: int, layers: int, pos: str) -> dict[str, Any]:
  return {"num_layers": layers, "num_attn_heads": heads, "ffn_inner_dim": 4 * dim,
          "final_dropout_p": 0.0, "attention_dropout_p": 0.0, "dropout_p": 0.1,
          "mha_output_proj_bias": True, "use_swiglu": True, "layer_normalization_style": "rms",
          "pos_embedding_style": pos}


def _two_tower_arch(dim: int, heads: int, denoiser_layers: int) -> dict[str, Any]:
  return {"model_dim": dim, "max_seq_len": 4096, "sonar_normalizer_name": "dummy_sonar_normalizer",
          "context_encoder": _stack_1b6(dim, heads, 5, "rope"),
          "denoiser": dict(_stack_1b6(dim, heads, denoiser_layers, "none"),
                           timestep_embed_dim=dim),
          "trained_with_cf_guidance": True, "noise_scheduler": {"num_diffusion_train_steps": 100}}


REFERENCE_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "toy_base_lcm": ("base_lcm", {"lcm": {"num_layers": 2}}),
    "base_lcm_1_6B": ("base_lcm", {"max_seq_len": 4096, "model_dim": 2048,
                                   "sonar_normalizer_name": "dummy_sonar_normalizer",
                                   "lcm": _stack_1b6(2048, 16, 32, "rope")}),
    "toy_two_tower_diffusion_lcm": ("two_tower_diffusion_lcm", {
        "context_encoder": {"num_layers": 2}, "denoiser": {"num_layers": 2},
        "sonar_normalizer_name": "dummy_sonar_normalizer"}),
    "two_tower_diffusion_lcm_1_6B": ("two_tower_diffusion_lcm", _two_tower_arch(2048, 16, 13)),
    "two_tower_diffusion_lcm_7B": ("two_tower_diffusion_lcm", _two_tower_arch(4096, 32, 14)),
}
"""The reference's registered archs (``lcm/models/*/archs.py``) as overrides of the defaults."""


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
  """Recursive dict merge (``override`` wins; nested dicts are merged)."""
  out = dict(base)
  for key, value in override.items():
    if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
      out[key] = _merge(out[key], value)
    else:
      out[key] = value
  return out


class _Fields:
  """Typed access to a merged reference config; errors name the card and the field."""

  def __init__(self, data: Mapping[str, Any], where: str):
    self.data, self.where = data, where

  def get(self, path: str) -> Any:
    node: Any = self.data
    for part in path.split("."):
      if not isinstance(node, Mapping) or part not in node:
        raise ExportError(f"{self.where}: field 'model_config.{path}' is missing")
      node = node[part]
    return node

  def require(self, path: str, allowed: Sequence[Any]) -> Any:
    value = self.get(path)
    if value not in allowed:
      raise ExportError(f"{self.where}: field 'model_config.{path}': {value!r} is not supported "
                        f"by lcm_jax (expected {' or '.join(repr(a) for a in allowed)})")
    return value

  def number(self, path: str, kind: type = int) -> Any:
    value = self.get(path)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
      ok = ok and float(value).is_integer()
    if not ok:
      raise ExportError(f"{self.where}: field 'model_config.{path}': expected a "
                        f"{kind.__name__}, got {value!r}")
    return kind(value)


def _check_stack(f: _Fields, name: str, pos: str) -> None:
  for key, allowed in (("use_swiglu", [True]), ("pos_embedding_style", [pos]),
                       ("layer_normalization_style", ["rms"]), ("norm_order_style", ["pre"]),
                       ("final_norm_order_style", [None, "pre"]),
                       ("enable_qk_layernorm", [False]), ("mha_qkv_weight_normalization", [False]),
                       ("mha_output_weight_normalization", [False]),
                       ("mha_output_proj_bias", [True]), ("scale_residual", [None])):
    f.require(f"{name}.{key}", allowed)


def _check_projection(f: _Fields, name: str) -> None:
  for key, allowed in (("linear_bias", [True]), ("weight_normalization", [False]),
                       ("activation_name", [None])):
    f.require(f"{name}.{key}", allowed)


def model_config_from_card(card: Mapping[str, Any], where: str) -> ModelConfig:
  """The :class:`ModelConfig` of a model card (see the module docstring). ``where`` (the card's
  path) prefixes every error."""
  family = card.get("model_family")
  if family not in FAMILIES:
    raise ExportError(f"{where}: field 'model_family': {family!r} is not one of {list(FAMILIES)}")
  extras = card.get("lcm_jax") or {}
  if not isinstance(extras, Mapping):
    raise ExportError(f"{where}: field 'lcm_jax': expected a mapping")
  ours: dict[str, Any] = {}
  if extras.get("model_config") is not None:
    if not isinstance(extras["model_config"], Mapping):
      raise ExportError(f"{where}: field 'lcm_jax.model_config': expected a mapping")
    try:
      ours = dataclasses.asdict(ModelConfig.from_config(dict(extras["model_config"])))
    except (TypeError, ValueError) as e:
      raise ExportError(f"{where}: field 'lcm_jax.model_config': {e}") from None
    if ours["family"] != family:
      raise ExportError(f"{where}: field 'lcm_jax.model_config.family': {ours['family']!r} "
                        f"differs from model_family {family!r}")

  arch = card.get("model_arch")
  merged: dict[str, Any] = REFERENCE_DEFAULTS[family]
  if arch is not None:
    if arch not in REFERENCE_ARCHS:
      raise ExportError(f"{where}: field 'model_arch': unknown arch {arch!r} (known: "
                        f"{sorted(REFERENCE_ARCHS)})")
    arch_family, overrides = REFERENCE_ARCHS[arch]
    if arch_family != family:
      raise ExportError(f"{where}: field 'model_arch': {arch!r} is a {arch_family} arch, but "
                        f"model_family is {family!r}")
    merged = _merge(merged, overrides)
  elif "model_config" not in card:
    raise ExportError(f"{where}: neither 'model_arch' nor 'model_config' is given")
  if card.get("model_config") is not None:
    if not isinstance(card["model_config"], Mapping):
      raise ExportError(f"{where}: field 'model_config': expected a mapping")
    merged = _merge(merged, card["model_config"])
  f = _Fields(merged, where)
  if merged.get("model_type", family) != family:
    raise ExportError(f"{where}: field 'model_config.model_type': {merged['model_type']!r} "
                      f"differs from model_family {family!r}")

  values: dict[str, Any] = dict(ours, family=family)
  values["sonar_embed_dim"] = f.number("sonar_embed_dim")
  values["model_dim"] = f.number("model_dim")
  values["max_seq_len"] = f.number("max_seq_len")
  f.require("frontend.pre_linear_bias", [True])
  f.require("frontend.weight_normalization", [False])
  stack = "lcm" if family == "base_lcm" else "context_encoder"
  _check_stack(f, stack, "rope")
  values["num_layers"] = f.number(f"{stack}.num_layers")
  values["num_heads"] = f.number(f"{stack}.num_attn_heads")
  values["ffn_inner_dim"] = f.number(f"{stack}.ffn_inner_dim")
  values["dropout"] = f.number(f"{stack}.dropout_p", float)
  values["rope_theta"] = f.number(f"{stack}.rope_theta", float)
  if family == "base_lcm":
    f.require("frontend.scale_embeddings", [False])
    _check_projection(f, "postnet")
    if merged.get("model_output_dim") not in (None, values["sonar_embed_dim"]):
      raise ExportError(f"{where}: field 'model_config.model_output_dim': "
                        f"{merged['model_output_dim']!r} differs from sonar_embed_dim "
                        f"{values['sonar_embed_dim']} (not supported by lcm_jax)")
  else:
    _check_stack(f, "denoiser", "none")
    _check_projection(f, "denoiser.pre_denoiser")
    _check_projection(f, "denoiser.post_denoiser")
    values["denoiser_num_layers"] = f.number("denoiser.num_layers")
    for key, ours_key in (("num_attn_heads", "num_heads"), ("ffn_inner_dim", "ffn_inner_dim"),
                          ("dropout_p", "dropout")):
      kind = float if key == "dropout_p" else int
      if f.number(f"denoiser.{key}", kind) != values[ours_key]:
        raise ExportError(f"{where}: field 'model_config.denoiser.{key}': "
                          f"{f.get('denoiser.' + key)!r} differs from {stack}.{key} "
                          f"{values[ours_key]!r} (lcm_jax shares one value)")
    if f.number("denoiser.timestep_embed_dim") != values["model_dim"]:
      raise ExportError(f"{where}: field 'model_config.denoiser.timestep_embed_dim': "
                        f"{f.get('denoiser.timestep_embed_dim')!r} must equal model_dim "
                        f"{values['model_dim']}")
    s = "noise_scheduler"
    f.require(f"{s}.prediction_type", ["sample"])
    f.require(f"{s}.set_alpha_to_one", [True])
    f.require(f"{s}.clip_sample", [False])
    f.require(f"{s}.thresholding", [False])
    values["beta_schedule"] = f.require(f"{s}.beta_schedule", ["squaredcos_cap_v2", "sigmoid",
                                                               "linear", "scaled_linear"])
    if values["beta_schedule"] == "scaled_linear":
      f.require(f"{s}.scaled_linear_exponent", [2, 2.0])
    values["num_diffusion_train_steps"] = f.number(f"{s}.num_diffusion_train_steps")
    values["beta_start"] = f.number(f"{s}.beta_start", float)
    values["beta_end"] = f.number(f"{s}.beta_end", float)
    values["sigmoid_alpha"] = f.number(f"{s}.sigmoid_schedule_alpha", float)
    values["sigmoid_beta"] = f.number(f"{s}.sigmoid_schedule_beta", float)
    values["rescale_zero_terminal_snr"] = f.require(f"{s}.rescale_betas_zero_snr", [True, False])
    guided = f.require("trained_with_cf_guidance", [True, False])
    if not guided:
      values["cfg_dropout"] = 0.0
    elif "cfg_dropout" not in ours:
      values["cfg_dropout"] = ModelConfig.cfg_dropout
  try:
    return ModelConfig.from_config(values)
  except (TypeError, ValueError) as e:
    raise ExportError(f"{where}: field 'model_config': {e}") from None


# ----------------------------------------------------------------------------------------------
# State dicts

def check_state_dict(state: Mapping[str, Any], cfg: ModelConfig, where: str) -> None:
  """Keys and shapes against the spec's list for ``cfg`` (missing, extra, wrong shape)."""
  expected = naming.reference_shapes(cfg)
  missing = [k for k in expected if k not in state]
  extra = sorted(k for k in state if k not in expected)

  def show(keys: list[str]) -> str:
    return ", ".join(repr(k) for k in keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5
                                                  else "")

  if missing:
    raise ExportError(f"{where}: missing key(s) {show(missing)} for a {cfg.family} model "
                      f"({len(expected)} keys expected)")
  if extra:
    raise ExportError(f"{where}: unexpected key(s) {show(extra)} for a {cfg.family} model")
  for key, shape in expected.items():
    if tuple(state[key].shape) != shape:
      raise ExportError(f"{where}: key '{key}': shape {tuple(state[key].shape)}, expected {shape}")


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


def _checkpoint_path(card: Mapping[str, Any], card_path: str, field: str = "checkpoint") -> str:
  value = card.get(field)
  if not isinstance(value, str) or not value:
    raise ExportError(f"{card_path}: field '{field}': expected a path or file:// URI, got "
                      f"{value!r}")
  if value.startswith("file://"):
    value = urllib.parse.unquote(urllib.parse.urlparse(value).path)
  elif "://" in value:
    raise ExportError(f"{card_path}: field '{field}': only local paths and file:// URIs are "
                      f"supported, got {value!r}")
  card_dir = os.path.dirname(os.path.abspath(card_path))
  if not os.path.isabs(value):
    return os.path.join(card_dir, value)
  beside = os.path.join(card_dir, os.path.basename(value))
  if os.path.isfile(beside):
    return beside  # an export directory travels whole: a copied or moved one reads its own files
  return value


def checkpoint_uri(path: str) -> str:
  """The absolute ``file://`` URI of ``path`` (percent-encoded), as a card's ``checkpoint``."""
  return pathlib.Path(os.path.abspath(path)).as_uri()


def check_card_name(name: str, flag: str = "--name") -> str:
  """A fairseq2 asset name: non-empty, no ``@`` (the environment separator), no whitespace at
  either end; returns it."""
  if not name or name != name.strip() or "@" in name:
    raise ExportError(f"{flag}: {name!r} is not a valid fairseq2 asset name (non-empty, no '@', "
                      "no leading/trailing spaces); pass --name")
  return name


def read_card(path: str) -> dict[str, Any]:
  """Parses a model card (one YAML mapping)."""
  if not os.path.isfile(path):
    raise ExportError(f"--from_torch: {path} does not exist")
  yaml = _yaml()
  try:
    with open(path, encoding="utf-8") as f:
      card = yaml.safe_load(f)
  except yaml.YAMLError as e:
    raise ExportError(f"{path}: not a valid YAML file ({str(e).splitlines()[0]})") from None
  if not isinstance(card, dict):
    raise ExportError(f"{path}: expected a YAML mapping (a model card)")
  return card


def load_torch_state_dict(path: str) -> dict[str, Any]:
  """``torch.load`` of a reference checkpoint (``{"model": state_dict, "model_key": ...}``, tensors
  only) -> the state dict of torch tensors."""
  torch = _torch()
  if not os.path.isfile(path):
    raise ExportError(f"{path}: checkpoint file does not exist")
  try:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(f"{path}: cannot read as a torch checkpoint ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
  if not isinstance(checkpoint, dict):
    raise ExportError(f"{path}: expected a dict with a 'model' state dict")
  key = checkpoint.get("model_key", "model")
  state = checkpoint.get(key)
  if not isinstance(state, dict):
    raise ExportError(f"{path}: field '{key}': missing or not a state dict")
  for name, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise ExportError(f"{path}: key '{name}': not a tensor ({type(value).__name__})")
  if state and all(k.startswith("module.") for k in state):  # a DDP-wrapped model's keys
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


def load_card(card_path: str) -> tuple[dict[str, Any], ModelConfig, dict[str, Any], str]:
  """Reads a card and its checkpoint: ``(card, config, state dict (torch tensors, checked),
  checkpoint path)``."""
  card = read_card(card_path)
  cfg = model_config_from_card(card, card_path)
  ckpt = _checkpoint_path(card, card_path)
  state = load_torch_state_dict(ckpt)
  check_state_dict(state, cfg, ckpt)
  for name, value in state.items():
    if not value.is_floating_point():
      raise ExportError(f"{ckpt}: key '{name}': dtype {value.dtype} is not a float type")
  return card, cfg, state, ckpt


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
  state = to_torch_state_dict(params, buffers, cfg, dtype)
  notes = compatibility_notes(cfg)
  card = {
      "name": name,
      "model_family": cfg.family,
      "model_arch": TOY_ARCHS[cfg.family],
      "checkpoint": where(MODEL_FILE),
      "model_config": reference_model_config(cfg, normalizer_name),
      "lcm_jax": {"format_version": FORMAT_VERSION, "dtype": dtype, "step": step,
                  "model_config": dataclasses.asdict(cfg), "reference_compatible": not notes,
                  "notes": notes},
  }
  normalizer_card = {"name": normalizer_name, "model_family": "sonar_normalizer",
                     "model_arch": "base", "model_config": {"dim": cfg.sonar_embed_dim},
                     "checkpoint": where(NORMALIZER_FILE)}
  prefix = "frontend." if cfg.family == "base_lcm" else ""
  normalizer_state = {k: state[f"{prefix}sonar_normalizer.{k}"].clone()
                      for k in ("center", "scale")}
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
  from lcm_jax import generate  # pylint: disable=g-import-not-at-top
  torch_dtype(dtype)  # bad --dtype before any work
  _prepare_target(os.path.abspath(out_dir), overwrite, "--out")
  check_card_name(name or os.path.basename(os.path.abspath(out_dir)))
  step = generate.checkpoint_step(workdir, step)
  if config is None:
    config = generate.load_checkpoint_config(workdir, step)
  try:
    cfg = ModelConfig.from_config(config.model)
  except (AttributeError, TypeError) as e:
    raise ExportError(f"{workdir}: the checkpoint's config has no valid 'model' ({e})") from None
  _, variables, _ = generate.restore_weights(config, workdir, step,
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
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lcm_jax import models  # pylint: disable=g-import-not-at-top
  model = models.build(cfg)

  def init(rng: Any) -> dict[str, Any]:
    v = model.init({"params": rng, "dropout": rng}, jnp.zeros((1, 2, cfg.sonar_embed_dim)),
                   jnp.ones((1, 2), jnp.int32), jnp.arange(2, dtype=jnp.int32)[None],
                   deterministic=True)
    return {"params": v["params"], "buffers": v.get("buffers", {})}

  return nn.unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))


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
      prog="python -m lcm_jax.export",
      description="Export an lcm_jax Orbax checkpoint to the reference PyTorch format\n"
                  "(model.pt + model_card.yaml + normalizer card), or import such a card back\n"
                  "into an Orbax checkpoint that config.train.init_from can start from.\n"
                  "See the lcm_jax/export.py docstring for the formats.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="examples:\n"
             "  python -m lcm_jax.export --workdir=W [--step=S] --out=DIR [--dtype=bfloat16]\n"
             "  python -m lcm_jax.export --from_torch=DIR/model_card.yaml --workdir=W2\n"
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
