"""The FLOP-counting conventions shared by every family (throughput and MFU reporting).

Each family's file in :mod:`lcm_jax.families` counts its own model with these pieces
(``matmul_param_count``, ``train_flops_per_concept``, ``generation_flops``); the dispatching
functions are :func:`lcm_jax.families.param_count` and friends. Conventions:

* dense part: ``2`` FLOPs per multiply-add of every Linear weight that takes part in a
  per-concept matmul, ``x3`` for training (forward, input gradient, weight gradient); biases,
  norms, activations, RoPE, softmax and element-wise maths are not counted;
* attention: per layer and query, the score product ``q @ k^T`` and the value product ``p @ v``
  each cost ``2 * keys * (num_heads * head_dim)`` FLOPs forward, counting the FULL row of keys
  (no discount for causal/segment masks: that is what the dense kernel computes);
* padding positions count like real concepts; report real-concept throughput separately.
"""

from __future__ import annotations

from lcm_jax.models.config import ModelConfig


def body_layer_matmul_params(cfg: ModelConfig) -> int:
  """One shared pre-norm layer: q/k/v/output projections and the three SwiGLU matrices."""
  d, f = cfg.model_dim, cfg.swiglu_inner_dim
  inner = cfg.num_heads * cfg.head_dim
  return 3 * d * inner + inner * d + 3 * d * f


def attention_fwd_flops(cfg: ModelConfig, keys: int, num_layers: int) -> int:
  """Forward FLOPs of the score and value products of one query against ``keys`` keys in each
  of ``num_layers`` layers: ``2 * 2 * keys * num_heads * head_dim * num_layers``."""
  return 4 * keys * cfg.num_heads * cfg.head_dim * num_layers
