"""The reference's checkpoint format, one entry per model family: :data:`REFERENCE_FAMILIES`.

Everything here is JAX-free (NumPy, PyYAML; torch imported lazily to read a checkpoint), so that
the PyTorch side loads a card without JAX. What a family contributes (:class:`ReferenceFamily`):

* ``key_shapes(cfg)``: every state-dict key of the family and its torch shape (Linear weights are
  (out, in)), the frozen normalizer's ``center``/``scale`` included;
* ``card_config(cfg, normalizer_name)`` / ``read_card_config``: the card's ``model_config`` in the
  reference's field names, and back (with the reference dataclasses' ``defaults`` for what a card
  leaves out, and the reference's registered ``archs``);
* ``reference_has_it``: whether the reference (facebookresearch/large_concept_model) defines the
  family at all; ``notes(cfg)``: why the reference could not build a config;
* ``samples`` (generation runs the DDIM sampler), ``torch_model`` / ``torch_decoder``: the names of
  its plain-PyTorch module in :mod:`lcm_interop.torch_models` and generation decoder in
  :mod:`lcm_interop.torch_generate`.

The One-Tower diffusion LCM has no reference counterpart: its card (``model_family:
one_tower_diffusion_lcm``, no ``model_arch``) follows the same layout with lcm_jax's own
``model_config`` fields; the reference cannot load it, lcm_jax's import and
:mod:`lcm_interop.torch_models` can. Its keys: ``sonar_normalizer.{center,scale}``,
``frontend.embed_time.{fc1,fc2}``, ``frontend.pre_linear`` ((d, S + d): the input is
``[x ; t_emb]``), ``frontend.pos_encoder.weight`` ((max_seq_len, d), an embedding table, not a
Linear), ``lcm.layers.N.*`` (the Base-LCM layer), ``lcm.layer_norm``, ``postnet.fc``.

A config here is anything with the :class:`~lcm_jax.models.config.ModelConfig` fields (a
``ModelConfig`` or lcm_jax's ``ModelConfig``). The card's layout and the field sources are
documented in :mod:`lcm_interop.export`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
import urllib.parse
from typing import Any, Callable, Mapping, Optional, Sequence

from lcm_jax.models.config import ModelConfig
from lcm_jax.errors import UserError

FORMAT_VERSION = 1
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
MODEL_FILE = "model.pt"
CARD_FILE = "model_card.yaml"
NORMALIZER_FILE = "normalizer.pt"
NORMALIZER_CARD_FILE = "normalizer_card.yaml"
REFERENCE_NORM_EPS = 1e-5
REFERENCE_FFN_MULTIPLE = 256
REFERENCE_TIMESTEP_FEATURES = 256
NORMALIZER_SUFFIXES = ("sonar_normalizer.center", "sonar_normalizer.scale")

Shapes = dict[str, tuple[int, ...]]


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


# ----------------------------------------------------------------------------------------------
# Key shapes

def _attention_shapes(cfg: Any, prefix: str) -> Shapes:
  d, inner = cfg.model_dim, cfg.num_heads * cfg.head_dim
  shapes: Shapes = {}
  for name in ("q_proj", "k_proj", "v_proj"):
    shapes[prefix + f"{name}.weight"] = (inner, d)
    shapes[prefix + f"{name}.bias"] = (inner,)
  shapes[prefix + "output_proj.weight"] = (d, inner)
  shapes[prefix + "output_proj.bias"] = (d,)
  return shapes


def _ffn_shapes(cfg: Any, prefix: str) -> Shapes:
  d, f = cfg.model_dim, cfg.swiglu_inner_dim
  shapes: Shapes = {}
  for name in ("gate_proj", "inner_proj"):
    shapes[prefix + f"{name}.weight"] = (f, d)
    shapes[prefix + f"{name}.bias"] = (f,)
  shapes[prefix + "output_proj.weight"] = (d, f)
  shapes[prefix + "output_proj.bias"] = (d,)
  return shapes


def _decoder_layer_shapes(cfg: Any, prefix: str) -> Shapes:
  """One shared pre-norm layer under ``prefix`` (ending with ``.``)."""
  d = cfg.model_dim
  shapes = {prefix + "self_attn_layer_norm.weight": (d,)}
  shapes.update(_attention_shapes(cfg, prefix + "self_attn."))
  shapes[prefix + "ffn_layer_norm.weight"] = (d,)
  shapes.update(_ffn_shapes(cfg, prefix + "ffn."))
  return shapes


def _linear_shapes(prefix: str, out_dim: int, in_dim: int) -> Shapes:
  return {prefix + "weight": (out_dim, in_dim), prefix + "bias": (out_dim,)}


def _stack_shapes(cfg: Any, prefix: str, num_layers: int) -> Shapes:
  shapes: Shapes = {}
  for i in range(num_layers):
    shapes.update(_decoder_layer_shapes(cfg, f"{prefix}.layers.{i}."))
  shapes[f"{prefix}.layer_norm.weight"] = (cfg.model_dim,)
  return shapes


def _normalizer_shapes(cfg: Any, prefix: str) -> Shapes:
  s = cfg.sonar_embed_dim
  return {f"{prefix}.center": (s,), f"{prefix}.scale": (s,)}


def base_lcm_shapes(cfg: Any) -> Shapes:
  """``frontend.{pre_linear, sonar_normalizer}``, ``lcm.layers.N``, ``lcm.layer_norm``,
  ``postnet.fc``."""
  d, s = cfg.model_dim, cfg.sonar_embed_dim
  shapes = _linear_shapes("frontend.pre_linear.", d, s)
  shapes.update(_normalizer_shapes(cfg, "frontend.sonar_normalizer"))
  shapes.update(_stack_shapes(cfg, "lcm", cfg.num_layers))
  shapes.update(_linear_shapes("postnet.fc.", s, d))
  return shapes


def two_tower_shapes(cfg: Any) -> Shapes:
  """``sonar_normalizer``, ``encoder_frontend.pre_linear``, ``context_encoder.layers.N``
  (``num_layers``), ``context_encoder.layer_norm``, ``denoiser.{embed_time.fc1 (d,
  timestep_embed_dim), embed_time.fc2, initial_proj.fc, final_proj.fc, layer_norm}`` and
  ``denoiser.layers.N`` (``denoiser_num_layers``) with ``{self_attn, cross_attention, ffn}``, their
  three norms and ``modulator.fc`` (9d, d)."""
  d, s = cfg.model_dim, cfg.sonar_embed_dim
  shapes = _normalizer_shapes(cfg, "sonar_normalizer")
  shapes.update(_linear_shapes("encoder_frontend.pre_linear.", d, s))
  shapes.update(_stack_shapes(cfg, "context_encoder", cfg.num_layers))
  shapes.update(_linear_shapes("denoiser.embed_time.fc1.", d, cfg.timestep_embed_dim))
  shapes.update(_linear_shapes("denoiser.embed_time.fc2.", d, d))
  shapes.update(_linear_shapes("denoiser.initial_proj.fc.", d, s))
  for i in range(cfg.denoiser_num_layers):
    p = f"denoiser.layers.{i}."
    for norm in ("self_attn_layer_norm", "cross_attention_layer_norm", "ffn_layer_norm"):
      shapes[p + norm + ".weight"] = (d,)
    shapes.update(_attention_shapes(cfg, p + "self_attn."))
    shapes.update(_attention_shapes(cfg, p + "cross_attention."))
    shapes.update(_ffn_shapes(cfg, p + "ffn."))
    shapes.update(_linear_shapes(p + "modulator.fc.", 9 * d, d))
  shapes["denoiser.layer_norm.weight"] = (d,)
  shapes.update(_linear_shapes("denoiser.final_proj.fc.", s, d))
  return shapes


def one_tower_shapes(cfg: Any) -> Shapes:
  """``sonar_normalizer``, ``frontend.{embed_time.fc1, embed_time.fc2, pre_linear (d, S + d),
  pos_encoder.weight (max_seq_len, d)}``, ``lcm.layers.N``, ``lcm.layer_norm``, ``postnet.fc``."""
  d, s = cfg.model_dim, cfg.sonar_embed_dim
  shapes = _normalizer_shapes(cfg, "sonar_normalizer")
  shapes.update(_linear_shapes("frontend.embed_time.fc1.", d, cfg.timestep_embed_dim))
  shapes.update(_linear_shapes("frontend.embed_time.fc2.", d, d))
  shapes.update(_linear_shapes("frontend.pre_linear.", d, s + d))
  shapes["frontend.pos_encoder.weight"] = (cfg.max_seq_len, d)
  shapes.update(_stack_shapes(cfg, "lcm", cfg.num_layers))
  shapes.update(_linear_shapes("postnet.fc.", s, d))
  return shapes


EMBEDDING_TABLES = ("pos_encoder",)
"""Modules whose 2-D ``weight`` is an embedding table (rows = positions), not a Linear: not
transposed by :mod:`lcm_interop.naming`."""


# ----------------------------------------------------------------------------------------------
# Config -> the card's model_config

def _transformer(cfg: Any, num_layers: int, pos_embedding_style: str) -> dict[str, Any]:
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


def _frontend() -> dict[str, Any]:
  return {"dropout_p": 0.0, "pre_linear_bias": True, "pre_linear_init_fn": "kaiming_uniform",
          "weight_normalization": False}


def _noise_scheduler(cfg: Any) -> dict[str, Any]:
  return {
      "num_diffusion_train_steps": cfg.num_diffusion_train_steps,
      "beta_start": cfg.beta_start, "beta_end": cfg.beta_end, "beta_schedule": cfg.beta_schedule,
      "sigmoid_schedule_alpha": cfg.sigmoid_alpha, "sigmoid_schedule_beta": cfg.sigmoid_beta,
      "prediction_type": "sample", "set_alpha_to_one": True,
      "rescale_betas_zero_snr": cfg.rescale_zero_terminal_snr, "clip_sample": False,
      "thresholding": False}


def _common(cfg: Any, normalizer_name: Optional[str]) -> dict[str, Any]:
  return {"model_type": cfg.family, "sonar_embed_dim": cfg.sonar_embed_dim,
          "sonar_normalizer_name": normalizer_name, "max_seq_len": cfg.max_seq_len,
          "model_dim": cfg.model_dim}


def _base_card_config(cfg: Any, normalizer_name: Optional[str]) -> dict[str, Any]:
  """``BaseLCModelConfig``."""
  return dict(_common(cfg, normalizer_name), model_output_dim=cfg.sonar_embed_dim,
              frontend=dict(_frontend(), scale_embeddings=False),
              lcm=_transformer(cfg, cfg.num_layers, "rope"), postnet=_projection())


def _two_tower_card_config(cfg: Any, normalizer_name: Optional[str]) -> dict[str, Any]:
  """``TwoTowerDiffusionLCModelConfig``."""
  return dict(_common(cfg, normalizer_name), frontend=_frontend(),
              context_encoder=_transformer(cfg, cfg.num_layers, "rope"),
              denoiser=dict(_transformer(cfg, cfg.denoiser_num_layers, "none"),
                            timestep_embed_dim=cfg.model_dim, pre_denoiser=_projection(),
                            post_denoiser=_projection()),
              noise_scheduler=_noise_scheduler(cfg),
              trained_with_cf_guidance=cfg.cfg_dropout > 0)


def _one_tower_card_config(cfg: Any, normalizer_name: Optional[str]) -> dict[str, Any]:
  """lcm_jax's own fields, in the reference's style: the frontend with its learned positions and
  ``timestep_features`` (the sinusoidal input size of ``embed_time.fc1``), the ``lcm`` stack
  (no positional encoding of its own), the ``postnet``, the noise scheduler."""
  return dict(_common(cfg, normalizer_name),
              frontend=dict(_frontend(), pos_embedding_style="learned",
                            timestep_features=cfg.timestep_embed_dim),
              lcm=_transformer(cfg, cfg.num_layers, "none"), postnet=_projection(),
              noise_scheduler=_noise_scheduler(cfg),
              trained_with_cf_guidance=cfg.cfg_dropout > 0)


# ----------------------------------------------------------------------------------------------
# The card's model_config -> config values

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


class _Fields:
  """Typed access to a merged card config; errors name the card and the field."""

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


def _read_stack(f: _Fields, values: dict[str, Any], stack: str, pos: str) -> None:
  """The common fields and the main transformer stack ``stack``."""
  values["sonar_embed_dim"] = f.number("sonar_embed_dim")
  values["model_dim"] = f.number("model_dim")
  values["max_seq_len"] = f.number("max_seq_len")
  f.require("frontend.pre_linear_bias", [True])
  f.require("frontend.weight_normalization", [False])
  _check_stack(f, stack, pos)
  values["num_layers"] = f.number(f"{stack}.num_layers")
  values["num_heads"] = f.number(f"{stack}.num_attn_heads")
  values["ffn_inner_dim"] = f.number(f"{stack}.ffn_inner_dim")
  values["dropout"] = f.number(f"{stack}.dropout_p", float)
  values["rope_theta"] = f.number(f"{stack}.rope_theta", float)


def _read_diffusion(f: _Fields, values: dict[str, Any], ours: Mapping[str, Any]) -> None:
  """``noise_scheduler`` and ``trained_with_cf_guidance``."""
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


def _read_base(f: _Fields, values: dict[str, Any], ours: Mapping[str, Any]) -> None:
  del ours
  _read_stack(f, values, "lcm", "rope")
  f.require("frontend.scale_embeddings", [False])
  _check_projection(f, "postnet")
  if f.data.get("model_output_dim") not in (None, values["sonar_embed_dim"]):
    raise ExportError(f"{f.where}: field 'model_config.model_output_dim': "
                      f"{f.data['model_output_dim']!r} differs from sonar_embed_dim "
                      f"{values['sonar_embed_dim']} (not supported by lcm_jax)")


def _read_two_tower(f: _Fields, values: dict[str, Any], ours: Mapping[str, Any]) -> None:
  stack = "context_encoder"
  _read_stack(f, values, stack, "rope")
  _check_stack(f, "denoiser", "none")
  _check_projection(f, "denoiser.pre_denoiser")
  _check_projection(f, "denoiser.post_denoiser")
  values["denoiser_num_layers"] = f.number("denoiser.num_layers")
  for key, ours_key in (("num_attn_heads", "num_heads"), ("ffn_inner_dim", "ffn_inner_dim"),
                        ("dropout_p", "dropout")):
    kind = float if key == "dropout_p" else int
    if f.number(f"denoiser.{key}", kind) != values[ours_key]:
      raise ExportError(f"{f.where}: field 'model_config.denoiser.{key}': "
                        f"{f.get('denoiser.' + key)!r} differs from {stack}.{key} "
                        f"{values[ours_key]!r} (lcm_jax shares one value)")
  if f.number("denoiser.timestep_embed_dim") != values["model_dim"]:
    raise ExportError(f"{f.where}: field 'model_config.denoiser.timestep_embed_dim': "
                      f"{f.get('denoiser.timestep_embed_dim')!r} must equal model_dim "
                      f"{values['model_dim']}")
  _read_diffusion(f, values, ours)


def _read_one_tower(f: _Fields, values: dict[str, Any], ours: Mapping[str, Any]) -> None:
  _read_stack(f, values, "lcm", "none")
  f.require("frontend.pos_embedding_style", ["learned"])
  values["timestep_embed_dim"] = f.number("frontend.timestep_features")
  _check_projection(f, "postnet")
  _read_diffusion(f, values, ours)


# ----------------------------------------------------------------------------------------------
# Notes: why the reference could not build a config

def _two_tower_notes(cfg: Any) -> list[str]:
  notes = []
  if cfg.timestep_embed_dim != REFERENCE_TIMESTEP_FEATURES:
    notes.append(f"timestep_embed_dim {cfg.timestep_embed_dim} (the reference's DiT timestep "
                 f"encoder has {REFERENCE_TIMESTEP_FEATURES} sinusoidal features)")
  if cfg.beta_schedule == "sigmoid":
    notes.append("beta_schedule 'sigmoid' follows lcm_jax's reading of paper eq. 14, not "
                 "verified against the reference's")
  return notes


def _one_tower_notes(cfg: Any) -> list[str]:
  del cfg
  return ["the reference has no One-Tower diffusion LCM (model_family "
          "'one_tower_diffusion_lcm'): it cannot load this card; lcm_jax's import "
          "(python -m lcm_interop.export --from_torch) and lcm_interop.torch_models read it"]


def _no_notes(cfg: Any) -> list[str]:
  del cfg
  return []


# ----------------------------------------------------------------------------------------------
# The registry

@dataclasses.dataclass(frozen=True)
class ReferenceFamily:
  """What the reference format needs to know about one model family (see the module doc)."""

  name: str
  """``model_family`` of the card = ``config.model.family``."""
  title: str
  reference_has_it: bool
  """Whether the reference implementation defines this family (can load its cards)."""
  key_shapes: Callable[[Any], Shapes]
  """Every state-dict key and its torch shape, in the order an export writes them."""
  normalizer: str
  """State-dict prefix of the frozen ``center``/``scale`` (``...sonar_normalizer``)."""
  card_config: Callable[[Any, Optional[str]], dict[str, Any]]
  """``(cfg, normalizer card name) -> the card's model_config``."""
  read_card_config: Callable[[_Fields, dict[str, Any], Mapping[str, Any]], None]
  """``(fields of the merged model_config, values to fill, the card's lcm_jax.model_config)``."""
  defaults: Mapping[str, Any]
  """The ``model_config`` of a card that gives none of its fields (the reference dataclass
  defaults; lcm_jax's defaults for a family the reference lacks)."""
  archs: Mapping[str, Mapping[str, Any]]
  """The reference's registered archs of this family (``lcm/models/*/archs.py``) as overrides of
  :attr:`defaults`."""
  export_arch: Optional[str]
  """The ``model_arch`` an export names (its ``model_config`` overrides every field); None: the
  card has no ``model_arch``."""
  notes: Callable[[Any], list[str]]
  """Family-specific reasons the reference could not build a config."""
  samples: bool
  """Whether generation runs the DDIM sampler (sampler settings apply and are validated)."""
  torch_model: str
  """The plain-PyTorch module: a class name in :mod:`lcm_interop.torch_models`."""
  torch_decoder: str
  """Its generation decoder: a class name in :mod:`lcm_interop.torch_generate`."""

  def torch_class(self) -> Any:
    """The :attr:`torch_model` class (imports torch)."""
    return getattr(importlib.import_module("lcm_interop.torch_models"), self.torch_model)

  def decoder_class(self) -> Any:
    """The :attr:`torch_decoder` class (imports torch)."""
    return getattr(importlib.import_module("lcm_interop.torch_generate"), self.torch_decoder)


