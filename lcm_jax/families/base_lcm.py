"""Base-LCM: MSE regression of the next concept (the module: :mod:`lcm_jax.models.base_lcm`).

Teacher-forced predictions are one forward pass (the post-net output at ``j - 1`` predicts
concept ``j``); generation keeps the ``lcm`` stack's KV cache and can add
``temperature * N(0, I)`` to each prediction (the reference's ``sample_latent_variable``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcm_jax import decoding
from lcm_jax.families.family import Family
from lcm_jax.models import flops
from lcm_jax.models.base_lcm import BaseLCM, mse_loss
from lcm_jax.models.config import ModelConfig

Array = jax.Array


def loss(model: nn.Module, variables: dict[str, Any], batch: dict[str, Array], *,
         rng: Array | None, deterministic: bool) -> tuple[Array, Array, dict[str, Array]]:
  """MSE sums, and the same for the previous-concept baseline (``prev_concept_loss``)."""
  rngs = {} if deterministic or rng is None else {"dropout": rng}
  preds, norm_in = model.apply(variables, batch["embeddings"], batch["segment_ids"],
                               batch["positions"], deterministic=deterministic, rngs=rngs)
  loss_sum, count = mse_loss(preds, norm_in, batch["target_mask"])
  mask = batch["target_mask"][:, 1:].astype(jnp.float32)
  prev = jnp.sum(jnp.square(norm_in[:, 1:] - norm_in[:, :-1]).sum(-1) * mask)
  return loss_sum, count, {"prev_concept_loss": prev}


def teacher_forced(model: nn.Module, variables: dict[str, Any], batch: dict[str, Array], *,
                   sampler: Any = None, rng: Array | None = None) -> tuple[Array, Array]:
  """One forward pass, shifted to be target-aligned (column 0 of a document: zeros)."""
  del sampler, rng  # deterministic regression
  preds, normalized = model.apply(variables, batch["embeddings"], batch["segment_ids"],
                                  batch["positions"], deterministic=True)
  aligned = jnp.concatenate([jnp.zeros_like(preds[:, :1]), preds[:, :-1]], axis=1)
  return aligned, normalized


class Decoder:
  """Generation state: the ``lcm`` stack's KV cache."""

  def __init__(self, model: nn.Module, latent_noise_scale: float, sampler: Any = None):
    del sampler
    self.model = model
    self.temperature = latent_noise_scale

  def _concept(self, variables: decoding.Variables, pred: Array, rng: Array) -> Array:
    if self.temperature > 0:
      pred = pred + self.temperature * decoding.latent_noise(rng, pred.shape)
    return decoding.denormalize(variables, pred)

  def start(self, variables: decoding.Variables, prompts: Array, lengths: Array, total: int,
            rng: Array) -> tuple[Any, Array]:
    cache, positions, index = decoding.prefill_inputs(self.model.config, prompts, total)
    preds, _, cache = self.model.apply(variables, prompts, None, positions, cache=cache,
                                       cache_index=index)
    last = jnp.take_along_axis(preds, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return cache, self._concept(variables, last, rng)

  def advance(self, variables: decoding.Variables, cache: Any, concept: Array, slot: Array,
              rng: Array) -> tuple[Any, Array]:
    preds, _, cache = self.model.apply(variables, concept[:, None], None, slot[:, None],
                                       cache=cache, cache_index=slot)
    return cache, self._concept(variables, preds[:, 0], rng)


def matmul_param_count(cfg: ModelConfig) -> int:
  """Pre-net, every layer's q/k/v/output and gate/inner/output, post-net."""
  s, d = cfg.sonar_embed_dim, cfg.model_dim
  return s * d + cfg.num_layers * flops.body_layer_matmul_params(cfg) + d * s


def train_flops_per_concept(cfg: ModelConfig, seq_len: int, rows_per_step: int = 0) -> int:
  """``6 * matmul_param_count`` plus attention with ``keys = seq_len`` in every layer."""
  del rows_per_step  # nothing per step is independent of the number of concepts
  return 6 * matmul_param_count(cfg) + 3 * flops.attention_fwd_flops(cfg, seq_len, cfg.num_layers)


def generation_flops(cfg: ModelConfig, batch: int, prompt_len: int, max_len: int,
                     visited: int = 0, halves: int = 1) -> int:
  """``prompt_len`` prefill positions + ``max_len - 1`` fed-back concepts, each through pre-net,
  all layers and post-net with ``keys = prompt_len + max_len`` (the cache's slots)."""
  del visited, halves  # no sampler
  slots = prompt_len + max_len
  positions = prompt_len + max_len - 1
  return batch * positions * (2 * matmul_param_count(cfg)
                              + flops.attention_fwd_flops(cfg, slots, cfg.num_layers))


def describe_layers(cfg: ModelConfig) -> str:
  return str(cfg.num_layers)


FAMILY = Family(
    name="base_lcm", title="Base-LCM", module=BaseLCM, loss=loss, teacher_forced=teacher_forced,
    decoder=Decoder, samples=False, matmul_param_count=matmul_param_count,
    train_flops_per_concept=train_flops_per_concept, generation_flops=generation_flops,
    describe_layers=describe_layers)
