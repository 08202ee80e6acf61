"""One-Tower diffusion LCM (paper arXiv 2412.08821, section 2.3).

ONE causal transformer denoises every concept of a document in one pass. Its input interleaves
the clean concepts with noisy copies of them, ``[c_0, n_0, c_1, n_1, ...]`` (index ``2j`` = clean
concept j, ``2j + 1`` = its noisy copy x_t), and :func:`one_tower_mask` makes the noisy copy of
concept j see the clean concepts ``< j`` of its document and itself, nothing else; clean concepts
see the clean concepts ``<= j`` of their document (never a noisy one). The output at the noisy
copy of j is the x0 prediction of concept j. Variables (reference-style names, see
``lcm_jax.models.naming``)::

  params:  frontend/embed_time/{fc1,fc2}/{kernel,bias}   DiT timestep embedder, as the Two-Tower's
           frontend/pre_linear/{kernel,bias}             Linear(sonar + model_dim -> model_dim)
           frontend/pos_encoder/weight                   (max_seq_len, model_dim) learned positions
           lcm/{layers | layers_N}/{self_attn_layer_norm, self_attn.{q,k,v,output}_proj,
                                    ffn_layer_norm, ffn.{gate,inner,output}_proj}
           lcm/layer_norm/weight
           postnet/fc/{kernel,bias}                      Linear(model_dim -> sonar)
  buffers: sonar_normalizer/{center,scale}               (frozen; top level, as the Two-Tower's)

Frontend of every position (clean or noisy) with vector x (normalized space), timestep t and
document position p::

  h = pre_linear(concat([x, embed_time(t)])) + pos_encoder.weight[p]

``embed_time`` is the Two-Tower's ``fc2(silu(fc1(timestep_features(t))))`` (model_dim wide); clean
concepts use t = 0. The body is the shared pre-norm layer (RMSNorm,
biased q/k/v/output projections, SwiGLU FFN, dropout on sub-block outputs) WITHOUT RoPE: the
paper gives the One-Tower learned position embeddings only, and both copies of concept j carry
position j (the mask alone separates them). Then ``lcm.layer_norm`` and ``postnet.fc`` on the
noisy copies.

Classifier-free guidance: with ``drop_cond[b, j]`` the noisy copy of j sees only itself (its
attention to the clean context is dropped), the unconditional model.

Incremental inference keeps every layer's K/V of the CLEAN concepts only (no RoPE, so a key does
not depend on where it is stored). :meth:`OneTowerLCM.step` runs a block of new positions
("queries") against such a cache: each query attends to the cache slots its mask allows plus
itself (and no other query), and the block's own K/V come back so that clean concepts can be
appended to the cache. The same call denoises (noisy queries, cache read-only), appends a
generated concept (a clean query, t = 0), and, with the cache built from a whole batch by
:meth:`OneTowerLCM.encode_context`, predicts every position in parallel (:func:`teacher_forced`).

Dtypes as the other families: parameters float32; matmuls in the compute dtype; norms, softmax and
the residual stream float32; outputs float32.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcm_jax import attention
from lcm_jax import diffusion
from lcm_jax import layers
from lcm_jax.models.base_lcm import PostNet, SonarNormalizer
from lcm_jax.models.config import ModelConfig
from lcm_jax.models.two_tower import TimestepEmbedder

Array = jax.Array
KV = tuple[Array, Array]
"""Per-layer keys and values, each (num_layers, B, L, H, D) in the compute dtype."""

MASK_AXES = ("activation_batch", None, None, None)


# ----------------------------------------------------------------------------------------------
# Masks

def context_mask(segment_ids: Array, positions: Array) -> Array:
  """Which clean concepts condition which prediction: (B, 1, L, L) bool.

  ``[b, 0, i, j]`` is True iff j is not padding, belongs to i's document
  (``segment_ids[j] == segment_ids[i] > 0``) and comes before it (``positions[j] <
  positions[i]``). Row i is the conditioning of the noisy copy of concept i.
  """
  seg = jnp.asarray(segment_ids)
  pos = jnp.asarray(positions)
  before = pos[:, None, :] < pos[:, :, None]
  return (layers.segment_mask(seg, seg) & before)[:, None]


def one_tower_mask(segment_ids: Array, positions: Array,
                   drop_cond: Optional[Array] = None) -> Array:
  """The self-attention mask of the interleaved training sequence: (B, 1, 2L, 2L) bool.

  Args:
    segment_ids: (B, L) int, document id of each concept of the packed row (0 = padding).
    positions: (B, L) int, position of each concept within its document.
    drop_cond: optional (B, L) bool; True = the noisy copy of that concept is unconditional.

  Returns:
    True = may attend. Index ``2i`` is the clean concept i, ``2i + 1`` its noisy copy. With
    ``same(i, j) = segment_ids[i] == segment_ids[j] > 0``:
      * clean i -> clean j  iff ``same(i, j)`` and ``positions[j] <= positions[i]`` (causal);
      * noisy i -> clean j  iff ``same(i, j)`` and ``positions[j] < positions[i]`` and not
        ``drop_cond[i]`` (the context before concept i, dropped for CFG);
      * noisy i -> noisy j  iff ``i == j`` (itself only);
      * clean i -> noisy j  never;
      * every index sees itself, padding included (no fully masked row).
    So a document never sees another document of the row, and no prediction sees the clean
    concept it predicts or anything after it.
  """
  seg = jnp.asarray(segment_ids)
  pos = jnp.asarray(positions)
  batch, length = seg.shape
  same = layers.segment_mask(seg, seg)                        # (B, Lq, Lk)
  upto = same & (pos[:, None, :] <= pos[:, :, None])           # clean -> clean
  before = same & (pos[:, None, :] < pos[:, :, None])          # noisy -> clean
  if drop_cond is not None:
    before = before & ~jnp.asarray(drop_cond, bool)[:, :, None]
  eye = jnp.broadcast_to(jnp.eye(length, dtype=bool), (batch, length, length))
  never = jnp.zeros_like(upto)
  # blocks[b, i, a, j, c]: query (i, a) -> key (j, c), a/c = 0 clean, 1 noisy.
  clean_q = jnp.stack([upto, never], axis=-1)                  # (B, Lq, Lk, 2)
  noisy_q = jnp.stack([before, eye], axis=-1)
  blocks = jnp.stack([clean_q, noisy_q], axis=2)               # (B, Lq, 2, Lk, 2)
  mask = blocks.reshape(batch, 2 * length, 2 * length)
  mask = mask | jnp.eye(2 * length, dtype=bool)[None]
  return mask[:, None]


def interleave(clean: Array, noisy: Array) -> Array:
  """(B, L, ...) and (B, L, ...) -> (B, 2L, ...) as ``[clean_0, noisy_0, clean_1, ...]``."""
  stacked = jnp.stack([clean, noisy], axis=2)
  return stacked.reshape(clean.shape[0], 2 * clean.shape[1], *clean.shape[2:])


# ----------------------------------------------------------------------------------------------
# Attention of new queries over a read-only cache plus themselves

def attend_cache_and_self(q: Array, k_self: Array, v_self: Array, cache_k: Array,
                          cache_v: Array, mask: Array, *, dtype: Any) -> Array:
  """Softmax attention where query i sees the cache slots ``mask`` allows and its OWN key.

  q, k_self, v_self: (B, Lq, H, D); cache_k/cache_v: (B, T, H, D) (T may be 0); mask: bool
  broadcastable to (B, 1, Lq, T). Scale 1/sqrt(D), einsums in ``dtype``, softmax in float32 over
  the T + 1 logits of each query (as :func:`lcm_jax.layers.dot_product_attention` over the keys
  ``[visible cache slots ; itself]``). The cache is only read (nothing is concatenated to it).
  Returns (B, Lq, H, D).
  """
  q = q * jnp.asarray(q.shape[-1] ** -0.5, dtype)
  q = q.astype(dtype)
  logits_c = jnp.einsum("bqhd,bkhd->bhqk", q, cache_k.astype(dtype),
                        preferred_element_type=jnp.float32)
  logits_c = jnp.where(mask, logits_c, attention.MASK_VALUE)
  logit_s = jnp.einsum("bqhd,bqhd->bhq", q, k_self.astype(dtype),
                       preferred_element_type=jnp.float32)[..., None]
  probs = jax.nn.softmax(jnp.concatenate([logits_c, logit_s], axis=-1), axis=-1).astype(dtype)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs[..., :-1], cache_v.astype(dtype))
  return out + jnp.einsum("bhq,bqhd->bqhd", probs[..., -1], v_self.astype(dtype))


# ----------------------------------------------------------------------------------------------
# Modules

class OneTowerFrontend(nn.Module):
  """``embed_time``, ``pre_linear`` over ``[x ; t_emb]`` and ``pos_encoder`` (see the module doc)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, timesteps: Array, positions: Array) -> Array:
    """x (B, L, S) normalized (clean or noisy), timesteps/positions (B, L) int -> (B, L, d) f32.

    With at least ``num_diffusion_train_steps`` positions, ``embed_time`` runs once on the table
    of all T timesteps and is gathered (the Two-Tower's exact shortcut 2).
    """
    cfg = self.config
    timesteps = jnp.asarray(timesteps, jnp.int32)
    num_t = cfg.num_diffusion_train_steps
    embed_time = TimestepEmbedder(cfg, name="embed_time")
    if timesteps.size >= num_t:
      table = nn.with_logical_constraint(embed_time(jnp.arange(num_t, dtype=jnp.int32)),
                                         (None, None))
      t_emb = jnp.take(table, timesteps, axis=0)
    else:
      t_emb = embed_time(timesteps)
    h = jnp.concatenate([x.astype(jnp.float32), t_emb.astype(jnp.float32)], axis=-1)
    fan_in = cfg.sonar_embed_dim + cfg.model_dim
    h = layers.torch_default_dense(cfg, cfg.model_dim, fan_in, ("sonar", "embed"),
                                   "pre_linear")(h).astype(jnp.float32)
    h = h + PositionEncoder(cfg, name="pos_encoder")(positions)
    return nn.with_logical_constraint(h, layers.BLE)