def _one_tower_defaults() -> dict[str, Any]:
  return _one_tower_card_config(ModelConfig(family="one_tower_diffusion_lcm"), None)


REFERENCE_FAMILIES: dict[str, ReferenceFamily] = {f.name: f for f in (
    ReferenceFamily(
        name="base_lcm", title="Base-LCM", reference_has_it=True, key_shapes=base_lcm_shapes,
        normalizer="frontend.sonar_normalizer", card_config=_base_card_config,
        read_card_config=_read_base,
        defaults=dict(_COMMON_DEFAULTS, model_type="base_lcm", model_output_dim=None,
                      frontend=_FRONTEND_DEFAULTS, lcm=_TRANSFORMER_DEFAULTS,
                      postnet=_PROJECTION_DEFAULTS),
        archs={"toy_base_lcm": {"lcm": {"num_layers": 2}},
               "base_lcm_1_6B": {"max_seq_len": 4096, "model_dim": 2048,
                                 "sonar_normalizer_name": "dummy_sonar_normalizer",
                                 "lcm": _stack_1b6(2048, 16, 32, "rope")}},
        export_arch="toy_base_lcm", notes=_no_notes, samples=False, torch_model="BaseLCM",
        torch_decoder="BaseLCMDecoder"),
    ReferenceFamily(
        name="two_tower_diffusion_lcm", title="Two-Tower diffusion LCM", reference_has_it=True,
        key_shapes=two_tower_shapes, normalizer="sonar_normalizer",
        card_config=_two_tower_card_config, read_card_config=_read_two_tower,
        defaults=dict(
            _COMMON_DEFAULTS, model_type="two_tower_diffusion_lcm", frontend=_FRONTEND_DEFAULTS,
            context_encoder=_TRANSFORMER_DEFAULTS,
            denoiser=dict(_TRANSFORMER_DEFAULTS, pos_embedding_style="none",
                          timestep_embed_dim=1024, pre_denoiser=_PROJECTION_DEFAULTS,
                          post_denoiser=_PROJECTION_DEFAULTS),
            noise_scheduler=_SCHEDULER_DEFAULTS, trained_with_cf_guidance=False),
        archs={"toy_two_tower_diffusion_lcm": {
                   "context_encoder": {"num_layers": 2}, "denoiser": {"num_layers": 2},
                   "sonar_normalizer_name": "dummy_sonar_normalizer"},
               "two_tower_diffusion_lcm_1_6B": _two_tower_arch(2048, 16, 13),
               "two_tower_diffusion_lcm_7B": _two_tower_arch(4096, 32, 14)},
        export_arch="toy_two_tower_diffusion_lcm", notes=_two_tower_notes, samples=True,
        torch_model="TwoTowerLCM", torch_decoder="TwoTowerDecoder"),
    ReferenceFamily(
        name="one_tower_diffusion_lcm", title="One-Tower diffusion LCM", reference_has_it=False,
        key_shapes=one_tower_shapes, normalizer="sonar_normalizer",
        card_config=_one_tower_card_config, read_card_config=_read_one_tower,
        defaults=_one_tower_defaults(), archs={}, export_arch=None, notes=_one_tower_notes,
        samples=True, torch_model="OneTowerLCM", torch_decoder="OneTowerDecoder"),
)}
"""``model_family`` -> :class:`ReferenceFamily`: the only place in lcm_interop that names a
family. A family lcm_jax registers (``lcm_jax.families.REGISTRY``) needs an entry here to export."""

