"""Plain-PyTorch (no fairseq2, no JAX) Base-LCM, Two-Tower and One-Tower LCMs for inference,
loading lcm_jax exports.

``load_from_card("DIR/model_card.yaml")`` reads a card written by :mod:`lcm_interop.export` (or a
reference card lcm_jax can represent), builds the family's module (:class:`BaseLCM`,
:class:`TwoTowerLCM` or :class:`OneTowerLCM`, named by its
:class:`~lcm_interop.reference.ReferenceFamily` entry) and loads ``model.pt`` with strict key
matching: the modules are named so that ``state_dict()`` has exactly the reference checkpoint
format's keys (lcm_jax's own keys for the One-Tower). Importing this module imports neither
JAX nor anything of lcm_jax that does (``model.config`` is a
:class:`~lcm_jax.models.config.ModelConfig`); the JAX path never imports it.

The maths is that of the JAX modules (:mod:`lcm_jax.layers`, :mod:`lcm_jax.models.base_lcm`,
:mod:`lcm_jax.models.two_tower`, :mod:`lcm_jax.models.one_tower`), not of the reference's code:
  * RMSNorm ``x * rsqrt(mean(x^2) + eps) * weight`` in float32;
  * interleaved RoPE: adjacent pairs ``(2i, 2i+1)`` of each head rotated by
    ``position * theta^(-2i/head_dim)`` (float32), positions from 0 at each document start;
  * attention: q/k/v/output projections with bias, q scaled by ``1/sqrt(head_dim)``, logits and
    softmax in float32, masked logits set to the float32 minimum (fully masked rows are uniform,
    never NaN);
  * SwiGLU ``output_proj(silu(gate_proj(h)) * inner_proj(h))`` with the inner size of
    :attr:`ModelConfig.swiglu_inner_dim`;
  * pre-norm layers, a float32 residual stream, a final RMSNorm;
  * Two-Tower denoiser: ``embed_time`` (``[cos, sin]`` features of integer t, cos first, then
    ``fc2(silu(fc1(.)))``), ``modulator.fc(silu(t_emb))`` split into (self-attn, cross-attn, ffn)
    x (shift, scale, gate), each sub-block ``x += gate * block(rms(x) * (1 + scale) + shift)``;
    self-attention with the identity mask computed exactly as ``output_proj(v_proj(h))`` (its
    softmax weight is exactly 1; q/k weights are loaded but unused); cross-attention over
    ``[zero slot ; context]`` (the zero slot's keys/values are the k/v biases) under the mask of
    :func:`cross_attention_mask`;
  * One-Tower: the interleaved ``[clean_0, noisy_0, clean_1, ...]`` sequence under
    :func:`one_tower_mask`, frontend ``pre_linear([x ; embed_time(t)]) + pos_encoder.weight[p]``
    (clean copies at t = 0, both copies at their document position, no RoPE), the Base-LCM layer
    stack, ``postnet`` on the noisy copies; incremental inference over a cache of the CLEAN
    concepts' keys/values (:meth:`OneTowerLCM.step`: each new query sees the cache slots its mask
    allows plus itself, :func:`attend_cache_and_self`).
No dropout: these are inference modules (``eval()`` is implied).

Dtypes: matmuls run in the dtype of the weights (``load_from_card(..., dtype=...)``: float32 by
default; bfloat16/float16 work too), norms, RoPE, softmax, modulation and the residual stream in
float32; outputs (predictions, x0, context) are float32.

KV cache (incremental decoding, :meth:`BaseLCM.forward_cached`,
:meth:`TwoTowerLCM.contextualize_cached`): ``{"k", "v"}`` tensors of shape
(num_layers, B, T, H, D), keys stored after RoPE, UPDATED IN PLACE. Row ``b`` writes its new block
at slots ``cache_index[b] + i`` (writes past T-1 are dropped); queries see the slots
``<= cache_index[b] + i``. Same contract as :mod:`lcm_jax.layers`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lcm_interop import reference
from lcm_jax.models.config import ModelConfig


KVCache = dict[str, Tensor]
RopeTables = tuple[Tensor, Tensor]
_MASK_VALUE = torch.finfo(torch.float32).min


# ----------------------------------------------------------------------------------------------
# Functional pieces

def linear(layer: nn.Linear, x: Tensor) -> Tensor:
  """``layer(x)`` in the weight dtype (the compute dtype)."""
  return F.linear(x.to(layer.weight.dtype), layer.weight, layer.bias)


def rope_frequencies(head_dim: int, theta: float = 10000.0,
                     device: Optional[torch.device] = None) -> Tensor:
  """``theta^(-2i/head_dim)`` for i < head_dim/2, float32."""
  exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
  return 1.0 / (torch.tensor(theta, dtype=torch.float32, device=device) ** exponent)


def rope_tables(positions: Tensor, head_dim: int, theta: float = 10000.0) -> RopeTables:
  """cos/sin of (B, L) positions -> two (B, L, 1, head_dim/2) float32 tensors."""
  angles = positions.to(torch.float32)[..., None] * rope_frequencies(head_dim, theta,
                                                                     positions.device)
  angles = angles[..., None, :]
  return torch.cos(angles), torch.sin(angles)


def apply_rope(x: Tensor, rope: RopeTables) -> Tensor:
  """Rotates adjacent pairs ``(x[2i], x[2i+1])`` of (B, L, H, D) ``x`` (interleaved layout)."""
  cos, sin = rope
  pairs = x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  x0, x1 = pairs[..., 0], pairs[..., 1]
  out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
  return out.reshape(x.shape).to(x.dtype)


def causal_mask(q_index: Tensor, kv_index: Tensor) -> Tensor:
  """``q_index[..., i] >= kv_index[..., j]`` -> (..., Lq, Lk) bool."""
  return q_index[..., :, None] >= kv_index[..., None, :]


def segment_mask(q_segment_ids: Tensor, kv_segment_ids: Tensor) -> Tensor:
  """Same segment and not padding (id 0) -> (B, Lq, Lk) bool."""
  q = q_segment_ids[..., :, None]
  return (q == kv_segment_ids[..., None, :]) & (q > 0)


def causal_segment_mask(segment_ids: Tensor) -> Tensor:
  """Packed-row self-attention mask (B, 1, L, L): causal, same segment, not padding."""
  index = torch.arange(segment_ids.shape[-1], device=segment_ids.device)
  return (segment_mask(segment_ids, segment_ids) & causal_mask(index, index)[None])[:, None]


def cache_mask(cache_index: Tensor, q_len: int, cache_len: int) -> Tensor:
  """(B, 1, q_len, cache_len): query i of row b sees slots ``<= cache_index[b] + i``."""
  device = cache_index.device
  q_slots = cache_index.long()[:, None] + torch.arange(q_len, device=device)[None]
  return causal_mask(q_slots, torch.arange(cache_len, device=device)[None])[:, None]


def update_cache(cache: Tensor, new: Tensor, index: Tensor) -> None:
  """Writes ``new`` (B, Lq, H, D) into ``cache`` (B, T, H, D) at slots ``index[b] + i``, IN
  PLACE; writes past slot T-1 are dropped."""
  batch, q_len = new.shape[:2]
  rows = torch.arange(batch, device=new.device)[:, None].expand(batch, q_len)
  slots = index.long()[:, None] + torch.arange(q_len, device=new.device)[None]
  ok = slots < cache.shape[1]
  cache[rows[ok], slots[ok]] = new[ok].to(cache.dtype)


def dot_product_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
  """q (B, Lq, H, D), k/v (B, Lk, H, D), bool mask broadcastable to (B, H, Lq, Lk) or None.
  Scale 1/sqrt(D), logits and softmax in float32; einsums in q's dtype."""
  dtype = q.dtype
  q = q * (q.shape[-1] ** -0.5)
  logits = torch.einsum("bqhd,bkhd->bhqk", q, k.to(dtype)).to(torch.float32)
  if mask is not None:
    logits = torch.where(mask, logits, torch.full((), _MASK_VALUE, device=logits.device))
  probs = torch.softmax(logits, dim=-1).to(dtype)
  return torch.einsum("bhqk,bkhd->bqhd", probs, v.to(dtype))


