"""The model-family interface: everything the tools need to know about one family of LCMs.

A family is one file in ``lcm_jax/families/`` that defines ``FAMILY = Family(...)``, plus a recipe
in ``configs/`` and one line in :data:`lcm_jax.families.REGISTRY`. The trainer, the evaluator, the
generator, ``--mode=describe`` and the benchmarks look the family up by
``config.model.family``; none of them compares family names.

The contracts (``model`` is the Flax module :meth:`Family.build` returns, ``variables`` is
``{"params": ..., "buffers": ...}``, batches are :mod:`lcm_jax.data`'s packed rows):

* ``loss(model, variables, batch, *, rng, deterministic) -> (loss_sum, count, extras)``: SUMS
  over the batch's scored targets, so that the train step divides once by the global count;
  ``extras`` are further sums (``prev_concept_loss``, ``unweighted_loss``); ``rng=None`` is the
  deterministic evaluation form.
* ``teacher_forced(model, variables, batch, *, sampler, rng) -> (predictions, normalized)``:
  target-aligned predictions (``out[:, j]`` predicts concept ``j`` from concepts ``< j`` of its
  document) for every position, in normalized space, float32 (B, L, S).
* ``decoder(model, latent_noise_scale, sampler)``: an object with ``start``/``advance``
  (:mod:`lcm_jax.decoding`) that the generator drives, predicting raw SONAR concepts.
* ``samples``: the family predicts with the diffusion sampler; its tools then take and validate
  a :class:`lcm_jax.diffusion.SamplerConfig` against ``num_diffusion_train_steps``.
* ``matmul_param_count(cfg)``, ``train_flops_per_concept(cfg, seq_len, rows_per_step)`` and
  ``generation_flops(cfg, batch, prompt_len, max_len, visited, halves)``: the FLOP conventions of
  :mod:`lcm_jax.models.flops`, as the family's model really executes them.
* ``describe_layers(cfg)``: the layers part of ``--mode=describe``'s model line.
* ``config_fields``: the ``config.model`` fields the family reads beyond
  :data:`COMMON_FIELDS`; a recipe of another family's field is refused.
* ``frozen_buffers(normalizer)``: the values of the frozen (non-trained) buffers by leaf name,
  put into the ``buffers`` collection at initialisation (the SONAR normalizer today).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import numpy as np

from lcm_jax.models.config import ModelConfig

# The transformer body every family has (configs/base.py's model_config()).
COMMON_FIELDS = frozenset({
    "family", "sonar_embed_dim", "model_dim", "num_layers", "num_heads", "ffn_inner_dim",
    "ffn_multiple_of", "max_seq_len", "dropout", "rope_theta", "norm_eps", "dtype", "param_dtype",
    "scan_layers", "remat_policy", "attention_impl"})
# The diffusion settings shared by the diffusion families (configs/base.py's diffusion_config()).
DIFFUSION_FIELDS = frozenset({
    "timestep_embed_dim", "num_diffusion_train_steps", "beta_schedule", "beta_start", "beta_end",
    "sigmoid_alpha", "sigmoid_beta", "rescale_zero_terminal_snr", "loss_weighting",
    "snr_clamp_min", "snr_clamp_max", "fragility_a", "fragility_b", "cfg_dropout"})


def normalizer_buffers(normalizer: Any) -> dict[str, np.ndarray]:
  """The SONAR normalizer's ``center``/``scale`` buffers (every family has them)."""
  return {"center": np.asarray(normalizer.center, np.float32),
          "scale": np.asarray(normalizer.scale, np.float32)}


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family (see the module docstring for the contracts)."""

  name: str
  """``config.model.family`` and the exported card's ``model_family``."""
  title: str
  """Human name, e.g. ``Two-Tower diffusion LCM``."""
  module: type[nn.Module]
  """The Flax module class; built as ``module(config=cfg)``."""
  loss: Callable[..., Any]
  teacher_forced: Callable[..., Any]
  decoder: Callable[..., Any]
  samples: bool
  matmul_param_count: Callable[[ModelConfig], int]
  train_flops_per_concept: Callable[..., int]
  generation_flops: Callable[..., int]
  describe_layers: Callable[[ModelConfig], str]
  config_fields: frozenset[str] = frozenset()
  frozen_buffers: Callable[[Any], Mapping[str, np.ndarray]] = normalizer_buffers

  def build(self, cfg: ModelConfig) -> nn.Module:
    return self.module(config=cfg)

  @property
  def fields(self) -> frozenset[str]:
    """Every ``config.model`` field this family accepts."""
    return COMMON_FIELDS | self.config_fields