REFERENCE_ARCHS: dict[str, tuple[str, Mapping[str, Any]]] = {
    arch: (fam.name, overrides) for fam in REFERENCE_FAMILIES.values()
    for arch, overrides in fam.archs.items()}
"""Every known ``model_arch`` -> ``(family, overrides of the family's defaults)``."""


def get(name: str) -> ReferenceFamily:
  """The entry of ``name``; :class:`ExportError` naming the known families otherwise."""
  try:
    return REFERENCE_FAMILIES[name]
  except (KeyError, TypeError):
    raise ExportError(f"model family {name!r} has no reference-format entry (known: "
                      f"{list(REFERENCE_FAMILIES)})") from None


def of(cfg: Any) -> ReferenceFamily:
  return get(cfg.family)


def reference_shapes(cfg: Any) -> Shapes:
  """Every reference state-dict key of ``cfg.family`` and its torch shape (Linear weights are
  (out, in)), including the two frozen normalizer buffers."""
  return of(cfg).key_shapes(cfg)


def reference_model_config(cfg: Any, normalizer_name: Optional[str]) -> dict[str, Any]:
  """The card's ``model_config`` of ``cfg`` (the reference's field names, nested dicts for the
  sub-configs), complete enough to override any ``model_arch``."""
  return of(cfg).card_config(cfg, normalizer_name)


