"""Softmax attention with a configurable implementation: ``xla``, ``cudnn`` or ``splash``.

:func:`dot_product_attention` is the one attention function of every family (through
:class:`lcm_jax.layers.Attention` and :func:`lcm_jax.layers.dot_product_attention`). Its contract
does not depend on the implementation: q (B, Lq, H, D), k/v (B, Lk, H, D), a boolean ``mask``
(True = may attend) broadcastable to (B, H, Lq, Lk) or None, scale ``1/sqrt(D)``, output
(B, Lq, H, D) in the compute dtype. A fully masked row (a padding query) gives finite garbage that
never reaches an unmasked position.

Implementations (``config.model.attention_impl``, resolved by :func:`resolve_implementation`):

* ``xla``: einsums in the compute dtype, logits and softmax in float32, masked logits set to a
  finite minimum (a fully masked row is uniform, not NaN). The reference numbers: bitwise what
  ``lcm_jax.layers`` always computed.
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (cuDNN flash attention).
  :func:`cudnn_arguments` translates our inputs into its arguments; the same arguments given to
  ``implementation="xla"`` compute our attention on any backend, which is how the translation is
  tested on CPU. How each of our masks reaches cuDNN:

  - every boolean mask (packed rows: causal + same segment; the Two-Tower cross-attention mask
    over ``[zero slot ; context]``; the KV-cache decode mask :func:`lcm_jax.layers.cache_mask`;
    the One-Tower masks; anything else) goes in as ``mask=``, which JAX turns into an additive
    bias (0 / a large finite negative number) of shape (B|1, H|1, Lq, Lk). A bias is the only way
    ``jax.nn.dot_product_attention`` takes a per-row mask: its ``query_seq_lengths`` /
    ``key_value_seq_lengths`` describe one sequence per row with trailing padding only (not
    packed rows, and they ZERO padded queries' outputs), and cuDNN's packed-segment layout
    (``q_offsets``/``kv_offsets``, Hopper only) is not exposed by it;
  - ``is_causal=True`` (cuDNN skips the blocks above the diagonal) only when the caller promises
    that its mask lies inside the top-left causal mask (``q_index >= kv_index``): true for
    packed rows and for the unshifted Two-Tower cross mask (key ``j + 1`` = context ``j < i``),
    false for the KV-cache mask (query ``i`` sees slot ``cache_index + i``) and the shifted
    cross masks of generation. No caller makes that promise today: the layers receive only the
    dense mask (see "Not done" below);
  - cuDNN needs even Lq and Lk when it is differentiated with a bias (which this code cannot
    know at trace time), so an odd length is padded by one position: a key slot that no query
    sees, or a query row whose output is dropped. That is exact for every row that sees at least
    one key (the Two-Tower's odd ``Lc + 1`` keys always go this way);
  - fully masked rows stay finite: their bias is finite (uniform weights, as ``xla``; with
    ``is_causal`` uniform over the keys up to the row's own index).

  Falls back to ``xla``, logging the reason ONCE per reason (at trace time, absl WARNING), when
  cuDNN cannot run the call: a compute dtype other than bfloat16/float16 (cuDNN has no float32
  flash attention; the inputs are not downcast behind the user's back), a head_dim that is not a
  multiple of 8 or above 128 (256 on Hopper and later), or cuDNN itself refusing at trace time
  (e.g. no cuDNN in a ROCm build). A refusal when XLA compiles the cuDNN call is not caught here
  (choose ``xla`` then).
* ``splash``: TPU splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``), for the
  packed-row self-attention mask only (causal + same segment), given as segment ids:
  :func:`splash_attention`. It runs on CPU in Pallas interpret mode in this JAX version, which is
  how it is tested; it has never run on a TPU in this project. Falls back to ``xla`` (logged once
  per reason) when the caller gives no ``segment_ids`` (a dense mask alone cannot be handed to
  the kernel), for cross-attention (Lq != Lk), lengths that are not a multiple of 128 (the
  kernel's smallest block), and under a multi-device mesh (a Pallas TPU kernel is not
  partitioned automatically: it needs a ``shard_map`` wrapper, not built here).

``auto`` resolves per platform: ``xla`` on CPU, ``cudnn`` on GPU, and ``xla`` on TPU. Not
``splash`` on TPU, although the kernel works (in interpret mode): the layers hand attention only
the dense mask that :class:`lcm_jax.layers.TransformerStack` builds, never the segment ids, so
every splash call of today's models would fall back to ``xla`` anyway, and splash under the
multi-device meshes TPU runs use needs the ``shard_map`` wrapper. ``auto`` should become
``splash`` on TPU once both exist and it has been checked on a TPU.

Errors: an unknown name, or an explicit ``cudnn`` on a non-GPU platform or ``splash`` on a non-TPU
platform, is a :class:`lcm_jax.errors.ConfigError` naming the platform and the allowed values
(raised when the model is traced). A user who names a kernel must learn that it cannot run there
rather than silently get another; ``auto`` is the portable choice (it never errors), and
per-call limits (dtype, head_dim, mask) fall back with a logged reason rather than fail, as a
kernel that cannot take one call of a model can still take the others. Consequence: a run saved
with an explicit ``cudnn`` must be restored on a GPU or with ``attention_impl`` changed (the
field is resumable: it changes no parameter).

Not done: ``is_causal`` for cuDNN and ``splash`` inside the models (the causal promise and the
segment ids must reach the attention layers: a change in ``TransformerStack``/``DecoderLayer``);
the One-Tower's attention over a cache plus each query itself
(:func:`lcm_jax.models.one_tower.attend_cache_and_self`, inference only) is always ``xla``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from absl import logging

from lcm_jax.errors import ConfigError
from lcm_jax.models.config import ATTENTION_IMPLS

Array = jax.Array
Dtype = Any

IMPLEMENTATIONS = ("xla", "cudnn", "splash")
"""The concrete implementations (``ATTENTION_IMPLS`` without ``auto``)."""

# Finite "minus infinity" for masked logits: fully masked rows (padding) give a uniform softmax
# instead of NaN, and ``x - max`` cannot produce ``inf - inf``.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)

# ``auto`` per platform (see the module docstring for why TPU is ``xla``).
_AUTO = {"cpu": "xla", "gpu": "cudnn", "cuda": "cudnn", "rocm": "cudnn", "tpu": "xla"}
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")
_SPLASH_BLOCK = 128  # the kernel's smallest block (a TPU vreg has 128 lanes)

_logged_fallbacks: set[tuple[str, str]] = set()


# ----------------------------------------------------------------------------------------------
# Choosing the implementation

def _platform() -> str:
  """The platform the computation runs on (``cpu``, ``gpu``, ``tpu``)."""
  return jax.default_backend()


def resolve_implementation(name: str, platform: Optional[str] = None) -> str:
  """``config.model.attention_impl`` -> the implementation to use on ``platform``.

  ``platform`` defaults to JAX's default backend. ``auto`` -> ``xla`` on CPU and TPU, ``cudnn``
  on GPU. Raises :class:`ConfigError` for an unknown name, ``cudnn`` off GPU and ``splash`` off
  TPU.
  """
  platform = _platform() if platform is None else platform
  if name not in ATTENTION_IMPLS:
    raise ConfigError(f"config.model.attention_impl: {name!r} not in {ATTENTION_IMPLS}")
  if name == "auto":
    return _AUTO.get(platform, "xla")
  if name == "cudnn" and platform not in _GPU_PLATFORMS:
    raise ConfigError(
        f"config.model.attention_impl: 'cudnn' needs a GPU, but JAX runs on {platform!r}; "
        f"choose one of {ATTENTION_IMPLS} ('auto' picks {_AUTO.get(platform, 'xla')!r} here)")
  if name == "splash" and platform != "tpu":
    raise ConfigError(
        f"config.model.attention_impl: 'splash' needs a TPU, but JAX runs on {platform!r}; "
        f"choose one of {ATTENTION_IMPLS} ('auto' picks {_AUTO.get(platform, 'xla')!r} here)")
  return name


def _log_fallback(implementation: str, reason: str) -> None:
  """Logs (once per implementation and reason) that ``implementation`` falls back to xla."""
  key = (implementation, reason)
  if key not in _logged_fallbacks:
    _logged_fallbacks.add(key)
    logging.warning("attention: %s cannot run this call, using xla instead: %s",
                    implementation, reason)


# ----------------------------------------------------------------------------------------------
# The function

def dot_product_attention(q: Array, k: Array, v: Array, mask: Optional[Array], *, dtype: Dtype,
                          implementation: str = "xla", is_causal: bool = False,
                          segment_ids: Optional[Array] = None) -> Array:
  """Softmax attention. q (B, Lq, H, D), k/v (B, Lk, H, D), mask bool broadcastable to
  (B, H, Lq, Lk) or None. Scale 1/sqrt(D); matmuls in ``dtype``; softmax in float32.

  Args:
    q, k, v: queries, keys, values.
    mask: True = may attend; None = every query sees every key.
    dtype: the compute dtype (of the matmuls and the output).
    implementation: ``xla`` | ``cudnn`` | ``splash`` | ``auto`` (see the module docstring).
    is_causal: the caller's PROMISE that ``mask`` lies inside the top-left causal mask
      (``q_index >= kv_index``); lets cuDNN skip the blocks above the diagonal. Never changes
      the ``xla`` numbers.
    segment_ids: (B, L) int, the caller's PROMISE that ``mask`` is the packed-row mask of these
      ids (causal, same segment, 0 = padding; :func:`lcm_jax.layers.causal_segment_mask`).
      Needed by ``splash``; the others use ``mask``.

  Returns:
    (B, Lq, H, D) in ``dtype``. Fully masked rows give finite values (which ones depends on the
    implementation: they are garbage that no unmasked position sees).
  """
  implementation = resolve_implementation(implementation)
  if implementation == "cudnn":
    return _cudnn_attention(q, k, v, mask, dtype=dtype, is_causal=is_causal)
  if implementation == "splash":
    reason = _splash_unsupported(q, k, is_causal=is_causal, segment_ids=segment_ids)
    if reason is None:
      return splash_attention(q, k, v, segment_ids, dtype=dtype)
    _log_fallback("splash", reason)
  return xla_attention(q, k, v, mask, dtype=dtype)


def xla_attention(q: Array, k: Array, v: Array, mask: Optional[Array], *, dtype: Dtype) -> Array:
  """The ``xla`` implementation: einsums in ``dtype``, logits/softmax in float32.

  Fully masked rows get a finite mask value, hence a uniform (not NaN) distribution; their outputs
  are garbage but finite, and never reach unmasked positions.
  """
  q = q * jnp.asarray(q.shape[-1] ** -0.5, dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dtype), k.astype(dtype),
                      preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(dtype))


# ----------------------------------------------------------------------------------------------
# cuDNN

class CudnnCall(NamedTuple):
  """The arguments of ``jax.nn.dot_product_attention`` that compute our attention."""

  query: Array
  key: Array
  value: Array
  kwargs: dict[str, Any]
  """``mask`` (bool (B|1, H|1, Lq', Lk') or None), ``is_causal``, ``scale``."""
  q_len: int
  """The caller's Lq: the output is cut back to it (Lq' may be Lq + 1)."""

  def run(self, implementation: str = "cudnn") -> Array:
    """``jax.nn.dot_product_attention(..., implementation=implementation)`` on these arguments,
    cut back to (B, q_len, H, D). ``xla`` (or None) runs the same maths on any backend."""
    out = jax.nn.dot_product_attention(self.query, self.key, self.value,
                                       implementation=implementation, **self.kwargs)
    return out[:, :self.q_len]


def _pad_axis(x: Array, axis: int, value: Any = 0) -> Array:
  """``x`` with one more entry (``value``) at the end of ``axis``."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, 1)
  return jnp.pad(x, widths, constant_values=value)


