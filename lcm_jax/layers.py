"""The shared transformer block: Base-LCM body and Two-Tower contextualizer.

Building blocks, each small and reusable by the Two-Tower denoiser:
  * :class:`RMSNorm` (float32 maths, ``weight`` only);
  * :class:`Dropout` (a counter-based mask, :func:`dropout_keep_mask`: ~10x cheaper than
    threefry's on CPU, and the same however the array is sharded);
  * interleaved rotary embeddings: :func:`rope_tables` (cos/sin, once per forward) and
    :func:`apply_rope` (rotates ADJACENT pairs ``2i, 2i+1``, the reference layout);
  * masks: :func:`causal_mask`, :func:`segment_mask`, :func:`causal_segment_mask` (once per forward);
  * :func:`dot_product_attention` (einsums in the compute dtype, softmax in float32);
  * :class:`Attention` (q/k/v/output projections with bias; optional separate key/value input);
  * :class:`SwiGLUFFN`; :class:`DecoderLayer` (pre-norm); :class:`TransformerStack`
    (N layers + final ``layer_norm``; ``nn.scan`` or unrolled; optional remat);
  * a KV cache for incremental decoding: :func:`init_cache`, :func:`update_cache`,
    :func:`cache_mask` and the ``cache=``/``cache_index=`` arguments of :class:`TransformerStack`.

KV cache layout: a plain pytree ``{"k": (num_layers, B, T, H, D), "v": (same)}`` in the compute
dtype, keys stored AFTER RoPE (rotated with the document position of the token that wrote them).
Row ``b`` writes its new block at slots ``cache_index[b] + i``; queries see every slot up to their
own (causal in slot space). The caller keeps the contract "slots below ``cache_index[b]`` hold
valid entries": right-padded prompts are prefilled from slot 0 and the next write of row ``b``
starts at its true length, so slots written by padding are overwritten before any query can see
them. Without a cache every call behaves exactly as before.

Parameter names mirror the reference checkpoint keys (``self_attn_layer_norm``,
``self_attn.{q,k,v,output}_proj``, ``ffn_layer_norm``, ``ffn.{gate,inner,output}_proj``,
``layer_norm``), Dense ``kernel`` is (in, out), so export is renames and transposes only.

Dtypes: parameters in ``param_dtype`` (float32); matmuls in the compute dtype (bfloat16 on
accelerators, float32 on CPU); norms, RoPE and softmax in float32; the residual stream is float32.

Logical axis names: params use ``sonar``, ``embed``, ``heads``, ``mlp``, ``norm`` (and ``layers``
for the scan axis); activations use ``activation_batch``, ``activation_length``,
``activation_embed``, ``activation_heads``, ``activation_mlp``. Outside a mesh/rules context the
constraints are no-ops.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcm_jax import attention
from lcm_jax.models.config import ModelConfig

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]
RopeTables = tuple[Array, Array]
"""``(cos, sin)``, each (batch, length, 1, head_dim // 2) float32, broadcast over heads."""
KVCache = dict[str, Array]
"""``{"k": ..., "v": ...}``: (num_layers, B, T, H, D) for a stack, (B, T, H, D) for one layer."""

# Logical activation layouts.
BLE = ("activation_batch", "activation_length", "activation_embed")
BLM = ("activation_batch", "activation_length", "activation_mlp")
BLHD = ("activation_batch", "activation_length", "activation_heads", None)



# ----------------------------------------------------------------------------------------------
# Initialisers (the reference's). Dense kernels are (fan_in, fan_out).

def xavier_uniform(gain: float = 1.0) -> Initializer:
  """torch ``xavier_uniform_(w, gain)``: U(-b, b), ``b = gain * sqrt(6 / (fan_in + fan_out))``."""
  return nn.initializers.variance_scaling(gain * gain, "fan_avg", "uniform")


def torch_linear_kernel_init() -> Initializer:
  """torch's default Linear weight init, ``kaiming_uniform_(a=sqrt(5))``: U(+-1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> Initializer:
  """torch's default Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# ----------------------------------------------------------------------------------------------
# Dense

@jax.custom_vjp
def matmul(x: Array, w: Array) -> Array:
  """``x @ w`` for x (..., in) and w (in, out), with an explicitly written backward pass.

  Same values as autodiff; the only difference is the form of the weight gradient,
  ``x2d.T @ dy2d`` with every leading axis flattened into one contraction. Left to itself,
  XLA:CPU emits that gradient as a dot over a transposed copy of ``dy`` that misses its fast
  (YNNPACK) matmul path: weight gradients ran ~25% slower and the bench train step 5-12% slower.
  On GPU/TPU both forms compile to the same GEMM.
  """
  return jnp.dot(x, w)


def _matmul_fwd(x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
  return jnp.dot(x, w), (x, w)


def _matmul_bwd(res: tuple[Array, Array], dy: Array) -> tuple[Array, Array]:
  x, w = res
  dx = jnp.dot(dy, w.T).astype(x.dtype)
  x2d = x.reshape(-1, x.shape[-1])
  dy2d = dy.reshape(-1, dy.shape[-1])
  dw = jnp.dot(x2d.T, dy2d, preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dense_dot_general(lhs: Array, rhs: Array, dimension_numbers: Any, precision: Any = None,
                       preferred_element_type: Any = None, **unused: Any) -> Array:
  """The ``dot_general`` nn.Dense calls, routed to :func:`matmul` (default precision)."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,) or lhs_batch
      or rhs_batch or rhs.ndim != 2):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  out = matmul(lhs, rhs)
  return out if preferred_element_type is None else out.astype(preferred_element_type)


def dense(features: int, axes: tuple[str, str], *, kernel_init: Initializer,
          bias_init: Initializer, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
  """A Dense layer with bias whose kernel/bias carry the logical axes ``axes`` / ``axes[1:]``.

  Kernel (in, out) and bias are created in ``param_dtype``; the matmul runs in ``dtype``.
  """
  return nn.Dense(
      features, use_bias=True, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(bias_init, axes[1:]),
      dot_general=_dense_dot_general, name=name)


def torch_default_dense(cfg: ModelConfig, features: int, fan_in: int, axes: tuple[str, str],
                        name: str) -> nn.Dense:
  """A biased Linear with torch's default init (kaiming-uniform kernel, U(+-1/sqrt(fan_in))
  bias), in ``cfg``'s compute/param dtypes: the reference's pre/post projections."""
  return dense(features, axes, kernel_init=torch_linear_kernel_init(),
               bias_init=torch_linear_bias_init(fan_in), dtype=cfg.compute_dtype(),
               param_dtype=cfg.parameter_dtype(), name=name)


# ----------------------------------------------------------------------------------------------
# RMSNorm

class RMSNorm(nn.Module):
  """``x * rsqrt(mean(x^2) + eps) * weight`` in float32, no bias; output in ``dtype``."""

  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                               ("norm",)),
                        (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (x * weight.astype(jnp.float32)).astype(self.dtype)


# ----------------------------------------------------------------------------------------------
# Dropout

# Golden-ratio increment and the two multipliers of a 32-bit xor-shift-multiply finalizer
# (full avalanche: every input bit flips each output bit with probability ~1/2).
_COUNTER_STEP = 0x9E3779B9
_MIX_1, _MIX_2 = 0x7FEB352D, 0x846CA68B


def _mix32(h: Array) -> Array:
  """The finalizer: uint32 -> uint32, a bijection."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(_MIX_1)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(_MIX_2)
  return h ^ (h >> 16)


def dropout_keep_mask(rng: Array, shape: tuple[int, ...], rate: float) -> Array:
  """A boolean keep-mask of ``shape``: True with probability ``1 - rate`` (exact to 2^-32).

  Counter-based: two 32-bit seed words are drawn from ``rng`` (the only threefry work), then
  element ``i`` (row-major index) keeps iff ``mix(mix(i * step + s0) ^ s1) >= rate * 2^32``.
  That is ~12 integer operations per element, against threefry's ~100 for ``jax.random.bernoulli``:
  on a 2-core CPU the masks of the bench step cost ~10x less. The mask depends on the global
  index only, so it is the same however the array is sharded. Arrays of 2^32 or more elements
  (whose counter would wrap) use ``jax.random.bernoulli``.
  """
  size = math.prod(shape)
  if size >= 2 ** 32:
    return jax.random.bernoulli(rng, 1.0 - rate, shape)
  seeds = jax.random.bits(rng, (2,), jnp.uint32)
  counter = jax.lax.iota(jnp.uint32, size).reshape(shape)
  h = _mix32(counter * jnp.uint32(_COUNTER_STEP) + seeds[0])
  h = _mix32(h ^ seeds[1])
  threshold = min(int(round(rate * 2.0 ** 32)), 2 ** 32 - 1)
  return h >= jnp.uint32(threshold)


class Dropout(nn.Module):
  """Inverted dropout (``x / (1 - rate)`` where kept, 0 elsewhere) with the counter-based mask
  of :func:`dropout_keep_mask`, drawn from the ``dropout`` rng stream. Same interface and
  scaling as ``flax.linen.Dropout`` (``deterministic=True`` or ``rate == 0`` is the identity)."""

  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = dropout_keep_mask(self.make_rng("dropout"), x.shape, self.rate)
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros((), x.dtype))


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings (interleaved: adjacent pairs 2i, 2i+1)

def rope_frequencies(head_dim: int, theta: float = 10000.0) -> Array:
  """``theta^(-2i/head_dim)`` for i < head_dim/2, in float32."""
  exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (jnp.float32(theta) ** exponent)


def rope_tables(positions: Array, head_dim: int, theta: float = 10000.0) -> RopeTables:
  """cos/sin tables for per-token ``positions`` (batch, length) (0 at each document start).

  Computed once per forward and shared by every layer. Returns two (batch, length, 1, head_dim/2)
  float32 arrays that broadcast over the heads axis of (batch, length, heads, head_dim).
  """
  angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, theta)
  angles = angles[..., None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, rope: RopeTables) -> Array:
  """Rotates each adjacent pair ``(x[2i], x[2i+1])`` of the last axis by ``angle_i``, in float32.

  ``x`` is (batch, length, heads, head_dim); the result has ``x.dtype``. This is the interleaved
  (complex-number) layout of the reference, NOT the "rotate_half" layout.
  """
  cos, sin = rope
  dtype = x.dtype
  with jax.named_scope("rope"):  # names the ops in profiles (benchmarks/profile_step.py)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    # (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin): the same products and sums as the textbook
    # form, written with the pair swapped (a reverse, whose gradient is a reverse) instead of
    # slicing and stacking (whose gradient is pads and adds: ~3% of a CPU train step).
    sign = jnp.asarray([-1.0, 1.0], jnp.float32)
    out = pairs * cos[..., None] + pairs[..., ::-1] * (sin[..., None] * sign)
    return out.reshape(x.shape).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Masks: boolean, True = may attend. Shapes broadcast to (batch, heads, q_len, kv_len).