class PositionEncoder(nn.Module):
  """Learned absolute positions: ``weight`` (max_seq_len, model_dim), init N(0, 0.02).

  A position ``>= max_seq_len`` gives NaN (``jnp.take`` fill mode), never a silently clamped
  embedding.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, positions: Array) -> Array:
    cfg = self.config
    weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                               (None, "embed")),
                        (cfg.max_seq_len, cfg.model_dim), cfg.parameter_dtype())
    return jnp.take(weight.astype(jnp.float32), jnp.asarray(positions, jnp.int32), axis=0,
                    mode="fill", fill_value=jnp.nan)


class OneTowerLayer(nn.Module):
  """The shared pre-norm layer (same parameters as :class:`lcm_jax.layers.DecoderLayer`), no RoPE.

  Three scan-compatible methods (``(x, ...) -> (x, ys)``):
    * :meth:`__call__` (x, mask): masked self-attention of the block; ys None;
    * :meth:`encode` (x, mask): the same, ys = the block's (k, v) (a cache of it);
    * :meth:`peek` (x, mask, cache_k, cache_v): each query attends to the cache slots ``mask``
      (B|1, 1, Lq, T) allows plus itself (:func:`attend_cache_and_self`); ys = its (k, v).
  """

  config: ModelConfig
  deterministic: bool = True

  def setup(self) -> None:
    cfg = self.config
    dtype, param_dtype = cfg.compute_dtype(), cfg.parameter_dtype()
    self.self_attn_layer_norm = layers.RMSNorm(cfg.norm_eps, dtype, param_dtype)
    self.self_attn = layers.Attention(
        cfg.model_dim, cfg.num_heads, cfg.head_dim, dtype, param_dtype,
        implementation=attention.resolve_implementation(cfg.attention_impl))
    self.attn_dropout = layers.Dropout(cfg.dropout)
    self.ffn_layer_norm = layers.RMSNorm(cfg.norm_eps, dtype, param_dtype)
    self.ffn = layers.SwiGLUFFN(cfg.model_dim, cfg.swiglu_inner_dim, dtype, param_dtype)
    self.ffn_dropout = layers.Dropout(cfg.dropout)

  def _finish(self, x: Array, attn_heads: Array) -> Array:
    """Merge heads, ``output_proj``, residual, then the FFN sub-block."""
    cfg = self.config
    h = self.self_attn.output_proj(attn_heads.reshape(*attn_heads.shape[:-2],
                                                      cfg.num_heads * cfg.head_dim))
    h = self.attn_dropout(h, deterministic=self.deterministic)
    x = nn.with_logical_constraint(x + h.astype(jnp.float32), layers.BLE)
    h = self.ffn(self.ffn_layer_norm(x))
    h = self.ffn_dropout(h, deterministic=self.deterministic)
    return nn.with_logical_constraint(x + h.astype(jnp.float32), layers.BLE)

  def _block(self, x: Array, mask: Array) -> tuple[Array, KV]:
    x = x.astype(jnp.float32)
    h = self.self_attn_layer_norm(x)
    q = self.self_attn.project_q(h)
    k, v = self.self_attn.project_kv(h)
    o = layers.dot_product_attention(q, k, v, mask, dtype=self.config.compute_dtype(),
                                     implementation=self.self_attn.implementation)
    return self._finish(x, o), (k, v)

  def __call__(self, x: Array, mask: Array) -> tuple[Array, None]:
    return self._block(x, mask)[0], None

  def encode(self, x: Array, mask: Array) -> tuple[Array, KV]:
    return self._block(x, mask)

  def peek(self, x: Array, mask: Array, cache_k: Array, cache_v: Array) -> tuple[Array, KV]:
    x = x.astype(jnp.float32)
    h = self.self_attn_layer_norm(x)
    q = self.self_attn.project_q(h)
    k, v = self.self_attn.project_kv(h)
    o = attend_cache_and_self(q, k, v, cache_k, cache_v, mask, dtype=self.config.compute_dtype())
    return self._finish(x, o), (k, v)


class OneTowerStack(nn.Module):
  """``num_layers`` :class:`OneTowerLayer` s (scanned ``layers`` or ``layers_N``) + ``layer_norm``.

  ``mode``: ``train`` (masked self-attention; returns the normed output), ``encode`` (returns the
  per-layer (k, v), each (N, B, L, H, D); no final norm) or ``peek`` (queries over a cache
  ``cache_k``/``cache_v`` (N, B, T, H, D); returns ``(normed output, (k, v) of the queries)``).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, *, mode: str = "train", deterministic: bool = True,
               cache_k: Optional[Array] = None, cache_v: Optional[Array] = None) -> Any:
    cfg = self.config
    if mode not in ("train", "encode", "peek"):
      raise ValueError(f"OneTowerStack: unknown mode {mode!r}")
    if mode == "peek" and (cache_k is None or cache_v is None):
      raise ValueError("OneTowerStack: mode 'peek' needs cache_k and cache_v")
    x = nn.with_logical_constraint(x.astype(jnp.float32), layers.BLE)
    mask = nn.with_logical_constraint(mask, MASK_AXES) if mask.shape[0] == x.shape[0] else mask
    layer_cls = layers.remat_layer(OneTowerLayer, cfg.remat_policy, scanned=cfg.scan_layers)
    n = cfg.num_layers
    if cfg.scan_layers:
      common = dict(variable_axes={"params": 0}, length=n, check_constancy_invariants=True,
                    split_rngs={"params": True, "dropout": True},
                    metadata_params={nn.PARTITION_NAME: "layers"})
      stack_cls = nn.scan(layer_cls, methods={
          "__call__": dict(common, in_axes=(nn.broadcast,)),
          "encode": dict(common, in_axes=(nn.broadcast,)),
          "peek": dict(common, in_axes=(nn.broadcast, 0, 0)),
      })
      stack = stack_cls(cfg, deterministic=deterministic, name="layers")
      if mode == "train":
        x, _ = stack(x, mask)
      elif mode == "encode":
        _, kv = stack.encode(x, mask)
        return kv
      else:
        x, kv = stack.peek(x, mask, cache_k, cache_v)
    else:
      stack = [layer_cls(cfg, deterministic=deterministic, name=f"layers_{i}") for i in range(n)]
      kvs = []
      for i, layer in enumerate(stack):
        if mode == "train":
          x, _ = layer(x, mask)
        elif mode == "encode":
          x, kv_i = layer.encode(x, mask)
          kvs.append(kv_i)
        else:
          x, kv_i = layer.peek(x, mask, cache_k[i], cache_v[i])
          kvs.append(kv_i)
      if mode != "train":
        kv = (jnp.stack([a for a, _ in kvs]), jnp.stack([b for _, b in kvs]))
      if mode == "encode":
        return kv
    out = layers.RMSNorm(cfg.norm_eps, cfg.compute_dtype(), cfg.parameter_dtype(),
                         name="layer_norm")(x)
    return out if mode == "train" else (out, kv)


