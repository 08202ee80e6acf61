"""Parameter and FLOP counts for throughput / MFU reporting (shared/PERFORMANCE.md)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.models.config import ModelConfig


def _abstract_params(cfg: ModelConfig):
  """The params tree as ShapeDtypeStructs (``jax.eval_shape``: nothing is allocated)."""
  if cfg.family != "base_lcm":
    raise NotImplementedError(f"param_count: family {cfg.family!r} (only 'base_lcm' here)")
  from lcm_jax.models.base_lcm import BaseLCM  # local import: no cycle at module load

  model = BaseLCM(cfg)
  emb = jax.ShapeDtypeStruct((1, 1, cfg.sonar_embed_dim), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  variables = jax.eval_shape(lambda e, s, p: model.init(jax.random.key(0), e, s, p), emb, ids, ids)
  return nn.meta.unbox(variables["params"])


def param_count(cfg: ModelConfig) -> int:
  """Trainable parameters (the ``params`` collection; the normalizer buffers are excluded)."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(_abstract_params(cfg))))


def matmul_param_count(cfg: ModelConfig) -> int:
  """Weights that take part in a per-concept matmul: every Linear weight matrix (pre-net, q/k/v/
  output, gate/inner/output of the FFN, post-net). Biases and norm weights are NOT counted."""
  d, s, f = cfg.model_dim, cfg.sonar_embed_dim, cfg.swiglu_inner_dim
  inner = cfg.num_heads * cfg.head_dim
  per_layer = 3 * d * inner + inner * d + 3 * d * f
  return s * d + cfg.num_layers * per_layer + d * s


def train_flops_per_concept(cfg: ModelConfig, seq_len: int) -> int:
  """Model FLOPs of one training step (forward + backward) per concept (sequence position).

  Convention:
    * dense part: ``6 * matmul_param_count(cfg)`` (2 FLOPs per multiply-add, x3 for forward,
      input-gradient and weight-gradient); biases, norms, activations, RoPE, softmax not counted;
    * attention: per layer and query, the score product ``q @ k^T`` and the value product
      ``p @ v`` each cost ``2 * seq_len * (num_heads * head_dim)`` FLOPs forward, counting the FULL
      row of ``seq_len`` keys (no discount for the causal/segment mask: that is what the dense
      kernel computes); x3 for forward + backward: ``3 * 4 * seq_len * d * num_layers``.
  Padding positions count like real concepts here; report real-concept throughput separately.
  """
  attn_fwd = 4 * seq_len * cfg.num_heads * cfg.head_dim * cfg.num_layers
  return 6 * matmul_param_count(cfg) + 3 * attn_fwd