def causal_mask(q_index: Array, kv_index: Array) -> Array:
  """``q_index[..., i] >= kv_index[..., j]`` -> (..., q_len, kv_len).

  Indices are positions in the (packed) row; for a KV cache pass the cache offsets as indices.
  """
  return q_index[..., :, None] >= kv_index[..., None, :]


def segment_mask(q_segment_ids: Array, kv_segment_ids: Array) -> Array:
  """Same segment and not padding (segment id 0) -> (batch, q_len, kv_len)."""
  q = q_segment_ids[..., :, None]
  return (q == kv_segment_ids[..., None, :]) & (q > 0)


def causal_segment_mask(segment_ids: Array) -> Array:
  """The packed-row self-attention mask: causal AND same segment AND segment > 0.

  ``segment_ids`` is (batch, length), 0 = padding. Returns (batch, 1, length, length) bool.
  Padding rows are fully masked (see :func:`dot_product_attention` for why that is safe).
  """
  index = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
  mask = segment_mask(segment_ids, segment_ids) & causal_mask(index, index)[None]
  return mask[:, None]


# ----------------------------------------------------------------------------------------------
# KV cache

def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Optional[Dtype] = None,
               num_layers: Optional[int] = None) -> KVCache:
  """An empty (zero) KV cache for a :class:`TransformerStack` built from ``cfg``.

  Returns ``{"k", "v"}``, each (num_layers, batch, max_len, num_heads, head_dim) in ``dtype``
  (default: the compute dtype). ``num_layers`` defaults to ``cfg.num_layers``.
  """
  dtype = cfg.compute_dtype() if dtype is None else jnp.dtype(dtype)
  depth = cfg.num_layers if num_layers is None else num_layers
  shape = (depth, batch, max_len, cfg.num_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def update_cache(cache: Array, new: Array, index: Array) -> Array:
  """Writes ``new`` (B, Lq, H, D) into ``cache`` (B, T, H, D) at slots ``index[b] + i``.

  ``index`` is (B,) int. Writes past slot T-1 are dropped (never clamped onto valid slots).
  """
  rows = jnp.arange(new.shape[0], dtype=jnp.int32)[:, None]
  slots = index.astype(jnp.int32)[:, None] + jnp.arange(new.shape[1], dtype=jnp.int32)[None]
  return cache.at[rows, slots].set(new.astype(cache.dtype), mode="drop")


def cache_mask(cache_index: Array, q_len: int, cache_len: int) -> Array:
  """Causal mask in cache-slot space for a block of ``q_len`` new tokens written at
  ``cache_index`` (B,): query i of row b sees slots ``<= cache_index[b] + i``.

  Returns (B, 1, q_len, cache_len) bool.
  """
  q_slots = cache_index.astype(jnp.int32)[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None]
  kv_slots = jnp.arange(cache_len, dtype=jnp.int32)
  return causal_mask(q_slots, kv_slots[None])[:, None]


# ----------------------------------------------------------------------------------------------
# Attention

def dot_product_attention(q: Array, k: Array, v: Array, mask: Optional[Array], *,
                          dtype: Dtype, implementation: str = "xla", is_causal: bool = False,
                          segment_ids: Optional[Array] = None) -> Array:
  """Softmax attention. q (B, Lq, H, D), k/v (B, Lk, H, D), mask bool broadcastable to
  (B, H, Lq, Lk) or None. Scale 1/sqrt(D); einsums in ``dtype``; logits/softmax in float32.

  Fully masked rows get a finite mask value, hence a uniform (not NaN) distribution; their outputs
  are garbage but finite, and never reach unmasked positions.

  :func:`lcm_jax.attention.dot_product_attention`: ``implementation`` (default ``xla``, the
  numbers above) and the ``is_causal``/``segment_ids`` promises are documented there.
  """
  return attention.dot_product_attention(q, k, v, mask, dtype=dtype,
                                         implementation=implementation, is_causal=is_causal,
                                         segment_ids=segment_ids)


class Attention(nn.Module):
  """Multi-head attention with biased q/k/v/output projections (reference layout and init).

  Self-attention by default; pass ``kv`` for cross-attention. Projections are separate methods
  (callers may cache keys/values between projection and :func:`dot_product_attention`);
  :meth:`cached` is self-attention over a KV cache. ``implementation`` is the attention kernel
  (``xla`` | ``cudnn`` | ``splash`` | ``auto``, :mod:`lcm_jax.attention`); it changes no
  parameter.
  """

  model_dim: int
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str = "xla"

  def setup(self) -> None:
    inner = self.num_heads * self.head_dim
    qkv_init = xavier_uniform(2 ** -0.5)
    zeros = nn.initializers.zeros_init()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bias_init=zeros)
    self.q_proj = dense(inner, ("embed", "heads"), kernel_init=qkv_init, name="q_proj", **kw)
    self.k_proj = dense(inner, ("embed", "heads"), kernel_init=qkv_init, name="k_proj", **kw)
    self.v_proj = dense(inner, ("embed", "heads"), kernel_init=qkv_init, name="v_proj", **kw)
    self.output_proj = dense(self.model_dim, ("heads", "embed"), kernel_init=xavier_uniform(),
                             name="output_proj", **kw)

  def _split_heads(self, x: Array) -> Array:
    x = x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)
    return nn.with_logical_constraint(x, BLHD)

  def project_q(self, x: Array) -> Array:
    """(B, L, model_dim) -> queries (B, L, H, D), before RoPE."""
    return self._split_heads(self.q_proj(x))

  def project_kv(self, kv: Array) -> tuple[Array, Array]:
    """(B, L, model_dim) -> keys and values (B, L, H, D), before RoPE."""
    return self._split_heads(self.k_proj(kv)), self._split_heads(self.v_proj(kv))

  def __call__(self, x: Array, kv: Optional[Array] = None, *, mask: Optional[Array],
               rope: Optional[RopeTables] = None,
               kv_rope: Optional[RopeTables] = None) -> Array:
    """Attends from ``x`` (B, Lq, model_dim) to ``kv`` (B, Lk, model_dim; default ``x``).

    ``rope`` rotates the queries and, unless ``kv_rope`` is given, the keys; None = no RoPE.
    """
    q = self.project_q(x)
    k, v = self.project_kv(x if kv is None else kv)
    if rope is not None:
      q = apply_rope(q, rope)
      k = apply_rope(k, rope if kv_rope is None else kv_rope)
    return self._attend(q, k, v, mask)

  def _attend(self, q: Array, k: Array, v: Array, mask: Optional[Array], *,
              is_causal: bool = False, segment_ids: Optional[Array] = None) -> Array:
    """Heads (B, L, H, D) -> attention -> merged heads -> ``output_proj``.

    ``is_causal``/``segment_ids``: promises about ``mask`` (see
    :func:`lcm_jax.attention.dot_product_attention`) that let cuDNN/splash use it.
    """
    out = dot_product_attention(q, k, v, mask, dtype=self.dtype,
                                implementation=self.implementation, is_causal=is_causal,
                                segment_ids=segment_ids)
    out = out.reshape(*out.shape[:-2], self.num_heads * self.head_dim)
    return self.output_proj(out)

  def cached(self, x: Array, cache: KVCache, cache_index: Array, *, mask: Array,
             rope: Optional[RopeTables] = None) -> tuple[Array, KVCache]:
    """Self-attention of the new block ``x`` (B, Lq, model_dim) over a KV cache.

    The block's keys (rotated by ``rope``) and values are written into ``cache`` (this layer's
    ``{"k", "v"}``, each (B, T, H, D)) at slots ``cache_index[b] + i`` (see :func:`update_cache`),
    then the queries attend to all T slots under ``mask`` (B or 1, 1, Lq, T).
    Returns ``(output (B, Lq, model_dim), updated cache)``.
    """
    q = self.project_q(x)
    k, v = self.project_kv(x)
    if rope is not None:
      q = apply_rope(q, rope)
      k = apply_rope(k, rope)
    new_cache = {
        "k": nn.with_logical_constraint(update_cache(cache["k"], k, cache_index), BLHD),
        "v": nn.with_logical_constraint(update_cache(cache["v"], v, cache_index), BLHD)}
    return self._attend(q, new_cache["k"], new_cache["v"], mask), new_cache