class OneTowerLCM(nn.Module):
  """The One-Tower diffusion LCM (see the module docstring).

  Methods (``model.apply(variables, ..., method=...)``):
    * :meth:`__call__`: the interleaved training forward, x0 predictions of every position;
    * :meth:`encode_context`: per-layer K/V of the clean concepts (a cache) + normalized inputs;
    * :meth:`step`: new positions over such a cache (denoising, or appending a clean concept);
    * :meth:`normalize` / :meth:`denormalize`.
  """

  config: ModelConfig

  def setup(self) -> None:
    self.sonar_normalizer = SonarNormalizer(self.config.sonar_embed_dim)
    self.frontend = OneTowerFrontend(self.config)
    self.lcm = OneTowerStack(self.config)
    self.postnet = PostNet(self.config)

  def normalize(self, embeddings: Array) -> Array:
    """Raw SONAR vectors -> normalized space (float32)."""
    return self.sonar_normalizer(embeddings)

  def denormalize(self, x: Array) -> Array:
    """Normalized space -> raw SONAR vectors (float32)."""
    return self.sonar_normalizer.denormalize(x)

  def __call__(self, embeddings: Array, segment_ids: Array, positions: Array, *,
               noisy: Optional[Array] = None, timesteps: Optional[Array] = None,
               drop_cond: Optional[Array] = None,
               deterministic: bool = True) -> tuple[Array, Array]:
    """Denoises every concept of the packed rows in one pass (training form).

    Args:
      embeddings: (B, L, S) raw SONAR vectors (the clean concepts).
      segment_ids: (B, L) int, document id (0 = padding); positions: (B, L) position in the
        document (the learned position embedding of both copies).
      noisy: (B, L, S) x_t in normalized space; None = the normalized inputs themselves.
      timesteps: (B, L) int in [0, T) of the noisy copies; None = zeros. Clean copies use t = 0.
      drop_cond: (B, L) bool, noisy copies that do not see their context (CFG training).
      deterministic: False enables dropout (``dropout`` rng).

    Returns:
      ``(x0_hat, normalized)``, both (B, L, S) float32 in normalized space; ``x0_hat[:, j]``
      predicts concept j from the clean concepts before j (same document) and its noisy copy.
    """
    normalized = self.normalize(embeddings)
    if noisy is None:
      noisy = normalized
    if timesteps is None:
      timesteps = jnp.zeros(segment_ids.shape, jnp.int32)
    timesteps = jnp.asarray(timesteps, jnp.int32)
    x = interleave(normalized, jnp.asarray(noisy, jnp.float32))
    t = interleave(jnp.zeros_like(timesteps), timesteps)
    pos = interleave(positions, positions)
    h = self.frontend(x, t, pos)
    mask = one_tower_mask(segment_ids, positions, drop_cond)
    h = self.lcm(h, mask, mode="train", deterministic=deterministic)
    x0_hat = self.postnet(h[:, 1::2]).astype(jnp.float32)
    return x0_hat, normalized

  def encode_context(self, embeddings: Array, segment_ids: Array,
                     positions: Array) -> tuple[KV, Array]:
    """Every layer's K/V of the CLEAN concepts (clean stream only: clean positions never see
    noisy ones, so these are exactly the clean K/V of :meth:`__call__`).

    Returns ``((k, v), normalized)``: k/v (num_layers, B, L, H, D) in the compute dtype, index
    j = concept j of the row; normalized (B, L, S) float32. Inference only (no dropout).
    """
    normalized = self.normalize(embeddings)
    h = self.frontend(normalized, jnp.zeros(segment_ids.shape, jnp.int32), positions)
    seg, pos = jnp.asarray(segment_ids), jnp.asarray(positions)
    upto = layers.segment_mask(seg, seg) & (pos[:, None, :] <= pos[:, :, None])
    upto = upto | jnp.eye(seg.shape[1], dtype=bool)[None]
    kv = self.lcm(h, upto[:, None], mode="encode")
    return kv, normalized

  def step(self, x: Array, timesteps: Array, positions: Array, cache_k: Array, cache_v: Array,
           mask: Array) -> tuple[Array, KV]:
    """Runs new positions against a clean K/V cache.

    Args:
      x: (B, Lq, S) normalized vectors of the new positions (x_t of noisy queries; the concept
        itself, with t = 0, for a clean one).
      timesteps: (B, Lq) int; positions: (B, Lq) int document positions.
      cache_k, cache_v: (num_layers, B, T, H, D), e.g. from :meth:`encode_context`.
      mask: bool broadcastable to (B, 1, Lq, T): the cache slots each query sees (besides
        itself; queries never see each other).

    Returns:
      ``(out, (k, v))``: out (B, Lq, S) float32, the x0 prediction of each query (meaningful for
      noisy queries); (k, v) (num_layers, B, Lq, H, D), the queries' own keys/values (append
      them to the cache for clean queries).
    """
    h = self.frontend(jnp.asarray(x, jnp.float32), timesteps, positions)
    h, kv = self.lcm(h, mask, mode="peek", cache_k=cache_k, cache_v=cache_v)
    return self.postnet(h).astype(jnp.float32), kv