def cudnn_arguments(q: Array, k: Array, v: Array, mask: Optional[Array], *,
                    is_causal: bool = False) -> CudnnCall:
  """Translates one attention call into ``jax.nn.dot_product_attention``'s arguments.

  The mask goes in as ``mask=`` (a bias to cuDNN), broadcast to its full (Lq, Lk) extent (a
  bias must have them); ``is_causal`` is passed on (a promise, see
  :func:`dot_product_attention`). With a mask, an odd Lk gets one more key slot (zero k/v, seen
  by no query) and an odd Lq one more query row (fully masked, its output cut off), since cuDNN
  wants even lengths when a bias is differentiated. q/k/v keep their dtypes.
  """
  q_len, kv_len = q.shape[1], k.shape[1]
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (q_len, kv_len))
    if kv_len % 2:
      k, v, mask = _pad_axis(k, 1), _pad_axis(v, 1), _pad_axis(mask, 3, False)
    if q_len % 2:
      q, mask = _pad_axis(q, 1), _pad_axis(mask, 2, False)
  kwargs = dict(mask=mask, is_causal=bool(is_causal), scale=float(q.shape[-1] ** -0.5))
  return CudnnCall(q, k, v, kwargs, q_len)


def _cudnn_max_head_dim() -> int:
  """cuDNN flash attention's largest head_dim: 256 on Hopper (sm_90) and later, else 128."""
  try:
    major = int(str(jax.devices()[0].compute_capability).split(".")[0])
  except (AttributeError, ValueError, IndexError):
    return 128
  return 256 if major >= 9 else 128