def compatibility_notes(cfg: Any) -> list[str]:
  """Why the reference could not build ``cfg`` (empty list: it can)."""
  family = of(cfg)
  notes = []
  if family.reference_has_it:
    if cfg.norm_eps != REFERENCE_NORM_EPS:
      notes.append(f"norm_eps {cfg.norm_eps} (the reference's RMSNorm uses {REFERENCE_NORM_EPS})")
    if cfg.ffn_multiple_of != REFERENCE_FFN_MULTIPLE:
      notes.append(f"ffn_multiple_of {cfg.ffn_multiple_of} (the reference rounds the SwiGLU size "
                   f"to a multiple of {REFERENCE_FFN_MULTIPLE})")
  return notes + family.notes(cfg)


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
  """Recursive dict merge (``override`` wins; nested dicts are merged)."""
  out = dict(base)
  for key, value in override.items():
    if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
      out[key] = _merge(out[key], value)
    else:
      out[key] = value
  return out


def model_values_from_card(card: Mapping[str, Any], where: str) -> dict[str, Any]:
  """The model config fields of a card (a dict of ``ModelConfig`` field values, checked with
  :class:`ModelConfig`): ``lcm_jax.model_config`` when present, overridden by what the reference
  fields (``model_arch``'s config merged with ``model_config``) say. ``where`` (the card's path)
  prefixes every error."""
  family_name = card.get("model_family")
  if not isinstance(family_name, str) or family_name not in REFERENCE_FAMILIES:
    raise ExportError(f"{where}: field 'model_family': {family_name!r} is not one of "
                      f"{list(REFERENCE_FAMILIES)}")
  family = REFERENCE_FAMILIES[family_name]
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
    if ours["family"] != family_name:
      raise ExportError(f"{where}: field 'lcm_jax.model_config.family': {ours['family']!r} "
                        f"differs from model_family {family_name!r}")

  arch = card.get("model_arch")
  merged: dict[str, Any] = dict(family.defaults)
  if arch is not None:
    if arch not in REFERENCE_ARCHS:
      raise ExportError(f"{where}: field 'model_arch': unknown arch {arch!r} (known: "
                        f"{sorted(REFERENCE_ARCHS)})")
    arch_family, overrides = REFERENCE_ARCHS[arch]
    if arch_family != family_name:
      raise ExportError(f"{where}: field 'model_arch': {arch!r} is a {arch_family} arch, but "
                        f"model_family is {family_name!r}")
    merged = _merge(merged, overrides)
  elif "model_config" not in card:
    raise ExportError(f"{where}: neither 'model_arch' nor 'model_config' is given")
  if card.get("model_config") is not None:
    if not isinstance(card["model_config"], Mapping):
      raise ExportError(f"{where}: field 'model_config': expected a mapping")
    merged = _merge(merged, card["model_config"])
  if merged.get("model_type", family_name) != family_name:
    raise ExportError(f"{where}: field 'model_config.model_type': {merged['model_type']!r} "
                      f"differs from model_family {family_name!r}")
  values: dict[str, Any] = dict(ours, family=family_name)
  family.read_card_config(_Fields(merged, where), values, ours)
  card_config(values, where)  # checks the values
  return values