# ----------------------------------------------------------------------------------------------
# Loss

# The diffusion families share one x0-prediction loss (lcm_jax.diffusion).
diffusion_loss_from_draws = diffusion.x0_loss_from_draws
diffusion_loss = diffusion.x0_loss


# ----------------------------------------------------------------------------------------------
# Sampling: teacher-forced predictions and incremental generation

def guided_denoise_fn(model: OneTowerLCM, variables: dict[str, Any], cache_k: Array,
                      cache_v: Array, cond_mask: Array, positions: Array, guided: bool) -> Any:
  """The ``denoise_fn`` of :func:`lcm_jax.diffusion.sample` for noisy queries over a cache.

  ``cond_mask`` (B, 1, Lq, T): the cache slots each conditional query sees; ``positions``
  (B, Lq). With ``guided`` the unconditional queries (cache fully masked: each sees itself only,
  exactly the ``drop_cond`` form of training) are appended along the QUERY axis, so one call of
  2 Lq queries per row serves both halves (queries never see each other) and reads the weights
  and the cache once.
  """
  batch, q_len = positions.shape
  if guided:  # built once, outside the sampler's loop
    pos2 = jnp.concatenate([positions, positions], axis=1)
    mask2 = jnp.concatenate([cond_mask, jnp.zeros_like(cond_mask)], axis=2)

  def denoise_fn(x_t: Array, t: Array, with_uncond: bool) -> Any:
    if with_uncond:
      x2 = jnp.concatenate([x_t, x_t], axis=1)
      ts = jnp.full((batch, 2 * q_len), t, jnp.int32)
      out, _ = model.apply(variables, x2, ts, pos2, cache_k, cache_v, mask2,
                           method=OneTowerLCM.step)
      return out[:, :q_len], out[:, q_len:]
    ts = jnp.full((batch, q_len), t, jnp.int32)
    out, _ = model.apply(variables, x_t, ts, positions, cache_k, cache_v, cond_mask,
                         method=OneTowerLCM.step)
    return out

  return denoise_fn