def cudnn_unsupported(q: Array, dtype: Dtype) -> Optional[str]:
  """Why cuDNN flash attention cannot take (B, Lq, H, D) queries in ``dtype``; None if it can."""
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return (f"cuDNN flash attention needs bfloat16 or float16 inputs, the compute dtype is "
            f"{dtype.name} (config.model.dtype)")
  head_dim, limit = q.shape[-1], _cudnn_max_head_dim()
  if head_dim % 8 or head_dim > limit:
    return f"cuDNN needs head_dim a multiple of 8 and <= {limit}, got {head_dim}"
  return None


def _cudnn_attention(q: Array, k: Array, v: Array, mask: Optional[Array], *, dtype: Dtype,
                     is_causal: bool) -> Array:
  """The ``cudnn`` implementation, or ``xla`` (logged) where cuDNN cannot run the call."""
  reason = cudnn_unsupported(q, dtype)
  if reason is None:
    call = cudnn_arguments(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask,
                           is_causal=is_causal)
    try:
      return call.run("cudnn")
    except (NotImplementedError, RuntimeError, ValueError) as e:  # cuDNN's own trace-time checks
      reason = f"cuDNN refused the call: {e}"
  _log_fallback("cudnn", reason)
  return xla_attention(q, k, v, mask, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Splash (TPU)

def _splash_unsupported(q: Array, k: Array, *, is_causal: bool,
                        segment_ids: Optional[Array]) -> Optional[str]:
  """Why :func:`splash_attention` cannot run this call; None if it can."""
  if segment_ids is None or not is_causal:
    return ("splash needs the packed-row segment ids (causal self-attention); this call has a "
            "dense mask only")
  q_len, kv_len = q.shape[1], k.shape[1]
  if q_len != kv_len:
    return f"splash runs self-attention only, got Lq={q_len} != Lk={kv_len}"
  if q_len % _SPLASH_BLOCK:
    return f"splash needs a length that is a multiple of {_SPLASH_BLOCK}, got {q_len}"
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    return (f"splash under a {mesh.size}-device mesh needs a shard_map wrapper, which is not "
            "built")
  return None


def _splash_block(length: int) -> int:
  """The largest of 512, 256, 128 that divides ``length`` (a multiple of 128)."""
  return next(b for b in (512, 256, _SPLASH_BLOCK) if length % b == 0)


def _splash_kernel(num_heads: int, length: int, interpret: bool) -> Any:
  """A causal multi-head splash kernel for (H, L, D) inputs (its block tables are constants of
  the traced computation, so it is built per trace, not cached)."""
  # pylint: disable-next=g-import-not-at-top  (Pallas TPU code: imported only when used)
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as sk, splash_attention_mask as sm)
  block = _splash_block(length)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(num_heads)])
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, *, dtype: Dtype,
                     interpret: Optional[bool] = None) -> Array:
  """Packed-row causal self-attention with the TPU splash kernel.

  q/k/v (B, L, H, D), L a multiple of 128; ``segment_ids`` (B, L) int (0 = padding). Query i sees
  key j iff ``j <= i`` and the ids are equal: exactly :func:`lcm_jax.layers.causal_segment_mask`
  for non-padding queries. Padding queries (id 0) see the padding keys before them, themselves
  included (finite garbage; ``xla`` gives them a uniform row instead). Matmuls in ``dtype``,
  softmax in float32. ``interpret`` (default: off TPU) runs the kernel in Pallas interpret mode.
  """
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  kernel = _splash_kernel(q.shape[2], q.shape[1], bool(interpret))
  q = (q * jnp.asarray(q.shape[-1] ** -0.5, dtype)).astype(dtype)
  k, v = k.astype(dtype), v.astype(dtype)
  ids = jnp.asarray(segment_ids, jnp.int32)

  def one_row(q: Array, k: Array, v: Array, ids: Array) -> Array:  # (L, H, D) each
    heads_first = lambda x: jnp.swapaxes(x, 0, 1)
    out = kernel(heads_first(q), heads_first(k), heads_first(v),
                 segment_ids=sk.SegmentIds(q=ids, kv=ids))
    return heads_first(out)

  return jax.vmap(one_row)(q, k, v, ids).astype(dtype)


def _reset_logged_fallbacks() -> None:
  """Forgets which fallbacks were logged (tests)."""
  _logged_fallbacks.clear()

