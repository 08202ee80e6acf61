"""Base-LCM: MSE regression of the next concept in normalized SONAR space.

``frontend`` (frozen normalizer + ``pre_linear``) -> ``lcm`` (:class:`TransformerStack`, RoPE, no
position embedding) -> ``postnet.fc``. Variables::

  params:  frontend/pre_linear/{kernel,bias}, lcm/..., postnet/fc/{kernel,bias}
  buffers: frontend/sonar_normalizer/{center,scale}   (frozen, never in params)
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcm_jax import layers
from lcm_jax.models.config import ModelConfig

Array = jax.Array


class SonarNormalizer(nn.Module):
  """Frozen ``(x - center) / scale`` with ``center``/``scale`` in the ``buffers`` collection.

  Initialised to the identity (zeros / ones); the trainer loads the fitted values into
  ``buffers``. Always float32.
  """

  dim: int

  def setup(self) -> None:
    self.center = self.variable("buffers", "center", jnp.zeros, (self.dim,), jnp.float32)
    self.scale = self.variable("buffers", "scale", jnp.ones, (self.dim,), jnp.float32)

  def __call__(self, x: Array) -> Array:
    """Normalizes raw SONAR vectors (..., dim) -> float32."""
    return (x.astype(jnp.float32) - self.center.value) / self.scale.value

  def denormalize(self, x: Array) -> Array:
    """The inverse: normalized (..., dim) -> raw SONAR space, float32."""
    return x.astype(jnp.float32) * self.scale.value + self.center.value


class Frontend(nn.Module):
  """Normalizer then ``pre_linear`` (sonar -> model_dim, bias, torch kaiming-uniform init)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, embeddings: Array) -> tuple[Array, Array]:
    """Returns (hidden (B, L, model_dim), normalized inputs (B, L, sonar) float32)."""
    cfg = self.config
    normalized = SonarNormalizer(cfg.sonar_embed_dim, name="sonar_normalizer")(embeddings)
    hidden = layers.torch_default_dense(cfg, cfg.model_dim, cfg.sonar_embed_dim,
                                        ("sonar", "embed"), "pre_linear")(normalized)
    return hidden, normalized


class PostNet(nn.Module):
  """``fc``: model_dim -> sonar with bias, no activation (torch kaiming-uniform init)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    return layers.torch_default_dense(cfg, cfg.sonar_embed_dim, cfg.model_dim,
                                      ("embed", "sonar"), "fc")(x)


class BaseLCM(nn.Module):
  """The Base-LCM. See :meth:`__call__`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, embeddings: Array, segment_ids: Optional[Array], positions: Array, *,
               deterministic: bool = True, cache: Optional[layers.KVCache] = None,
               cache_index: Optional[Array] = None) -> Any:
    """Predicts the next concept at every position.

    Args:
      embeddings: (B, L, sonar_embed_dim) raw SONAR vectors (packed rows).
      segment_ids: (B, L) int, document id within the row, 0 = padding.
      positions: (B, L) int, concept index within its document (restarts at 0).
      deterministic: False enables dropout (needs the ``dropout`` rng).
      cache: optional KV cache of the ``lcm`` stack (:func:`lcm_jax.layers.init_cache`) for
        incremental decoding: ``embeddings`` are then the NEW concepts of each row (one document
        per row) written at slots ``cache_index`` (B,); ``segment_ids`` is unused. See
        :class:`lcm_jax.layers.TransformerStack`.
      cache_index: (B,) int, the first cache slot of each row's new concepts.

    Returns:
      ``(predictions, normalized_inputs)``, both (B, L, sonar) float32 in NORMALIZED space;
      ``predictions[:, i]`` is the prediction for concept ``i + 1``. With a cache:
      ``(predictions, normalized_inputs, updated_cache)``.
    """
    cfg = self.config
    hidden, normalized = Frontend(cfg, name="frontend")(embeddings)
    hidden = nn.with_logical_constraint(hidden, layers.BLE)
    out = layers.TransformerStack(cfg, name="lcm")(
        hidden, segment_ids, positions, deterministic=deterministic, cache=cache,
        cache_index=cache_index)
    hidden, cache = out if cache is not None else (out, None)
    predictions = PostNet(cfg, name="postnet")(hidden).astype(jnp.float32)
    if cache is not None:
      return predictions, normalized, cache
    return predictions, normalized


def target_mask_from_segments(segment_ids: Array, positions: Array) -> Array:
  """Pre-training targets: every non-padding concept that is not the first of its document."""
  return ((segment_ids > 0) & (positions > 0)).astype(jnp.float32)


def mse_loss(predictions: Array, normalized_inputs: Array,
             target_mask: Array) -> tuple[Array, Array]:
  """Summed next-concept squared error and the number of targets (the caller divides once).

  For each target j (``target_mask[:, j] == 1``, j >= 1; column 0 is ignored since nothing
  predicts it), the error is ``sum_d (predictions[:, j-1, d] - normalized_inputs[:, j, d])^2`` in
  float32. Returns ``(loss_sum, target_count)``, both float32 scalars.
  """
  pred = predictions[:, :-1].astype(jnp.float32)
  target = normalized_inputs[:, 1:].astype(jnp.float32)
  mask = target_mask[:, 1:].astype(jnp.float32)
  per_target = jnp.sum(jnp.square(pred - target), axis=-1)
  loss_sum = jnp.sum(jnp.where(mask > 0, per_target * mask, 0.0))
  return loss_sum, jnp.sum(mask)