def teacher_forced(model: OneTowerLCM, variables: dict[str, Any], batch: dict[str, Array], *,
                   sampler: Optional[diffusion.SamplerConfig] = None,
                   rng: Optional[Array] = None) -> tuple[Array, Array]:
  """Target-aligned predictions of every position: ``(predictions, normalized)``, (B, L, S) f32.

  One clean pass (:meth:`OneTowerLCM.encode_context`) caches every layer's K/V of the batch; the
  DDIM sampler with guidance then runs on all positions in parallel, position j seeing the clean
  concepts before j of its document (its conditional half) or nothing but itself (its
  unconditional half): exactly what incremental generation sees when it produces concept j after
  a prompt of j concepts. Column 0 of a document is an unconditional sample. ``sampler`` defaults
  to :class:`~lcm_jax.diffusion.SamplerConfig`, ``rng`` to ``jax.random.key(0)``. Jittable with
  ``model`` and ``sampler`` static.
  """
  cfg = model.config
  sampler = sampler or diffusion.SamplerConfig()
  rng = jax.random.key(0) if rng is None else rng
  emb, seg, pos = batch["embeddings"], batch["segment_ids"], batch["positions"]
  (k, v), normalized = model.apply(variables, emb, seg, pos, method=OneTowerLCM.encode_context)
  denoise = guided_denoise_fn(model, variables, k, v, context_mask(seg, pos),
                              jnp.asarray(pos, jnp.int32), sampler.guidance_scale != 1.0)
  preds = diffusion.sample(denoise, rng, normalized.shape, diffusion.alpha_bar_from_config(cfg),
                           sampler)
  return preds.astype(jnp.float32), normalized


