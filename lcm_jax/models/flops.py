"""Parameter and FLOP counts for throughput / MFU reporting (shared/PERFORMANCE.md).

Both families: ``base_lcm`` and ``two_tower_diffusion_lcm`` (counted with the Two-Tower's exact
shortcuts on, i.e. the FLOPs the default model really executes).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.models.config import FAMILIES, ModelConfig


def _abstract_params(cfg: ModelConfig):
  """The params tree as ShapeDtypeStructs (``jax.eval_shape``: nothing is allocated)."""
  if cfg.family not in FAMILIES:
    raise NotImplementedError(f"param_count: unknown family {cfg.family!r}")
  from lcm_jax.models import build  # local import: no cycle at module load

  model = build(cfg)
  emb = jax.ShapeDtypeStruct((1, 1, cfg.sonar_embed_dim), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  variables = jax.eval_shape(lambda e, s, p: model.init(jax.random.key(0), e, s, p), emb, ids, ids)
  return nn.meta.unbox(variables["params"])


def param_count(cfg: ModelConfig) -> int:
  """Trainable parameters (the ``params`` collection; the normalizer buffers are excluded)."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(_abstract_params(cfg))))


def _body_layer_matmul_params(cfg: ModelConfig) -> int:
  """One shared pre-norm layer: q/k/v/output projections and the three SwiGLU matrices."""
  d, f = cfg.model_dim, cfg.swiglu_inner_dim
  inner = cfg.num_heads * cfg.head_dim
  return 3 * d * inner + inner * d + 3 * d * f


def matmul_param_count(cfg: ModelConfig) -> int:
  """Linear weights that take part in a per-concept matmul (biases and norm weights excluded).

  ``base_lcm``: pre-net, every layer's q/k/v/output and gate/inner/output, post-net.
  ``two_tower_diffusion_lcm`` (shortcuts on): ``pre_linear`` and the contextualizer layers as
  above; the denoiser's ``initial_proj``, ``final_proj`` and per layer the self-attention
  ``v_proj`` + ``output_proj`` (q/k skipped: identity mask), the cross-attention q/k/v/output
  (k/v run once per context position, i.e. once per concept; the extra zero slot is added in
  :func:`train_flops_per_concept`) and the FFN. The modulators and ``embed_time`` run on the
  (T, d) timestep table, not per concept, so they are NOT in this count.
  """
  d, s, f = cfg.model_dim, cfg.sonar_embed_dim, cfg.swiglu_inner_dim
  inner = cfg.num_heads * cfg.head_dim
  body = cfg.num_layers * _body_layer_matmul_params(cfg)
  if cfg.family == "base_lcm":
    return s * d + body + d * s
  if cfg.family == "two_tower_diffusion_lcm":
    denoiser_layer = 2 * d * inner + 4 * d * inner + 3 * d * f
    return s * d + body + s * d + cfg.denoiser_num_layers * denoiser_layer + d * s
  raise NotImplementedError(f"matmul_param_count: unknown family {cfg.family!r}")


def train_flops_per_concept(cfg: ModelConfig, seq_len: int, rows_per_step: int = 0) -> int:
  """Model FLOPs of one training step (forward + backward) per concept (sequence position).

  Convention (both families):
    * dense part: ``6 * matmul_param_count(cfg)`` (2 FLOPs per multiply-add, x3 for forward,
      input-gradient and weight-gradient); biases, norms, activations, RoPE, softmax, the AdaLN
      element-wise maths not counted;
    * attention: per layer and query, the score product ``q @ k^T`` and the value product
      ``p @ v`` each cost ``2 * keys * (num_heads * head_dim)`` FLOPs forward, counting the FULL
      row of keys (no discount for causal/segment masks: that is what the dense kernel
      computes); x3 for forward + backward.
  ``base_lcm``: ``keys = seq_len`` in every layer.
  ``two_tower_diffusion_lcm``, as executed with the exact shortcuts on:
    * contextualizer: as Base-LCM's body (``keys = seq_len``), plus ``pre_linear``;
    * denoiser self-attention: ``output_proj(v_proj(h))`` only, no q/k projections and no
      score/value products (identity mask);
    * denoiser cross-attention: queries of ``seq_len`` positions against ``seq_len + 1`` keys
      (the zero slot prepended to the context), so ``keys = seq_len + 1`` in the products and the
      k/v projections run on ``seq_len + 1`` rows per ``seq_len`` concepts;
    * the timestep table (``embed_time`` on T timesteps and every layer's Linear(d, 9d) on the
      (T, d) table) runs once per step, independent of the number of concepts: it is counted
      only when ``rows_per_step`` (rows of ``seq_len`` concepts per step and device) is given,
      amortised over ``rows_per_step * seq_len`` concepts. It is negligible when
      ``rows_per_step * seq_len >> T`` (the pre-training recipe: 229k concepts vs T = 100).
  Padding positions count like real concepts here; report real-concept throughput separately.
  The result is rounded to an integer.
  """
  inner = cfg.num_heads * cfg.head_dim
  if cfg.family == "base_lcm":
    attn_fwd = 4 * seq_len * inner * cfg.num_layers
    return 6 * matmul_param_count(cfg) + 3 * attn_fwd
  if cfg.family != "two_tower_diffusion_lcm":
    raise NotImplementedError(f"train_flops_per_concept: unknown family {cfg.family!r}")
  d, n_den, num_t = cfg.model_dim, cfg.denoiser_num_layers, cfg.num_diffusion_train_steps
  # Per row of seq_len concepts, so that the zero slot's k/v rows stay exact integers.
  per_row = seq_len * 6 * matmul_param_count(cfg)
  per_row += 6 * n_den * 2 * d * inner                                      # zero slot k/v
  per_row += seq_len * 3 * 4 * inner * (cfg.num_layers * seq_len + n_den * (seq_len + 1))
  flops = per_row / seq_len
  if rows_per_step > 0:
    table = 6 * num_t * (cfg.timestep_embed_dim * d + d * d + n_den * d * 9 * d)
    flops += table / (rows_per_step * seq_len)
  return int(round(flops))