def timestep_features(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
  """``[cos(t f), sin(t f)]`` (cos first), ``f_i = exp(-ln(max_period) i / (dim/2))``, float32."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) *
                    torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
  args = timesteps.to(torch.float32)[..., None] * freqs
  return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def cross_attention_mask(segment_ids: Tensor, drop_cond: Optional[Tensor] = None, *,
                         q_segment_ids: Optional[Tensor] = None,
                         q_index: Optional[Tensor] = None,
                         shift: Union[int, Tensor] = 0) -> Tensor:
  """The denoiser's mask over ``[zero slot ; context]``, (B, 1, Lq, Lc + 1) bool.

  Key 0 (the zero slot) is visible to every query; context position j to query i iff it is not
  padding, in the query's document, ``j < q_index[i] + shift`` and i's conditioning is not
  dropped (``drop_cond``). Same arguments as :func:`lcm_jax.models.two_tower.cross_attention_mask`.
  """
  q_seg = segment_ids if q_segment_ids is None else q_segment_ids
  batch, q_len = q_seg.shape
  device = segment_ids.device
  if q_index is None:
    q_index = torch.arange(q_len, device=device)
  shift = torch.as_tensor(shift, device=device)
  if shift.ndim == 1:
    shift = shift[:, None]
  limit = torch.broadcast_to(q_index + shift, (batch, q_len))
  kv_index = torch.arange(segment_ids.shape[-1], device=device)
  visible = segment_mask(q_seg, segment_ids) & (kv_index[None, None, :] < limit[..., None])
  if drop_cond is not None:
    visible = visible & ~drop_cond.to(torch.bool)[..., None]
  zero_slot = torch.ones((batch, q_len, 1), dtype=torch.bool, device=device)
  return torch.cat([zero_slot, visible], dim=-1)[:, None]


# ----------------------------------------------------------------------------------------------
# Modules (names = the reference's state-dict keys)

class RMSNorm(nn.Module):
  """``x * rsqrt(mean(x^2) + eps) * weight`` in float32; returns float32."""

  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x: Tensor) -> Tensor:
    x = x.to(torch.float32)
    x = x * torch.rsqrt(torch.mean(torch.square(x), dim=-1, keepdim=True) + self.eps)
    return x * self.weight.to(torch.float32)


class Attention(nn.Module):
  """Multi-head attention with biased ``q_proj``/``k_proj``/``v_proj``/``output_proj``."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
    inner = cfg.num_heads * cfg.head_dim
    self.q_proj = nn.Linear(cfg.model_dim, inner)
    self.k_proj = nn.Linear(cfg.model_dim, inner)
    self.v_proj = nn.Linear(cfg.model_dim, inner)
    self.output_proj = nn.Linear(inner, cfg.model_dim)

  def _split(self, x: Tensor) -> Tensor:
    return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

  def project_q(self, x: Tensor) -> Tensor:
    """(B, L, d) -> queries (B, L, H, D), before RoPE."""
    return self._split(linear(self.q_proj, x))

  def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
    """(B, L, d) -> keys and values (B, L, H, D), before RoPE."""
    return self._split(linear(self.k_proj, x)), self._split(linear(self.v_proj, x))

  def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    out = dot_product_attention(q, k, v, mask)
    return linear(self.output_proj, out.reshape(*out.shape[:-2], self.num_heads * self.head_dim))

  def forward(self, x: Tensor, mask: Optional[Tensor], rope: Optional[RopeTables] = None,
              cache: Optional[KVCache] = None, cache_index: Optional[Tensor] = None) -> Tensor:
    """Self-attention of (B, L, d) ``x``; with ``cache`` (this layer's ``{"k", "v"}``, each
    (B, T, H, D)) the new keys/values are written at ``cache_index`` first (in place) and the
    queries attend to all T slots under ``mask``."""
    q = self.project_q(x)
    k, v = self.project_kv(x)
    if rope is not None:
      q, k = apply_rope(q, rope), apply_rope(k, rope)
    if cache is not None:
      update_cache(cache["k"], k, cache_index)
      update_cache(cache["v"], v, cache_index)
      k, v = cache["k"], cache["v"]
    return self.attend(q, k, v, mask)


class SwiGLUFFN(nn.Module):
  """``output_proj(silu(gate_proj(h)) * inner_proj(h))``, all with bias."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    d, f = cfg.model_dim, cfg.swiglu_inner_dim
    self.gate_proj = nn.Linear(d, f)
    self.inner_proj = nn.Linear(d, f)
    self.output_proj = nn.Linear(f, d)

  def forward(self, x: Tensor) -> Tensor:
    return linear(self.output_proj, F.silu(linear(self.gate_proj, x)) * linear(self.inner_proj, x))


class DecoderLayer(nn.Module):
  """Pre-norm: ``x += self_attn(rms(x))``; ``x += ffn(rms(x))`` (float32 residual)."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    self.self_attn_layer_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
    self.self_attn = Attention(cfg)
    self.ffn_layer_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
    self.ffn = SwiGLUFFN(cfg)

  def forward(self, x: Tensor, mask: Optional[Tensor], rope: RopeTables,
              cache: Optional[KVCache] = None, cache_index: Optional[Tensor] = None) -> Tensor:
    x = x.to(torch.float32)
    x = x + self.self_attn(self.self_attn_layer_norm(x), mask, rope, cache,
                           cache_index).to(torch.float32)
    return x + self.ffn(self.ffn_layer_norm(x)).to(torch.float32)


class TransformerStack(nn.Module):
  """``layers.N`` (:class:`DecoderLayer`) and the final ``layer_norm``."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    self.config = cfg
    self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
    self.layer_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)

  def forward(self, x: Tensor, segment_ids: Tensor, positions: Tensor,
              mask: Optional[Tensor] = None) -> Tensor:
    """x (B, L, d), segment_ids/positions (B, L) (0 = padding; positions restart at 0 per
    document). Returns (B, L, d) float32."""
    if mask is None:
      mask = causal_segment_mask(segment_ids)
    rope = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
    x = x.to(torch.float32)
    for layer in self.layers:
      x = layer(x, mask, rope)
    return self.layer_norm(x)

  def forward_cached(self, x: Tensor, positions: Tensor, cache: KVCache,
                     cache_index: Tensor) -> Tensor:
    """The new tokens x (B, L, d) of one document per row, written at slots
    ``cache_index[b] + i`` of ``cache`` (updated in place), RoPE at ``positions``."""
    mask = cache_mask(cache_index, x.shape[1], cache["k"].shape[2])
    rope = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
    x = x.to(torch.float32)
    for i, layer in enumerate(self.layers):
      x = layer(x, mask, rope, {"k": cache["k"][i], "v": cache["v"][i]}, cache_index)
    return self.layer_norm(x)

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    """An empty cache of ``max_len`` slots (weight dtype and device)."""
    w = self.layer_norm.weight
    dtype = self.layers[0].self_attn.k_proj.weight.dtype if len(self.layers) else w.dtype
    shape = (len(self.layers), batch, max_len, self.config.num_heads, self.config.head_dim)
    return {"k": torch.zeros(shape, dtype=dtype, device=w.device),
            "v": torch.zeros(shape, dtype=dtype, device=w.device)}


class SonarNormalizer(nn.Module):
  """Frozen ``(x - center) / scale`` (buffers ``center``, ``scale``), float32 maths."""

  def __init__(self, dim: int):
    super().__init__()
    self.register_buffer("center", torch.zeros(dim))
    self.register_buffer("scale", torch.ones(dim))

  def normalize(self, x: Tensor) -> Tensor:
    return (x.to(torch.float32) - self.center.to(torch.float32)) / self.scale.to(torch.float32)

  def denormalize(self, x: Tensor) -> Tensor:
    return x.to(torch.float32) * self.scale.to(torch.float32) + self.center.to(torch.float32)


class Projection(nn.Module):
  """``fc``: one biased Linear (``postnet``, ``initial_proj``, ``final_proj``)."""

  def __init__(self, in_dim: int, out_dim: int):
    super().__init__()
    self.fc = nn.Linear(in_dim, out_dim)

  def forward(self, x: Tensor) -> Tensor:
    return linear(self.fc, x)


class Frontend(nn.Module):
  """Base-LCM ``frontend``: ``sonar_normalizer`` buffers and ``pre_linear``."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    self.sonar_normalizer = SonarNormalizer(cfg.sonar_embed_dim)
    self.pre_linear = nn.Linear(cfg.sonar_embed_dim, cfg.model_dim)


class EncoderFrontend(nn.Module):
  """Two-Tower ``encoder_frontend``: ``pre_linear``."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    self.pre_linear = nn.Linear(cfg.sonar_embed_dim, cfg.model_dim)


def _check_family(cfg: ModelConfig, module: nn.Module) -> None:
  """``cfg.family``'s entry must name this module class."""
  expected = reference.of(cfg).torch_model
  if expected != type(module).__name__:
    raise ValueError(f"config.family {cfg.family!r}: its torch module is {expected}, not "
                     f"{type(module).__name__}")


class BaseLCM(nn.Module):
  """Base-LCM: ``frontend`` -> ``lcm`` (:class:`TransformerStack`) -> ``postnet``."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    _check_family(cfg, self)
    self.config = cfg
    self.frontend = Frontend(cfg)
    self.lcm = TransformerStack(cfg)
    self.postnet = Projection(cfg.model_dim, cfg.sonar_embed_dim)

  def normalize(self, x: Tensor) -> Tensor:
    return self.frontend.sonar_normalizer.normalize(x)

  def denormalize(self, x: Tensor) -> Tensor:
    return self.frontend.sonar_normalizer.denormalize(x)

  def forward(self, embeddings: Tensor, segment_ids: Optional[Tensor] = None,
              positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Raw SONAR (B, L, S) (+ packing ids/positions, default one document per row) ->
    ``(predictions, normalized_inputs)``, both (B, L, S) float32 NORMALIZED;
    ``predictions[:, i]`` predicts concept i + 1."""
    segment_ids, positions = _default_packing(embeddings, segment_ids, positions)
    normalized = self.normalize(embeddings)
    hidden = self.lcm(linear(self.frontend.pre_linear, normalized), segment_ids, positions)
    return self.postnet(hidden).to(torch.float32), normalized

  def forward_cached(self, embeddings: Tensor, positions: Tensor, cache: KVCache,
                     cache_index: Tensor) -> tuple[Tensor, Tensor]:
    """Incremental form: the NEW concepts (B, L, S) of each row, written at ``cache_index`` (B,)
    (``cache`` from :meth:`init_cache`, updated in place). Same outputs as :meth:`forward`."""
    normalized = self.normalize(embeddings)
    hidden = self.lcm.forward_cached(linear(self.frontend.pre_linear, normalized), positions,
                                     cache, cache_index)
    return self.postnet(hidden).to(torch.float32), normalized

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    return self.lcm.init_cache(batch, max_len)


class TimestepEmbedder(nn.Module):
  """``embed_time``: ``fc2(silu(fc1(features(t))))``, fc1 Linear(timestep_embed_dim, d)."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    self.features = cfg.timestep_embed_dim
    self.fc1 = nn.Linear(cfg.timestep_embed_dim, cfg.model_dim)
    self.fc2 = nn.Linear(cfg.model_dim, cfg.model_dim)

  def forward(self, timesteps: Tensor) -> Tensor:
    h = linear(self.fc1, timestep_features(timesteps, self.features))
    return linear(self.fc2, F.silu(h.to(torch.float32))).to(torch.float32)


class Modulator(nn.Module):
  """AdaLN ``modulator.fc(silu(t_emb))``: Linear(d, 9d)."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    self.fc = nn.Linear(cfg.model_dim, 9 * cfg.model_dim)

  def forward(self, t_emb: Tensor) -> Tensor:
    return linear(self.fc, F.silu(t_emb.to(torch.float32))).to(torch.float32)


class DenoiserLayer(nn.Module):
  """AdaLN-modulated self-attention (identity mask), cross-attention and SwiGLU FFN."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    self.self_attn_layer_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
    self.self_attn = Attention(cfg)
    self.cross_attention_layer_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
    self.cross_attention = Attention(cfg)
    self.ffn_layer_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
    self.ffn = SwiGLUFFN(cfg)
    self.modulator = Modulator(cfg)

  def forward(self, x: Tensor, t_emb: Tensor, cross_mask: Optional[Tensor], cross_k: Tensor,
              cross_v: Tensor) -> Tensor:
    """x (B, L, d); t_emb (B, L, d); cross_mask (B or 1, 1, L, Lk); cross_k/v (B, Lk, H, D)."""
    x = x.to(torch.float32)
    (sa_shift, sa_scale, sa_gate, ca_shift, ca_scale, ca_gate,
     ff_shift, ff_scale, ff_gate) = torch.chunk(self.modulator(t_emb), 9, dim=-1)
    attn = self.self_attn
    h = self.self_attn_layer_norm(x) * (1.0 + sa_scale) + sa_shift
    x = x + sa_gate * linear(attn.output_proj, linear(attn.v_proj, h)).to(torch.float32)
    h = self.cross_attention_layer_norm(x) * (1.0 + ca_scale) + ca_shift
    cross = self.cross_attention
    q = cross.project_q(h)
    x = x + ca_gate * cross.attend(q, cross_k, cross_v, cross_mask).to(torch.float32)
    h = self.ffn_layer_norm(x) * (1.0 + ff_scale) + ff_shift
    return x + ff_gate * self.ffn(h).to(torch.float32)


class Denoiser(nn.Module):
  """``embed_time``, ``initial_proj``, ``layers.N``, ``layer_norm``, ``final_proj``."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    self.config = cfg
    self.embed_time = TimestepEmbedder(cfg)
    self.initial_proj = Projection(cfg.sonar_embed_dim, cfg.model_dim)
    self.layers = nn.ModuleList(DenoiserLayer(cfg) for _ in range(cfg.denoiser_num_layers))
    self.layer_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
    self.final_proj = Projection(cfg.model_dim, cfg.sonar_embed_dim)

  def cross_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
    """(B, Lk, d) -> every layer's cross-attention (k, v), each (N, B, Lk, H, D)."""
    kvs = [layer.cross_attention.project_kv(context) for layer in self.layers]
    return torch.stack([k for k, _ in kvs]), torch.stack([v for _, v in kvs])

  def forward(self, noisy: Tensor, timesteps: Tensor, cross_k: Tensor, cross_v: Tensor,
              cross_mask: Optional[Tensor] = None) -> Tensor:
    """noisy (B, L, S) normalized, integer timesteps (B, L) -> x0_hat (B, L, S) float32."""
    t_emb = self.embed_time(timesteps)
    x = self.initial_proj(noisy).to(torch.float32)
    for i, layer in enumerate(self.layers):
      x = layer(x, t_emb, cross_mask, cross_k[i], cross_v[i])
    return self.final_proj(self.layer_norm(x)).to(torch.float32)


class TwoTowerLCM(nn.Module):
  """Two-Tower diffusion LCM: ``sonar_normalizer``, ``encoder_frontend`` + ``context_encoder``
  (the contextualizer) and the ``denoiser``."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    _check_family(cfg, self)
    self.config = cfg
    self.sonar_normalizer = SonarNormalizer(cfg.sonar_embed_dim)
    self.encoder_frontend = EncoderFrontend(cfg)
    self.context_encoder = TransformerStack(cfg)
    self.denoiser = Denoiser(cfg)

  def normalize(self, x: Tensor) -> Tensor:
    return self.sonar_normalizer.normalize(x)

  def denormalize(self, x: Tensor) -> Tensor:
    return self.sonar_normalizer.denormalize(x)

  def contextualize(self, embeddings: Tensor, segment_ids: Optional[Tensor] = None,
                    positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Raw (B, L, S) -> ``(context (B, L, d), normalized (B, L, S))``, float32."""
    segment_ids, positions = _default_packing(embeddings, segment_ids, positions)
    normalized = self.normalize(embeddings)
    hidden = linear(self.encoder_frontend.pre_linear, normalized)
    return self.context_encoder(hidden, segment_ids, positions), normalized

  def contextualize_cached(self, embeddings: Tensor, positions: Tensor, cache: KVCache,
                           cache_index: Tensor) -> tuple[Tensor, Tensor]:
    """Incremental :meth:`contextualize` (see :meth:`BaseLCM.forward_cached`)."""
    normalized = self.normalize(embeddings)
    hidden = linear(self.encoder_frontend.pre_linear, normalized)
    return self.context_encoder.forward_cached(hidden, positions, cache, cache_index), normalized

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    return self.context_encoder.init_cache(batch, max_len)

  def cross_kv(self, context: Tensor, prepend_zero: bool = True) -> tuple[Tensor, Tensor]:
    """Cross-attention (k, v) of every denoiser layer, each (N, B, Lc(+1), H, D); with
    ``prepend_zero`` a zero vector is put in front of the context (slot 0)."""
    if prepend_zero:
      zero = torch.zeros_like(context[:, :1])
      context = torch.cat([zero, context], dim=1)
    return self.denoiser.cross_kv(context)

  def denoise(self, noisy: Tensor, timesteps: Tensor, cross_k: Tensor, cross_v: Tensor,
              cross_mask: Optional[Tensor]) -> Tensor:
    """x0_hat (B, Lq, S) float32 from noisy (B, Lq, S) at integer timesteps (B, Lq)."""
    return self.denoiser(noisy, timesteps, cross_k, cross_v, cross_mask)

  def forward(self, embeddings: Tensor, segment_ids: Optional[Tensor] = None,
              positions: Optional[Tensor] = None, *, noisy: Optional[Tensor] = None,
              timesteps: Optional[Tensor] = None,
              drop_cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The pre-training form: contextualize, then denoise every position (default: the
    normalized inputs at t = 0). Returns ``(x0_hat, normalized)``, (B, L, S) float32."""
    segment_ids, positions = _default_packing(embeddings, segment_ids, positions)
    context, normalized = self.contextualize(embeddings, segment_ids, positions)
    if noisy is None:
      noisy = normalized
    if timesteps is None:
      timesteps = torch.zeros(segment_ids.shape, dtype=torch.long, device=segment_ids.device)
    k, v = self.cross_kv(context)
    mask = cross_attention_mask(segment_ids, drop_cond)
    return self.denoise(noisy, timesteps, k, v, mask), normalized


# ----------------------------------------------------------------------------------------------
# One-Tower

def one_tower_mask(segment_ids: Tensor, positions: Tensor,
                   drop_cond: Optional[Tensor] = None) -> Tensor:
  """The interleaved training sequence's mask, (B, 1, 2L, 2L) bool (index ``2i`` = clean concept
  i, ``2i + 1`` its noisy copy): :func:`lcm_jax.models.one_tower.one_tower_mask`. Clean -> clean
  causal within the document; noisy i -> clean j < i of its document unless ``drop_cond[i]``;
  noisy i -> itself only; clean never sees noisy; every index sees itself."""
  batch, length = segment_ids.shape
  device = segment_ids.device
  same = segment_mask(segment_ids, segment_ids)
  upto = same & (positions[:, None, :] <= positions[:, :, None])
  before = same & (positions[:, None, :] < positions[:, :, None])
  if drop_cond is not None:
    before = before & ~drop_cond.to(torch.bool)[:, :, None]
  eye = torch.eye(length, dtype=torch.bool, device=device).expand(batch, length, length)
  never = torch.zeros_like(upto)
  clean_q = torch.stack([upto, never], dim=-1)
  noisy_q = torch.stack([before, eye], dim=-1)
  mask = torch.stack([clean_q, noisy_q], dim=2).reshape(batch, 2 * length, 2 * length)
  mask = mask | torch.eye(2 * length, dtype=torch.bool, device=device)[None]
  return mask[:, None]


def interleave(clean: Tensor, noisy: Tensor) -> Tensor:
  """(B, L, ...) and (B, L, ...) -> (B, 2L, ...) as ``[clean_0, noisy_0, clean_1, ...]``."""
  stacked = torch.stack([clean, noisy], dim=2)
  return stacked.reshape(clean.shape[0], 2 * clean.shape[1], *clean.shape[2:])


def attend_cache_and_self(q: Tensor, k_self: Tensor, v_self: Tensor, cache_k: Tensor,
                          cache_v: Tensor, mask: Tensor) -> Tensor:
  """Query i sees the cache slots ``mask`` (broadcastable to (B, 1, Lq, T)) allows and its OWN
  key: q/k_self/v_self (B, Lq, H, D), cache (B, T, H, D). Softmax in float32 over the T + 1
  logits (:func:`lcm_jax.models.one_tower.attend_cache_and_self`). Returns (B, Lq, H, D)."""
  dtype = q.dtype
  q = q * (q.shape[-1] ** -0.5)
  logits_c = torch.einsum("bqhd,bkhd->bhqk", q, cache_k.to(dtype)).to(torch.float32)
  logits_c = torch.where(mask, logits_c, torch.full((), _MASK_VALUE, device=q.device))
  logit_s = torch.einsum("bqhd,bqhd->bhq", q, k_self.to(dtype)).to(torch.float32)[..., None]
  probs = torch.softmax(torch.cat([logits_c, logit_s], dim=-1), dim=-1).to(dtype)
  out = torch.einsum("bhqk,bkhd->bqhd", probs[..., :-1], cache_v.to(dtype))
  return out + torch.einsum("bhq,bqhd->bqhd", probs[..., -1], v_self.to(dtype))


class PositionEncoder(nn.Module):
  """``pos_encoder``: learned positions, ``weight`` (max_seq_len, d) (an embedding table). A
  position outside ``[0, max_seq_len)`` gives NaN, as the JAX module does."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    self.weight = nn.Parameter(torch.zeros(cfg.max_seq_len, cfg.model_dim))

  def forward(self, positions: Tensor) -> Tensor:
    positions = positions.long()
    size = self.weight.shape[0]
    ok = (positions >= 0) & (positions < size)
    out = self.weight.to(torch.float32)[positions.clamp(0, size - 1)]
    return torch.where(ok[..., None], out, torch.full((), float("nan"), device=out.device))


class OneTowerFrontend(nn.Module):
  """``embed_time``, ``pre_linear`` over ``[x ; t_emb]`` (d, S + d) and ``pos_encoder``."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    self.embed_time = TimestepEmbedder(cfg)
    self.pre_linear = nn.Linear(cfg.sonar_embed_dim + cfg.model_dim, cfg.model_dim)
    self.pos_encoder = PositionEncoder(cfg)

  def forward(self, x: Tensor, timesteps: Tensor, positions: Tensor) -> Tensor:
    """x (B, L, S) normalized, integer timesteps/positions (B, L) -> (B, L, d) float32."""
    h = torch.cat([x.to(torch.float32), self.embed_time(timesteps).to(torch.float32)], dim=-1)
    return linear(self.pre_linear, h).to(torch.float32) + self.pos_encoder(positions)


class OneTowerStack(nn.Module):
  """``layers.N`` (:class:`DecoderLayer` parameters, no RoPE) and ``layer_norm``."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    self.config = cfg
    self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
    self.layer_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)

  @staticmethod
  def _layer(layer: DecoderLayer, x: Tensor, attend: Any) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    x = x.to(torch.float32)
    attn = layer.self_attn
    h = layer.self_attn_layer_norm(x)
    q = attn.project_q(h)
    k, v = attn.project_kv(h)
    o = attend(q, k, v)
    x = x + linear(attn.output_proj, o.reshape(*o.shape[:-2], attn.num_heads * attn.head_dim)
                   ).to(torch.float32)
    return x + layer.ffn(layer.ffn_layer_norm(x)).to(torch.float32), (k, v)

  def _run(self, x: Tensor, attend_of_layer: Any) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    kvs = []
    for i, layer in enumerate(self.layers):
      x, kv = self._layer(layer, x, attend_of_layer(i))
      kvs.append(kv)
    return x, (torch.stack([k for k, _ in kvs]), torch.stack([v for _, v in kvs]))

  def forward(self, x: Tensor, mask: Tensor) -> Tensor:
    """Masked self-attention of the block (B, L, d) -> normed (B, L, d) float32."""
    x, _ = self._run(x, lambda i: lambda q, k, v: dot_product_attention(q, k, v, mask))
    return self.layer_norm(x)

  def encode(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Every layer's (k, v) of the block, each (N, B, L, H, D)."""
    return self._run(x, lambda i: lambda q, k, v: dot_product_attention(q, k, v, mask))[1]

  def peek(self, x: Tensor, mask: Tensor, cache_k: Tensor,
           cache_v: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Queries over a read-only cache (N, B, T, H, D) plus themselves -> (normed output, their
    (k, v))."""
    x, kv = self._run(x, lambda i: lambda q, k, v: attend_cache_and_self(
        q, k, v, cache_k[i], cache_v[i], mask))
    return self.layer_norm(x), kv


class OneTowerLCM(nn.Module):
  """One-Tower diffusion LCM: ``sonar_normalizer``, ``frontend`` (:class:`OneTowerFrontend`),
  ``lcm`` (:class:`OneTowerStack`) and ``postnet`` (see :mod:`lcm_jax.models.one_tower`)."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    _check_family(cfg, self)
    self.config = cfg
    self.sonar_normalizer = SonarNormalizer(cfg.sonar_embed_dim)
    self.frontend = OneTowerFrontend(cfg)
    self.lcm = OneTowerStack(cfg)
    self.postnet = Projection(cfg.model_dim, cfg.sonar_embed_dim)

  def normalize(self, x: Tensor) -> Tensor:
    return self.sonar_normalizer.normalize(x)

  def denormalize(self, x: Tensor) -> Tensor:
    return self.sonar_normalizer.denormalize(x)

  def forward(self, embeddings: Tensor, segment_ids: Optional[Tensor] = None,
              positions: Optional[Tensor] = None, *, noisy: Optional[Tensor] = None,
              timesteps: Optional[Tensor] = None,
              drop_cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The training form: raw (B, L, S) clean concepts, noisy x_t (B, L, S) normalized (default:
    the normalized inputs), integer timesteps (B, L) (default 0), optional ``drop_cond`` (B, L)
    -> ``(x0_hat, normalized)``, (B, L, S) float32; ``x0_hat[:, j]`` predicts concept j."""
    segment_ids, positions = _default_packing(embeddings, segment_ids, positions)
    normalized = self.normalize(embeddings)
    if noisy is None:
      noisy = normalized
    if timesteps is None:
      timesteps = torch.zeros(segment_ids.shape, dtype=torch.long, device=segment_ids.device)
    x = interleave(normalized, noisy.to(torch.float32))
    t = interleave(torch.zeros_like(timesteps), timesteps)
    pos = interleave(positions, positions)
    h = self.lcm(self.frontend(x, t, pos), one_tower_mask(segment_ids, positions, drop_cond))
    return self.postnet(h[:, 1::2]).to(torch.float32), normalized

  def encode_context(self, embeddings: Tensor, segment_ids: Optional[Tensor] = None,
                     positions: Optional[Tensor] = None
                     ) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """Every layer's K/V of the CLEAN concepts ((N, B, L, H, D) each, index j = concept j) and
    the normalized inputs (B, L, S)."""
    segment_ids, positions = _default_packing(embeddings, segment_ids, positions)
    normalized = self.normalize(embeddings)
    h = self.frontend(normalized, torch.zeros_like(segment_ids), positions)
    upto = segment_mask(segment_ids, segment_ids) & (positions[:, None, :] <= positions[:, :, None])
    upto = upto | torch.eye(segment_ids.shape[1], dtype=torch.bool, device=upto.device)[None]
    return self.lcm.encode(h, upto[:, None]), normalized

  def step(self, x: Tensor, timesteps: Tensor, positions: Tensor, cache_k: Tensor,
           cache_v: Tensor, mask: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """New positions (B, Lq, S) normalized at integer ``timesteps``/``positions`` (B, Lq) over a
    clean K/V cache (N, B, T, H, D); ``mask`` (B|1, 1, Lq, T): the slots each query sees besides
    itself. Returns ``(x0 predictions (B, Lq, S) float32, the queries' (k, v))``."""
    h = self.frontend(x, timesteps, positions)
    h, kv = self.lcm.peek(h, mask, cache_k, cache_v)
    return self.postnet(h).to(torch.float32), kv


def _default_packing(embeddings: Tensor, segment_ids: Optional[Tensor],
                     positions: Optional[Tensor]) -> tuple[Tensor, Tensor]:
  batch, length = embeddings.shape[:2]
  device = embeddings.device
  if segment_ids is None:
    segment_ids = torch.ones((batch, length), dtype=torch.long, device=device)
  if positions is None:
    positions = torch.arange(length, device=device)[None].expand(batch, length)
  return segment_ids, positions


Model = Union[BaseLCM, TwoTowerLCM, OneTowerLCM]


# ----------------------------------------------------------------------------------------------
# Building and loading

def build(cfg: ModelConfig) -> Model:
  """An (uninitialised) torch model of ``cfg.family`` (its entry's ``torch_model`` class)."""
  return reference.of(cfg).torch_class()(cfg)


def load_from_card(path: str, *, dtype: Optional[torch.dtype] = torch.float32,
                   device: Union[str, torch.device] = "cpu") -> Model:
  """Builds the model of a card (``DIR/model_card.yaml`` or ``DIR``) and loads its checkpoint
  (keys and shapes checked against the spec, then ``load_state_dict(strict=True)``).

  ``dtype``: the weights' dtype (the compute dtype); None keeps the checkpoint's. The normalizer
  buffers are kept in float32. Returns the model in ``eval()`` mode, ``model.config`` its
  :class:`~lcm_jax.models.config.ModelConfig`. Raises ``ValueError``
  (:class:`lcm_interop.reference.ExportError`) naming the
  file/key/field on a bad card or checkpoint.
  """
  if os.path.isdir(path):
    path = os.path.join(path, reference.CARD_FILE)
  _, values, state, _ = reference.load_card(path)
  cfg = reference.card_config(values, path)
  state = {k: (v.to(torch.float32) if k.endswith(reference.NORMALIZER_SUFFIXES)
               else v if dtype is None else v.to(dtype)) for k, v in state.items()}
  with torch.device("meta"):
    model = build(cfg)
  model.load_state_dict(state, strict=True, assign=True)
  return model.to(device).eval()