class OneTowerDecoder:
  """Incremental generation for ``lcm_jax.generate.Generator`` (the ``start``/``advance`` protocol).

  State: ``{"k", "v"}``, each (num_layers, B, total, H, D), the K/V of the CLEAN concepts of each
  row at slot = document position (prompts from slot 0). Concept n of row b is sampled with the
  DDIM sampler (guided as configured) over ONE noisy query at position n that sees the slots
  ``< n`` and itself (:meth:`OneTowerLCM.step`, cache read-only; the unconditional half sees
  itself only). A final concept is then fed as a clean query (t = 0) at slot n, and its K/V are
  written into the cache. Slots at or past a row's length hold garbage (prompt padding) that no
  query sees and that later writes overwrite.
  """

  def __init__(self, model: OneTowerLCM, sampler: diffusion.SamplerConfig):
    self.model = model
    self.sampler = sampler
    self.alpha_bar = diffusion.alpha_bar_from_config(model.config)

  def _concept(self, variables: dict[str, Any], state: dict[str, Array], query_pos: Array,
               rng: Array) -> Array:
    cfg = self.model.config
    batch, total = state["k"].shape[1], state["k"].shape[2]
    query_pos = query_pos.astype(jnp.int32)
    slots = jnp.arange(total, dtype=jnp.int32)
    cond = (slots[None, :] < query_pos[:, None])[:, None, None, :]
    denoise = guided_denoise_fn(self.model, variables, state["k"], state["v"], cond,
                                query_pos[:, None], self.sampler.guidance_scale != 1.0)
    x0 = diffusion.sample(denoise, rng, (batch, 1, cfg.sonar_embed_dim), self.alpha_bar,
                          self.sampler)
    return self.model.apply(variables, x0[:, 0], method=OneTowerLCM.denormalize)

  def start(self, variables: dict[str, Any], prompts: Array, lengths: Array, total: int,
            rng: Array) -> tuple[dict[str, Array], Array]:
    """Prefills the cache with the right-padded raw prompts (B, P, S) and samples concept
    ``lengths[b]`` of every row. Returns ``(state, first concept (B, S) raw)``."""
    batch, plen = prompts.shape[:2]
    seg = jnp.ones((batch, plen), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(plen, dtype=jnp.int32), (batch, plen))
    (k, v), _ = self.model.apply(variables, prompts, seg, pos,
                                 method=OneTowerLCM.encode_context)
    shape = k.shape[:2] + (total,) + k.shape[3:]
    state = {"k": jnp.zeros(shape, k.dtype).at[:, :, :plen].set(k),
             "v": jnp.zeros(shape, v.dtype).at[:, :, :plen].set(v)}
    return state, self._concept(variables, state, lengths, rng)

  def advance(self, variables: dict[str, Any], state: dict[str, Array], concept: Array,
              slot: Array, rng: Array) -> tuple[dict[str, Array], Array]:
    """Feeds ``concept`` (B, S) raw as the clean concept at ``slot`` (B,) and samples the concept
    at ``slot + 1``. Returns ``(state, next concept (B, S) raw)``."""
    slot = slot.astype(jnp.int32)
    total = state["k"].shape[2]
    normalized = self.model.apply(variables, concept[:, None], method=OneTowerLCM.normalize)
    slots = jnp.arange(total, dtype=jnp.int32)
    mask = (slots[None, :] < slot[:, None])[:, None, None, :]
    _, (k, v) = self.model.apply(variables, normalized, jnp.zeros(slot.shape + (1,), jnp.int32),
                                 slot[:, None], state["k"], state["v"], mask,
                                 method=OneTowerLCM.step)
    write = jax.vmap(layers.update_cache, in_axes=(0, 0, None))
    state = {"k": write(state["k"], k, slot), "v": write(state["v"], v, slot)}
    return state, self._concept(variables, state, slot + 1, rng)