def card_config(values: Mapping[str, Any], where: str) -> ModelConfig:
  """:class:`ModelConfig` of card values; errors name ``where``."""
  try:
    return ModelConfig.from_config(dict(values))
  except (TypeError, ValueError) as e:
    raise ExportError(f"{where}: field 'model_config': {e}") from None


# ----------------------------------------------------------------------------------------------
# Files: cards and checkpoints

def check_state_dict(state: Mapping[str, Any], cfg: Any, where: str) -> None:
  """Keys and shapes against the family's list for ``cfg`` (missing, extra, wrong shape)."""
  expected = reference_shapes(cfg)
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


def checkpoint_path(card: Mapping[str, Any], card_path: str, field: str = "checkpoint") -> str:
  """The local file a card's ``checkpoint`` names: a path relative to the card (older exports),
  an absolute path or a ``file://`` URI; for an absolute one, a file of the same name beside the
  card wins when there is one (a copied or moved export directory reads its own files)."""
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
    return beside
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


def load_card(card_path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]:
  """Reads a card and its checkpoint: ``(card, config values (a dict of ModelConfig fields),
  state dict (torch tensors, checked), checkpoint path)``."""
  card = read_card(card_path)
  values = model_values_from_card(card, card_path)
  cfg = card_config(values, card_path)
  ckpt = checkpoint_path(card, card_path)
  state = load_torch_state_dict(ckpt)
  check_state_dict(state, cfg, ckpt)
  for name, value in state.items():
    if not value.is_floating_point():
      raise ExportError(f"{ckpt}: key '{name}': dtype {value.dtype} is not a float type")
  return card, values, state, ckpt