# ----------------------------------------------------------------------------------------------
# Feed-forward

class SwiGLUFFN(nn.Module):
  """``output_proj(silu(gate_proj(h)) * inner_proj(h))``, all with bias, torch-default init."""

  model_dim: int
  inner_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=torch_linear_kernel_init())
    up_bias = torch_linear_bias_init(self.model_dim)
    gate = dense(self.inner_dim, ("embed", "mlp"), bias_init=up_bias, name="gate_proj", **kw)(x)
    inner = dense(self.inner_dim, ("embed", "mlp"), bias_init=up_bias, name="inner_proj", **kw)(x)
    h = nn.with_logical_constraint(nn.silu(gate) * inner, BLM)
    return dense(self.model_dim, ("mlp", "embed"), bias_init=torch_linear_bias_init(self.inner_dim),
                 name="output_proj", **kw)(h)


# ----------------------------------------------------------------------------------------------
# Decoder layer and stack

class DecoderLayer(nn.Module):
  """Pre-norm layer: ``x += drop(self_attn(rms(x)))``; ``x += drop(ffn(rms(x)))``.

  ``deterministic`` may be set as a field (what :class:`TransformerStack` does, so remat/scan need
  no static arguments) or passed to ``__call__``. With ``scan_output`` the layer returns
  ``(x, None)``, the carry/output pair ``nn.scan`` expects.

  With a ``cache`` (this layer's ``{"k", "v"}``, each (B, T, H, D)) and ``cache_index`` (B,),
  self-attention goes through :meth:`Attention.cached` and the layer returns
  ``(x, updated cache)`` (scanned or not).
  """

  config: ModelConfig
  deterministic: Optional[bool] = None
  scan_output: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array], rope: Optional[RopeTables],
               deterministic: Optional[bool] = None, cache: Optional[KVCache] = None,
               cache_index: Optional[Array] = None) -> Any:
    cfg = self.config
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    dtype, param_dtype = cfg.compute_dtype(), cfg.parameter_dtype()
    x = x.astype(jnp.float32)

    h = RMSNorm(cfg.norm_eps, dtype, param_dtype, name="self_attn_layer_norm")(x)
    attn = Attention(cfg.model_dim, cfg.num_heads, cfg.head_dim, dtype, param_dtype,
                     implementation=attention.resolve_implementation(cfg.attention_impl),
                     name="self_attn")
    if cache is None:
      h = attn(h, mask=mask, rope=rope)
    else:
      if cache_index is None:
        raise ValueError("DecoderLayer: cache_index is required with a cache")
      h, cache = attn.cached(h, cache, cache_index, mask=mask, rope=rope)
    h = Dropout(cfg.dropout, name="attn_dropout")(h, deterministic=deterministic)
    x = nn.with_logical_constraint(x + h.astype(jnp.float32), BLE)

    h = RMSNorm(cfg.norm_eps, dtype, param_dtype, name="ffn_layer_norm")(x)
    h = SwiGLUFFN(cfg.model_dim, cfg.swiglu_inner_dim, dtype, param_dtype, name="ffn")(h)
    h = Dropout(cfg.dropout, name="ffn_dropout")(h, deterministic=deterministic)
    x = nn.with_logical_constraint(x + h.astype(jnp.float32), BLE)
    if cache is not None:
      return x, cache
    return (x, None) if self.scan_output else x