# ----------------------------------------------------------------------------------------------
# Counts (the conventions of lcm_jax.models.flops, as this model executes)

def param_count_formula(cfg: ModelConfig) -> int:
  """The trainable parameter count written out (torch Linear weight (out, in) + bias)::

    embed_time   te*d + d + d*d + d                (fc1, fc2; te = timestep_embed_dim)
    pre_linear   (S + d)*d + d
    pos_encoder  max_seq_len*d
    per layer    4*(d*d + d)                        (q, k, v, output; H*D = d)
                 + 2*(f*d + f) + (d*f + d)          (gate, inner, output; f = swiglu_inner_dim)
                 + 2*d                              (two RMSNorm weights)
    layer_norm   d
    postnet      d*S + S
  """
  d, s, f = cfg.model_dim, cfg.sonar_embed_dim, cfg.swiglu_inner_dim
  inner = cfg.num_heads * cfg.head_dim
  layer = 3 * (d * inner + inner) + (inner * d + d) + 2 * (f * d + f) + (d * f + d) + 2 * d
  return int((cfg.timestep_embed_dim * d + d + d * d + d) + ((s + d) * d + d)
             + cfg.max_seq_len * d + cfg.num_layers * layer + d + (d * s + s))


def _layer_matmul_params(cfg: ModelConfig) -> int:
  d, f = cfg.model_dim, cfg.swiglu_inner_dim
  inner = cfg.num_heads * cfg.head_dim
  return 4 * d * inner + 3 * d * f


