"""Two-Tower diffusion LCM: a causal contextualizer and an AdaLN denoiser.

``encoder_frontend.pre_linear`` + ``context_encoder`` (the shared causal block of section 3, RoPE)
turn the normalized concepts into a context; the ``denoiser`` predicts the clean concept x0 of
every position from its noisy version x_t, its diffusion timestep t and the context of the
PREVIOUS positions (cross-attention). Variables::

  params:  encoder_frontend/pre_linear/{kernel,bias}
           context_encoder/{layers | layers_N}/..., context_encoder/layer_norm/weight
           denoiser/embed_time/{fc1,fc2}, denoiser/initial_proj/fc, denoiser/final_proj/fc,
           denoiser/{layers | layers_N}/{self_attn_layer_norm, self_attn,
             cross_attention_layer_norm, cross_attention, ffn_layer_norm, ffn, modulator/fc},
           denoiser/layer_norm/weight
  buffers: sonar_normalizer/{center,scale}   (frozen; top level in this family's reference keys)

Denoiser layer (DiT AdaLN, pre-norm): for each sub-block ``b`` in (self-attention,
cross-attention, FFN), ``x = x + gate_b * drop(b(rms_b(x) * (1 + scale_b) + shift_b))`` where
``modulator.fc(silu(t_emb))`` (zero-initialised Linear(d, 9d)) is split into
(self-attn, cross-attn, ffn) x (shift, scale, gate) in that order. No positional encoding.

Cross-attention keys/values are the contextualizer outputs with a ZERO vector prepended (key 0,
whose k/v are just the projection biases). :func:`cross_attention_mask` says who sees what.

Two exact shortcuts, on unless ``TwoTowerLCM(config, direct=True)``:
  1. self-attention with the identity mask has softmax weights exactly 1, so its output is
     ``output_proj(v_proj(h))``; q/k projections are not computed (their parameters exist, are
     initialised as the reference's, and get zero gradient either way);
  2. the timestep embedding and every layer's modulator depend on the integer t only: with at
     least ``num_diffusion_train_steps`` positions in the call, ``embed_time`` and each
     ``modulator`` run once on the (T, d) table of all timesteps and the (T, 9d) result is
     gathered per position (gradients flow through the gather). Smaller calls (generation) run
     them per position, which is cheaper there and gives the same numbers.

Dtypes: parameters float32; matmuls in the compute dtype; norms, modulation, residual stream,
softmax and outputs in float32.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import attention
from lcm_jax import diffusion
from lcm_jax import layers
from lcm_jax.models.base_lcm import SonarNormalizer
from lcm_jax.models.config import ModelConfig

Array = jax.Array

MASK_AXES = ("activation_batch", None, None, None)
# Per-layer cross-attention keys/values as returned by :meth:`TwoTowerLCM.cross_kv`.
LBLHD = ("layers", "activation_batch", "activation_length", "activation_heads", None)


# ----------------------------------------------------------------------------------------------
# Masks and timestep features

def cross_attention_mask(segment_ids: Array, drop_cond: Optional[Array] = None, *,
                         q_segment_ids: Optional[Array] = None, q_index: Optional[Array] = None,
                         shift: Union[int, Array] = 0) -> Array:
  """The denoiser's cross-attention mask over ``[zero slot ; context]``.

  Args:
    segment_ids: (B, Lc) int, the CONTEXT rows' document ids (0 = padding).
    drop_cond: optional (B, Lq) bool; True = conditioning dropped (sees only the zero slot).
    q_segment_ids: (B, Lq) document id of each query (noisy position); default ``segment_ids``.
    q_index: (B, Lq) or (Lq,) int, the query's index in ITS OWN sequence; default ``arange(Lq)``.
    shift: int, (B,) per-row or (B, Lq) int, added to ``q_index`` (0 in pre-training; the
      source length when the denoiser runs over the target rows only).

  Returns:
    (B, 1, Lq, Lc + 1) bool, True = may attend. Key 0 (the zero slot) is visible to every query;
    key ``j + 1`` (context position j) is visible to query i iff it is not padding,
    ``segment_ids[j] == q_segment_ids[i]`` and ``j < q_index[i] + shift``, and i's conditioning
    is not dropped. Padding queries see only the zero slot.
  """
  segment_ids = jnp.asarray(segment_ids)
  q_seg = segment_ids if q_segment_ids is None else jnp.asarray(q_segment_ids)
  batch, q_len = q_seg.shape
  if q_index is None:
    q_index = jnp.arange(q_len, dtype=jnp.int32)
  shift = jnp.asarray(shift)
  if shift.ndim == 1:  # one shift per row
    shift = shift[:, None]
  limit = jnp.broadcast_to(jnp.asarray(q_index) + shift, (batch, q_len))
  kv_index = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
  visible = layers.segment_mask(q_seg, segment_ids) & (kv_index[None, None, :] < limit[..., None])
  if drop_cond is not None:
    visible = visible & ~jnp.asarray(drop_cond, bool)[..., None]
  zero_slot = jnp.ones((batch, q_len, 1), bool)
  return jnp.concatenate([zero_slot, visible], axis=-1)[:, None]


def timestep_features(timesteps: Array, dim: int, max_period: float = 10000.0) -> Array:
  """DiT sinusoidal features of integer timesteps: ``[cos(t f), sin(t f)]`` (cos FIRST).

  ``f_i = exp(-ln(max_period) * i / (dim / 2))`` for ``i < dim / 2``, in float32.
  ``timesteps`` (...) -> (..., dim) float32.
  """
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(timesteps).astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# ----------------------------------------------------------------------------------------------
# Small modules

class EncoderFrontend(nn.Module):
  """``pre_linear``: normalized sonar -> model_dim, bias, torch kaiming-uniform init."""

  config: ModelConfig

  @nn.compact
  def __call__(self, normalized: Array) -> Array:
    cfg = self.config
    return layers.torch_default_dense(cfg, cfg.model_dim, cfg.sonar_embed_dim, ("sonar", "embed"),
                                "pre_linear")(normalized)


class Projection(nn.Module):
  """``fc``: a biased Linear (the reference's ``initial_proj`` / ``final_proj``)."""

  config: ModelConfig
  features: int
  axes: tuple[str, str]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return layers.torch_default_dense(self.config, self.features, x.shape[-1], self.axes, "fc")(x)


class TimestepEmbedder(nn.Module):
  """``fc2(silu(fc1(features(t))))``: (...) int -> (..., model_dim). fc1 is Linear(256, d).

  Init as the reference's DiT encoder: weights N(0, 0.02), biases zero.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, timesteps: Array) -> Array:
    cfg = self.config
    kw = dict(kernel_init=nn.initializers.normal(0.02), bias_init=nn.initializers.zeros_init(),
              dtype=cfg.compute_dtype(), param_dtype=cfg.parameter_dtype())
    h = timestep_features(timesteps, cfg.timestep_embed_dim)
    h = layers.dense(cfg.model_dim, ("time", "embed"), name="fc1", **kw)(h)
    h = nn.silu(h.astype(jnp.float32))
    return layers.dense(cfg.model_dim, ("embed", "time"), name="fc2", **kw)(h).astype(jnp.float32)


class Modulator(nn.Module):
  """AdaLN modulator ``fc(silu(t_emb))``: Linear(d, 9d) with ZERO-initialised kernel and bias."""

  config: ModelConfig

  @nn.compact
  def __call__(self, t_emb: Array) -> Array:
    cfg = self.config
    zeros = nn.initializers.zeros_init()
    out = layers.dense(9 * cfg.model_dim, ("embed", "mlp"), kernel_init=zeros, bias_init=zeros,
                       dtype=cfg.compute_dtype(), param_dtype=cfg.parameter_dtype(),
                       name="fc")(nn.silu(t_emb.astype(jnp.float32)))
    return out.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Denoiser

class DenoiserLayer(nn.Module):
  """One AdaLN-modulated layer: self-attention (identity mask), cross-attention, SwiGLU FFN.

  Two methods, both scan-compatible (``(carry, xs) -> (carry, ys)``):
    * :meth:`kv` projects the (zero-prepended) context to this layer's cross-attention k/v;
    * :meth:`__call__` runs the layer given those k/v.
  ``deterministic`` is a field (so remat/scan need no static arguments).
  """

  config: ModelConfig
  direct: bool = False
  deterministic: bool = True

  def setup(self) -> None:
    cfg = self.config
    dtype, param_dtype = cfg.compute_dtype(), cfg.parameter_dtype()
    attn = dict(model_dim=cfg.model_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                dtype=dtype, param_dtype=param_dtype,
                implementation=attention.resolve_implementation(cfg.attention_impl))
    # The norms' output stays float32: the modulation is applied before the cast.
    norm = dict(eps=cfg.norm_eps, dtype=jnp.float32, param_dtype=param_dtype)
    self.self_attn_layer_norm = layers.RMSNorm(**norm)
    self.self_attn = layers.Attention(**attn)
    self.cross_attention_layer_norm = layers.RMSNorm(**norm)
    self.cross_attention = layers.Attention(**attn)
    self.ffn_layer_norm = layers.RMSNorm(**norm)
    self.ffn = layers.SwiGLUFFN(cfg.model_dim, cfg.swiglu_inner_dim, dtype, param_dtype)
    self.modulator = Modulator(cfg)
    self.dropout = layers.Dropout(cfg.dropout)

  def kv(self, carry: Any, context: Array) -> tuple[Any, tuple[Array, Array]]:
    """context (B, Lk, d) -> ``(carry, (k, v))``, each (B, Lk, H, D) in the compute dtype."""
    return carry, self.cross_attention.project_kv(context)

  def _modulate(self, norm: nn.Module, x: Array, shift: Array, scale: Array) -> Array:
    h = norm(x) * (1.0 + scale) + shift
    return h.astype(self.config.compute_dtype())

  def _residual(self, x: Array, gate: Array, h: Array) -> Array:
    h = self.dropout(h, deterministic=self.deterministic)
    return nn.with_logical_constraint(x + gate * h.astype(jnp.float32), layers.BLE)

  def __call__(self, x: Array, t_emb: Array, timesteps: Array, cross_mask: Array, cross_k: Array,
               cross_v: Array) -> tuple[Array, None]:
    """One layer.

    Args:
      x: (B, L, d) residual stream.
      t_emb: (T, d) timestep-embedding TABLE (then ``timesteps`` indexes its rows after the
        modulator), or (B, L, d) per-position embeddings.
      timesteps: (B, L) int32 in [0, T).
      cross_mask: (B, 1, L, Lk) bool.
      cross_k, cross_v: (B, Lk, H, D) this layer's cross-attention keys/values.

    Returns:
      ``(x, None)``.
    """
    cfg = self.config
    x = x.astype(jnp.float32)
    mod = self.modulator(t_emb)
    if t_emb.ndim == 2:  # shortcut 2: (T, 9d) table, gathered per position
      mod = nn.with_logical_constraint(mod, (None, None))
      mod = jnp.take(mod, timesteps, axis=0)
    (sa_shift, sa_scale, sa_gate, ca_shift, ca_scale, ca_gate,
     ff_shift, ff_scale, ff_gate) = jnp.split(mod, 9, axis=-1)

    # Self-attention with the identity mask.
    h = self._modulate(self.self_attn_layer_norm, x, sa_shift, sa_scale)
    if self.direct:
      eye = jnp.eye(h.shape[1], dtype=bool)[None, None]
      h = self.self_attn(h, mask=eye)
    else:  # shortcut 1: softmax over one key is exactly 1 -> output_proj(v_proj(h))
      if self.is_initializing():  # create q/k params (reference keys and init); unused
        self.self_attn.project_q(h)
        self.self_attn.project_kv(h)
      h = self.self_attn.output_proj(self.self_attn.v_proj(h))
    x = self._residual(x, sa_gate, h)

    # Cross-attention to [zero ; context].
    h = self._modulate(self.cross_attention_layer_norm, x, ca_shift, ca_scale)
    q = self.cross_attention.project_q(h)
    o = layers.dot_product_attention(q, cross_k, cross_v, cross_mask, dtype=cfg.compute_dtype(),
                                     implementation=self.cross_attention.implementation)
    h = self.cross_attention.output_proj(o.reshape(*o.shape[:-2], cfg.num_heads * cfg.head_dim))
    x = self._residual(x, ca_gate, h)

    # FFN.
    h = self._modulate(self.ffn_layer_norm, x, ff_shift, ff_scale)
    x = self._residual(x, ff_gate, self.ffn(h))
    return x, None


class Denoiser(nn.Module):
  """``embed_time``, ``initial_proj``, N :class:`DenoiserLayer` s, ``layer_norm``, ``final_proj``.

  One compact ``__call__`` with two modes (the same ``layers`` submodule serves both):
    * ``context=...``: returns every layer's cross-attention ``(k, v)``, each (N, B, Lk, H, D);
    * otherwise: denoises ``noisy`` given ``cross_k``/``cross_v``/``cross_mask``.
  Use it through :meth:`TwoTowerLCM.cross_kv` and :meth:`TwoTowerLCM.denoise`.
  """

  config: ModelConfig
  direct: bool = False

  @nn.compact
  def __call__(self, noisy: Optional[Array] = None, timesteps: Optional[Array] = None,
               cross_k: Optional[Array] = None, cross_v: Optional[Array] = None,
               cross_mask: Optional[Array] = None, *, context: Optional[Array] = None,
               deterministic: bool = True) -> Any:
    cfg = self.config
    n = cfg.denoiser_num_layers
    layer_cls = layers.remat_layer(DenoiserLayer, cfg.remat_policy, scanned=cfg.scan_layers)
    if cfg.scan_layers:
      common = dict(variable_axes={"params": 0}, length=n, check_constancy_invariants=True,
                    metadata_params={nn.PARTITION_NAME: "layers"})
      stack_cls = nn.scan(layer_cls, methods={
          "__call__": dict(common, split_rngs={"params": True, "dropout": True},
                           in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0)),
          # ``dropout`` is split here too although ``kv`` draws none: a scan over the same
          # module without it leaves the later ``__call__`` scan unable to draw dropout masks.
          "kv": dict(common, split_rngs={"params": True, "dropout": True},
                     in_axes=(nn.broadcast,)),
      })
      stack = stack_cls(cfg, direct=self.direct, deterministic=deterministic, name="layers")
    else:
      stack = [layer_cls(cfg, direct=self.direct, deterministic=deterministic, name=f"layers_{i}")
               for i in range(n)]

    if context is not None:  # cross-attention keys/values of every layer
      if cfg.scan_layers:
        _, (k, v) = stack.kv(None, context)
      else:
        kvs = [layer.kv(None, context)[1] for layer in stack]
        k, v = jnp.stack([a for a, _ in kvs]), jnp.stack([b for _, b in kvs])
      return nn.with_logical_constraint(k, LBLHD), nn.with_logical_constraint(v, LBLHD)

    if noisy is None or timesteps is None or cross_k is None or cross_v is None:
      raise ValueError("Denoiser: noisy, timesteps, cross_k and cross_v are required")
    timesteps = jnp.asarray(timesteps, jnp.int32)
    num_t = cfg.num_diffusion_train_steps
    embed_time = TimestepEmbedder(cfg, name="embed_time")
    if not self.direct and timesteps.size >= num_t:  # shortcut 2: table of all T timesteps
      t_emb = embed_time(jnp.arange(num_t, dtype=jnp.int32))
    else:
      t_emb = nn.with_logical_constraint(embed_time(timesteps), layers.BLE)
    if cross_mask is None:  # every query sees every key
      cross_mask = jnp.ones((1, 1, 1, cross_k.shape[2]), bool)
    elif cross_mask.shape[0] == noisy.shape[0]:
      cross_mask = nn.with_logical_constraint(cross_mask, MASK_AXES)

    x = Projection(cfg, cfg.model_dim, ("sonar", "embed"), name="initial_proj")(noisy)
    x = nn.with_logical_constraint(x.astype(jnp.float32), layers.BLE)
    if cfg.scan_layers:
      x, _ = stack(x, t_emb, timesteps, cross_mask, cross_k, cross_v)
    else:
      for i, layer in enumerate(stack):
        x, _ = layer(x, t_emb, timesteps, cross_mask, cross_k[i], cross_v[i])
    x = layers.RMSNorm(cfg.norm_eps, cfg.compute_dtype(), cfg.parameter_dtype(),
                       name="layer_norm")(x)
    out = Projection(cfg, cfg.sonar_embed_dim, ("embed", "sonar"), name="final_proj")(x)
    return out.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# The model

class TwoTowerLCM(nn.Module):
  """The Two-Tower diffusion LCM. ``direct=True`` disables the two exact shortcuts.

  Methods (call with ``model.apply(variables, ..., method=...)``):
    * :meth:`contextualize`: raw embeddings -> (context, normalized);
    * :meth:`cross_kv`: context -> every denoiser layer's cross-attention (k, v) (cacheable);
    * :meth:`denoise`: noisy normalized concepts + timesteps + cross k/v + mask -> x0_hat;
    * :meth:`__call__`: all of it on one batch; :meth:`normalize` / :meth:`denormalize`.
  """

  config: ModelConfig
  direct: bool = False

  def setup(self) -> None:
    cfg = self.config
    self.sonar_normalizer = SonarNormalizer(cfg.sonar_embed_dim)
    self.encoder_frontend = EncoderFrontend(cfg)
    self.context_encoder = layers.TransformerStack(cfg)
    self.denoiser = Denoiser(cfg, direct=self.direct)

  def normalize(self, embeddings: Array) -> Array:
    """Raw SONAR vectors -> normalized space (float32)."""
    return self.sonar_normalizer(embeddings)

  def denormalize(self, x: Array) -> Array:
    """Normalized space -> raw SONAR vectors (float32)."""
    return self.sonar_normalizer.denormalize(x)

  def contextualize(self, embeddings: Array, segment_ids: Optional[Array], positions: Array, *,
                    deterministic: bool = True, cache: Optional[layers.KVCache] = None,
                    cache_index: Optional[Array] = None) -> Any:
    """Raw embeddings (B, L, S) + packing ids/positions (B, L) -> ``(context, normalized)``.

    ``context`` (B, L, d) (compute dtype) is the contextualizer output after its final
    ``layer_norm``; ``context[:, j]`` summarises concepts ``<= j``. ``normalized`` (B, L, S) f32.

    With a KV ``cache`` of the ``context_encoder`` stack (:func:`lcm_jax.layers.init_cache`) and
    ``cache_index`` (B,): ``embeddings`` are the NEW concepts of each row (one document per row),
    ``segment_ids`` is unused, and the result is ``(context, normalized, updated_cache)`` (see
    :class:`lcm_jax.layers.TransformerStack`).
    """
    normalized = self.sonar_normalizer(embeddings)
    hidden = nn.with_logical_constraint(self.encoder_frontend(normalized), layers.BLE)
    if cache is not None:
      context, cache = self.context_encoder(hidden, segment_ids, positions,
                                            deterministic=deterministic, cache=cache,
                                            cache_index=cache_index)
      return context, normalized, cache
    context = self.context_encoder(hidden, segment_ids, positions, deterministic=deterministic)
    return context, normalized

  def cross_kv(self, context: Array, *, prepend_zero: bool = True) -> tuple[Array, Array]:
    """Every denoiser layer's cross-attention keys and values of ``context`` (B, Lc, d).

    With ``prepend_zero`` a zero vector is put in front of the context (slot 0), whose keys and
    values are the k/v biases. Returns ``(k, v)``, each (num_denoiser_layers, B, Lc(+1), H, D)
    in the compute dtype.
    """
    if prepend_zero:
      zero = jnp.zeros((context.shape[0], 1, context.shape[2]), context.dtype)
      context = jnp.concatenate([zero, context], axis=1)
    return self.denoiser(context=context)

  def denoise(self, noisy: Array, timesteps: Array, cross_k: Array, cross_v: Array,
              cross_mask: Optional[Array], *, deterministic: bool = True) -> Array:
    """Predicts x0 (normalized space, float32, (B, Lq, S)) from ``noisy`` (B, Lq, S) at integer
    ``timesteps`` (B, Lq) given :meth:`cross_kv` outputs and a (B, 1, Lq, Lk) bool mask
    (:func:`cross_attention_mask`; None = all keys visible)."""
    return self.denoiser(noisy, timesteps, cross_k, cross_v, cross_mask,
                         deterministic=deterministic)

  def __call__(self, embeddings: Array, segment_ids: Array, positions: Array, *,
               noisy: Optional[Array] = None, timesteps: Optional[Array] = None,
               drop_cond: Optional[Array] = None,
               deterministic: bool = True) -> tuple[Array, Array]:
    """Contextualizes the packed rows and denoises every position (pre-training form).

    Args:
      embeddings: (B, L, S) raw SONAR vectors; segment_ids / positions (B, L) as Base-LCM.
      noisy: (B, L, S) x_t in normalized space; None = the normalized inputs themselves, t = 0.
      timesteps: (B, L) int in [0, T); None = zeros.
      drop_cond: (B, L) bool, positions whose conditioning is dropped (classifier-free guidance).
      deterministic: False enables dropout (``dropout`` rng).

    Returns:
      ``(x0_hat, normalized)``, both (B, L, S) float32 in normalized space.
    """
    context, normalized = self.contextualize(embeddings, segment_ids, positions,
                                             deterministic=deterministic)
    if noisy is None:
      noisy = normalized
    if timesteps is None:
      timesteps = jnp.zeros(segment_ids.shape, jnp.int32)
    cross_k, cross_v = self.cross_kv(context)
    mask = cross_attention_mask(segment_ids, drop_cond)
    x0_hat = self.denoise(noisy, timesteps, cross_k, cross_v, mask, deterministic=deterministic)
    return x0_hat, normalized


# ----------------------------------------------------------------------------------------------
# Loss

# The diffusion families share one x0-prediction loss (lcm_jax.diffusion).
diffusion_loss_from_draws = diffusion.x0_loss_from_draws
diffusion_loss = diffusion.x0_loss