_REMAT_POLICIES: dict[str, Any] = {
    "full": None,  # save nothing, recompute the whole layer
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_layer(layer_cls: type[nn.Module], policy: str, *, scanned: bool) -> type[nn.Module]:
  """Wraps ``layer_cls`` in ``nn.remat`` for ``policy`` (``none`` returns it unchanged)."""
  if policy == "none":
    return layer_cls
  if policy not in _REMAT_POLICIES:
    raise ValueError(f"remat_policy {policy!r} not in {['none', *_REMAT_POLICIES]}")
  return nn.remat(layer_cls, policy=_REMAT_POLICIES[policy], prevent_cse=not scanned)


class TransformerStack(nn.Module):
  """``num_layers`` :class:`DecoderLayer` s and a final RMSNorm ``layer_norm``.

  ``scan_layers=True``: one ``nn.scan`` module ``layers`` whose params are stacked on a leading
  axis (logical name ``layers``). ``False``: modules ``layers_0`` ... ``layers_{N-1}``.
  The mask and the RoPE tables are built once here and shared by every layer.

  Incremental decoding: pass ``cache`` (from :func:`init_cache`) and ``cache_index``; see
  :meth:`__call__`. The parameters are the same with or without a cache.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, segment_ids: Optional[Array], positions: Array, *,
               deterministic: bool = True, mask: Optional[Array] = None,
               cache: Optional[KVCache] = None, cache_index: Optional[Array] = None) -> Any:
    """x (B, L, model_dim); segment_ids/positions (B, L) int (0 = padding; positions restart at
    0 per document). ``mask`` overrides the default :func:`causal_segment_mask`.
    Returns (B, L, model_dim) in the compute dtype.

    With ``cache`` (``{"k", "v"}``, each (num_layers, B, T, H, D)) and ``cache_index`` (B,) int:
    ``x`` holds the ``L`` NEW tokens of each row (one document per row), written to slots
    ``cache_index[b] + i``; ``positions`` are their document positions (RoPE); ``segment_ids`` is
    unused (may be None). Queries attend to the slots ``<= cache_index[b] + i`` (the default
    ``mask``, :func:`cache_mask`; an override must be (B or 1, 1, L, T)). Writes past slot T-1
    are dropped, so T must cover every position. Remat is not applied (inference only).
    Returns ``(out (B, L, model_dim), updated cache)``.
    """
    cfg = self.config
    if cache is not None:
      return self._cached(x, positions, deterministic, mask, cache, cache_index)
    if mask is None:
      mask = causal_segment_mask(segment_ids)
    mask = nn.with_logical_constraint(mask, ("activation_batch", None, None, None))
    rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    x = nn.with_logical_constraint(x.astype(jnp.float32), BLE)

    layer_cls = remat_layer(DecoderLayer, cfg.remat_policy, scanned=cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(
          layer_cls,
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, _ = stack(cfg, deterministic=deterministic, scan_output=True, name="layers")(
          x, mask, rope)
    else:
      for i in range(cfg.num_layers):
        x = layer_cls(cfg, deterministic=deterministic, name=f"layers_{i}")(x, mask, rope)

    return RMSNorm(cfg.norm_eps, cfg.compute_dtype(), cfg.parameter_dtype(),
                   name="layer_norm")(x)

  def _cached(self, x: Array, positions: Array, deterministic: bool, mask: Optional[Array],
              cache: KVCache, cache_index: Optional[Array]) -> tuple[Array, KVCache]:
    """The KV-cache path of :meth:`__call__` (same submodule names, so the same params)."""
    cfg = self.config
    if cache_index is None:
      raise ValueError("TransformerStack: cache_index (B,) is required with a cache")
    expected = (cfg.num_layers, x.shape[0])
    if cache["k"].shape[:2] != expected or cache["v"].shape != cache["k"].shape:
      raise ValueError(f"TransformerStack: cache k/v shapes {cache['k'].shape}/"
                       f"{cache['v'].shape} do not start with (num_layers, batch) = {expected}")
    if mask is None:
      mask = cache_mask(cache_index, x.shape[1], cache["k"].shape[2])
    mask = nn.with_logical_constraint(mask, ("activation_batch", None, None, None))
    rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    x = nn.with_logical_constraint(x.astype(jnp.float32), BLE)
    cache_index = cache_index.astype(jnp.int32)

    if cfg.scan_layers:
      stack = nn.scan(
          DecoderLayer,
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, cache = stack(cfg, deterministic=deterministic, scan_output=True, name="layers")(
          x, mask, rope, None, cache, cache_index)
    else:
      ks, vs = [], []
      for i in range(cfg.num_layers):
        x, layer_cache = DecoderLayer(cfg, deterministic=deterministic, name=f"layers_{i}")(
            x, mask, rope, None, {"k": cache["k"][i], "v": cache["v"][i]}, cache_index)
        ks.append(layer_cache["k"])
        vs.append(layer_cache["v"])
      cache = {"k": jnp.stack(ks), "v": jnp.stack(vs)}

    out = RMSNorm(cfg.norm_eps, cfg.compute_dtype(), cfg.parameter_dtype(), name="layer_norm")(x)
    return out, cache