def matmul_param_count(cfg: ModelConfig) -> int:
  """Linear weights in a per-CONCEPT matmul, counted once per sequence position that runs them:
  each concept is two positions (clean + noisy), both through ``pre_linear`` (S + d -> d) and
  every layer; ``postnet`` runs on the noisy copy only. ``embed_time`` runs on the (T, d) table
  once per step (see :func:`train_flops_per_concept`), not per concept::

    2 * (S + d) * d + 2 * num_layers * (4 * d * H*D + 3 * d * f) + d * S
  """
  d, s = cfg.model_dim, cfg.sonar_embed_dim
  return 2 * (s + d) * d + 2 * cfg.num_layers * _layer_matmul_params(cfg) + d * s


def train_flops_per_concept(cfg: ModelConfig, seq_len: int, rows_per_step: int = 0) -> int:
  """Forward + backward FLOPs per concept (the convention of :mod:`lcm_jax.models.flops`):
  ``6 * matmul_param_count`` plus the attention products of the interleaved sequence, 2 queries
  per concept against the FULL row of ``2 * seq_len`` keys in every layer
  (``3 * 2 * num_layers * 4 * (2 * seq_len) * H*D``), plus, when ``rows_per_step`` is given,
  ``embed_time`` on the T timesteps once per step amortised over ``rows_per_step * seq_len``
  concepts. Rounded to an integer."""
  inner = cfg.num_heads * cfg.head_dim
  flops = 6 * matmul_param_count(cfg) + 3 * 2 * cfg.num_layers * 4 * (2 * seq_len) * inner
  if rows_per_step > 0:
    d = cfg.model_dim
    table = 6 * cfg.num_diffusion_train_steps * (cfg.timestep_embed_dim * d + d * d)
    flops += table / (rows_per_step * seq_len)
  return int(round(flops))


def generation_flops(cfg: ModelConfig, batch: int, prompt_len: int, max_len: int,
                     visited: int = 0, halves: int = 1) -> int:
  """Forward FLOPs of generating ``max_len`` concepts per row with :class:`OneTowerDecoder`
  (``visited`` DDIM timesteps per concept, ``halves`` = 2 with guidance):

  * clean positions: the prompt prefill (``prompt_len`` queries against ``prompt_len`` keys) and
    the ``max_len - 1`` fed-back concepts (each against ``slots + 1`` keys, ``slots =
    prompt_len + max_len``, and through ``postnet`` too, as :meth:`OneTowerLCM.step` runs it);
  * per generated concept, ``visited`` calls of ``halves`` queries each: ``pre_linear``, every
    layer (keys = ``slots + 1``), ``postnet``; the timestep embedding per query when a call has
    fewer than T queries, else once on the (T, d) table.
  """
  d, s = cfg.model_dim, cfg.sonar_embed_dim
  inner = cfg.num_heads * cfg.head_dim
  n, num_t, slots = cfg.num_layers, cfg.num_diffusion_train_steps, prompt_len + max_len
  body = 2 * ((s + d) * d + n * _layer_matmul_params(cfg))
  time_emb = 2 * (cfg.timestep_embed_dim * d + d * d)
  prefill = batch * prompt_len * (body + n * 4 * prompt_len * inner)
  fed = batch * (max_len - 1) * (body + 2 * d * s + n * 4 * (slots + 1) * inner + time_emb)
  queries = batch * halves
  per_call = queries * (body + 2 * d * s + n * 4 * (slots + 1) * inner)
  per_call += time_emb * num_t if queries >= num_t else time_emb * queries
  return int(prefill + fed + max_len * visited * per_call)


def describe_layers(cfg: ModelConfig) -> str:
  """The layers part of ``--mode=describe``'s model line."""
  return (f"{cfg.num_layers} (one tower, clean + noisy interleaved; "
          f"T={cfg.num_diffusion_train_steps}, {cfg.beta_schedule})")
