"""The registry of model families: ``config.model.family`` -> :class:`Family`.

Adding a family: write ``lcm_jax/families/<name>.py`` defining ``FAMILY = Family(...)`` (see
:mod:`lcm_jax.families.family` for the contracts), add a recipe in ``configs/``, and add one line
to :data:`REGISTRY` below. Nothing else in the stack names a family.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.errors import ConfigError
from lcm_jax.families import base_lcm
from lcm_jax.families import one_tower
from lcm_jax.families import two_tower
from lcm_jax.families.family import COMMON_FIELDS, DIFFUSION_FIELDS, Family
from lcm_jax.models.config import ModelConfig

REGISTRY: dict[str, Family] = {f.name: f for f in (
    base_lcm.FAMILY,
    two_tower.FAMILY,
    one_tower.FAMILY,
)}

__all__ = ["COMMON_FIELDS", "DIFFUSION_FIELDS", "Family", "REGISTRY", "get", "model_config",
           "param_count"]


def get(name: str) -> Family:
  """The family registered as ``name``; :class:`ConfigError` naming the known ones otherwise."""
  try:
    return REGISTRY[name]
  except KeyError:
    raise ConfigError(f"config.model.family: unknown model family {name!r} (registered: "
                      f"{', '.join(REGISTRY)})") from None


def of(cfg: ModelConfig) -> Family:
  """The family of a model config."""
  return get(cfg.family)


def model_config(model: Any, *, strict: bool = True) -> ModelConfig:
  """``config.model`` (a ConfigDict, dict or ModelConfig) -> :class:`ModelConfig` of its family.

  ``strict`` (a recipe or the command line): a field that belongs to another family (e.g.
  ``denoiser_num_layers`` in a Base-LCM config) is a :class:`ConfigError` naming it. Not strict
  (a config saved by an earlier version, which carried every family's fields): such fields are
  dropped.
  """
  if isinstance(model, ModelConfig):
    return model
  values = dict(model.to_dict() if hasattr(model, "to_dict") else model)
  family = get(values.get("family", ModelConfig.family))
  foreign = sorted(k for k in values if k not in family.fields and k in ModelConfig.field_names())
  if foreign and strict:
    owners = {k: [f.name for f in REGISTRY.values() if k in f.fields] for k in foreign}
    raise ConfigError(
        f"config.model.{foreign[0]}: not a field of the {family.name} family (it belongs to "
        f"{', '.join(owners[foreign[0]]) or 'no family'}); remove it from the config"
        + (f" (also: {', '.join(foreign[1:])})" if len(foreign) > 1 else ""))
  return ModelConfig.from_config({k: v for k, v in values.items() if k not in foreign})


def init_inputs(cfg: ModelConfig, seq_len: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Dummy ``(embeddings, segment_ids, positions)`` of one row to initialise any family's model."""
  return (jnp.zeros((1, seq_len, cfg.sonar_embed_dim), jnp.float32),
          jnp.ones((1, seq_len), jnp.int32), jnp.arange(seq_len, dtype=jnp.int32)[None])


def abstract_variables(cfg: ModelConfig, seq_len: int = 2) -> dict[str, Any]:
  """The model's variables (boxed, with logical axis names) as ShapeDtypeStructs: nothing is
  allocated (``jax.eval_shape``)."""
  model = of(cfg).build(cfg)
  rng = jax.random.PRNGKey(0)
  return jax.eval_shape(
      lambda: model.init({"params": rng, "dropout": rng}, *init_inputs(cfg, seq_len),
                         deterministic=True))


def param_count(cfg: ModelConfig) -> int:
  """Trainable parameters (the ``params`` collection; frozen buffers are excluded)."""
  params = nn.meta.unbox(abstract_variables(cfg)["params"])
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def matmul_param_count(cfg: ModelConfig) -> int:
  return of(cfg).matmul_param_count(cfg)


def train_flops_per_concept(cfg: ModelConfig, seq_len: int, rows_per_step: int = 0) -> int:
  return of(cfg).train_flops_per_concept(cfg, seq_len, rows_per_step)


def frozen_buffer_values(cfg: ModelConfig, source: Any) -> Mapping[str, np.ndarray]:
  return of(cfg).frozen_buffers(source)
