"""Model families: how the trainer builds a model and scores a batch.

A family supplies a Flax module built from :class:`~lcm_jax.models.config.ModelConfig` and a loss
that returns SUMS (loss sum, number of targets, extra metric sums); the train step divides once by
the global target count, so gradient accumulation and packing weight every target equally.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcm_jax import errors
from lcm_jax.models.config import ModelConfig

Batch = dict[str, jax.Array]


def build(cfg: ModelConfig) -> nn.Module:
  if cfg.family == "base_lcm":
    from lcm_jax.models.base_lcm import BaseLCM  # pylint: disable=g-import-not-at-top
    return BaseLCM(config=cfg)
  if cfg.family == "two_tower_diffusion_lcm":
    from lcm_jax.models.two_tower import TwoTowerLCM  # pylint: disable=g-import-not-at-top
    return TwoTowerLCM(config=cfg)
  raise errors.ConfigError(f"config.model.family: unknown model family {cfg.family!r} (expected "
                   "'base_lcm' or 'two_tower_diffusion_lcm')")


def _base_lcm_loss(model: nn.Module, variables: dict[str, Any], batch: Batch, *, rng: jax.Array | None,
                   deterministic: bool) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  from lcm_jax.models.base_lcm import mse_loss  # pylint: disable=g-import-not-at-top
  rngs = {} if deterministic or rng is None else {"dropout": rng}
  preds, norm_in = model.apply(variables, batch["embeddings"], batch["segment_ids"], batch["positions"],
                               deterministic=deterministic, rngs=rngs)
  loss_sum, count = mse_loss(preds, norm_in, batch["target_mask"])
  # Baseline for reports: predict the previous concept (same units as the loss).
  mask = batch["target_mask"][:, 1:].astype(jnp.float32)
  prev = jnp.sum(jnp.square(norm_in[:, 1:] - norm_in[:, :-1]).sum(-1) * mask)
  return loss_sum, count, {"prev_concept_loss": prev}


def _two_tower_loss(model: nn.Module, variables: dict[str, Any], batch: Batch, *,
                    rng: jax.Array | None,
                    deterministic: bool) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Diffusion x0-prediction loss (see :func:`lcm_jax.models.two_tower.diffusion_loss`): t, eps and
  conditioning dropout are drawn from ``rng`` even when ``deterministic`` (no model dropout)."""
  from lcm_jax.models.two_tower import diffusion_loss  # pylint: disable=g-import-not-at-top
  return diffusion_loss(model, variables, batch, rng=rng, deterministic=deterministic)


LOSSES: dict[str, Callable[..., Any]] = {"base_lcm": _base_lcm_loss,
                                         "two_tower_diffusion_lcm": _two_tower_loss}


def loss_fn(cfg: ModelConfig):
  try:
    return LOSSES[cfg.family]
  except KeyError:
    raise errors.ConfigError(f"config.model.family: no loss for family {cfg.family!r}") from None
