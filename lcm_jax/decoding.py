"""What every family's generation decoder shares: the normalizer buffers, denormalizing, cosine,
the per-concept random keys and the prefill of a KV cache.

A family's decoder (see :class:`lcm_jax.families.family.Family`) has two methods, both traced
inside the generator's jit:

* ``start(variables, prompts, lengths, total, rng) -> (state, concept)``: prefill a cache of
  ``total`` slots with the right-padded raw prompts (B, P, S) and predict each row's first new
  concept (raw SONAR space, (B, S)) at position ``lengths``;
* ``advance(variables, state, concept, slot, rng) -> (state, concept)``: feed ``concept`` (B, S)
  at position ``slot`` (B,) and predict the next one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lcm_jax import layers

Array = jax.Array
Variables = dict[str, Any]


def normalizer_buffers(buffers: Any) -> tuple[Array, Array]:
  """The (center, scale) of the model's frozen SONAR normalizer, found by name in ``buffers``."""
  found: dict[str, Any] = {}

  def visit(path: Any, leaf: Any) -> None:
    name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
    if name in ("center", "scale"):
      if name in found:
        raise ValueError(f"normalizer_buffers: more than one {name!r} buffer")
      found[name] = leaf

  jax.tree_util.tree_map_with_path(visit, buffers)
  if set(found) != {"center", "scale"}:
    raise ValueError(f"normalizer_buffers: no center/scale buffers (found {sorted(found)})")
  return found["center"], found["scale"]


def denormalize(variables: Variables, x: Array) -> Array:
  """Normalized (..., S) -> raw SONAR space with the model's buffers, float32."""
  center, scale = normalizer_buffers(variables["buffers"])
  return x.astype(jnp.float32) * scale + center


def cosine(a: Array, b: Array, eps: float = 1e-8) -> Array:
  """Cosine similarity over the last axis, float32: ``a.b / max(|a| |b|, eps)``."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  num = jnp.sum(a * b, axis=-1)
  den = jnp.sqrt(jnp.sum(a * a, axis=-1)) * jnp.sqrt(jnp.sum(b * b, axis=-1))
  return num / jnp.maximum(den, eps)


def latent_noise(rng: Array, shape: tuple[int, ...]) -> Array:
  """The N(0, I) draw that Base-LCM adds (times ``temperature``) to a prediction."""
  return jax.random.normal(rng, shape, jnp.float32)


def step_rng(rng: Array, k: Array | int) -> Array:
  """The key used for generated concept ``k`` (0-based): ``fold_in(rng, k)``."""
  return jax.random.fold_in(rng, k)


def prefill_inputs(cfg: Any, prompts: Array, total: int) -> tuple[Any, Array, Array]:
  """An empty KV cache of ``total`` slots, the prompts' positions (0..L-1) and cache offsets (0)."""
  batch, plen = prompts.shape[:2]
  cache = layers.init_cache(cfg, batch, total)
  positions = jnp.broadcast_to(jnp.arange(plen, dtype=jnp.int32), (batch, plen))
  return cache, positions, jnp.zeros((batch,), jnp.int32)
