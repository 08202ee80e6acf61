"""The Two-Tower diffusion LCM (the module: :mod:`lcm_jax.models.two_tower`).

A contextualizer (the Base-LCM body) reads the clean concepts; a denoiser with AdaLN timestep
modulation predicts x0 of the next concept by cross-attending to the context (the zero slot first,
so position 0 has something to attend to). Teacher-forced predictions run the DDIM sampler with
classifier-free guidance on every position at once; generation keeps the contextualizer's KV
cache and a per-row buffer of cross-attention keys/values.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import decoding
from lcm_jax import diffusion
from lcm_jax import layers
from lcm_jax.families.family import DIFFUSION_FIELDS, Family
from lcm_jax.models import flops
from lcm_jax.models import two_tower
from lcm_jax.models.config import ModelConfig
from lcm_jax.models.two_tower import TwoTowerLCM

Array = jax.Array


def teacher_forced(model: nn.Module, variables: dict[str, Any], batch: dict[str, Array], *,
                   sampler: diffusion.SamplerConfig | None = None,
                   rng: Array | None = None) -> tuple[Array, Array]:
  """One contextualizer pass and one cross K/V projection, then the DDIM sampler (with guidance)
  on all positions in parallel: position ``j``'s denoiser sees the zero slot and the context
  positions ``< j`` of its own document, as incremental generation does."""
  sampler = sampler or diffusion.SamplerConfig()
  rng = jax.random.key(0) if rng is None else rng
  emb, seg, pos = batch["embeddings"], batch["segment_ids"], batch["positions"]
  context, normalized = model.apply(variables, emb, seg, pos, deterministic=True,
                                    method=TwoTowerLCM.contextualize)
  k, v = model.apply(variables, context, method=TwoTowerLCM.cross_kv)
  cond_mask = two_tower.cross_attention_mask(seg)
  uncond_mask = two_tower.cross_attention_mask(seg, drop_cond=jnp.ones(seg.shape, bool))
  alpha_bar = diffusion.alpha_bar_from_config(model.config)
  denoise = guided_denoise_fn(model, variables, k, v, cond_mask, uncond_mask,
                              sampler.guidance_scale != 1.0)
  preds = diffusion.sample(denoise, rng, normalized.shape, alpha_bar, sampler)
  return preds.astype(jnp.float32), normalized


def guided_denoise_fn(model: Any, variables: decoding.Variables, cross_k: Array, cross_v: Array,
                      cond_mask: Array, uncond_mask: Array, guided: bool) -> Any:
  """The ``denoise_fn`` that :func:`lcm_jax.diffusion.sample` calls, for a Two-Tower model.

  ``cross_k``/``cross_v`` are (denoiser_layers, B, Lk, H, D); ``cond_mask``/``uncond_mask`` are
  (B, 1, Lq, Lk) cross-attention masks of the conditional and unconditional (zero slot only)
  halves; the noisy queries are (B, Lq, S). With ``guided`` both halves run as one batch of 2B.
  """
  batch, q_len = cond_mask.shape[0], cond_mask.shape[2]
  if guided:  # built once, outside the sampler's loop
    k2, v2 = (jnp.concatenate([a, a], axis=1) for a in (cross_k, cross_v))
    mask2 = jnp.concatenate([cond_mask, uncond_mask], axis=0)

  def denoise_fn(x_t: Array, t: Array, with_uncond: bool) -> Any:
    if with_uncond:
      x2 = jnp.concatenate([x_t, x_t], axis=0)
      ts = jnp.full((2 * batch, q_len), t, jnp.int32)
      out = model.apply(variables, x2, ts, k2, v2, mask2, deterministic=True,
                        method=TwoTowerLCM.denoise)
      return out[:batch], out[batch:]
    ts = jnp.full((batch, q_len), t, jnp.int32)
    return model.apply(variables, x_t, ts, cross_k, cross_v, cond_mask, deterministic=True,
                       method=TwoTowerLCM.denoise)

  return denoise_fn


def two_tower_predict(model: Any, variables: decoding.Variables, cross_k: Array, cross_v: Array,
                      query_pos: Array, rng: Array, sampler: diffusion.SamplerConfig,
                      alpha_bar: np.ndarray) -> Array:
  """Samples one concept per row with the Two-Tower denoiser; returns normalized x0 (B, S).

  ``cross_k``/``cross_v`` are (denoiser_layers, B, Lk, H, D) with the zero slot at index 0 and the
  context of document position ``j`` at index ``j + 1``; ``query_pos`` (B,) is the position of
  the concept being generated: the conditional half sees slots ``<= query_pos`` (zero slot +
  context positions ``< query_pos``), the unconditional half slot 0 only.
  """
  batch, lk = cross_k.shape[1], cross_k.shape[2]
  slots = jnp.arange(lk, dtype=jnp.int32)
  cond = (slots[None, :] <= query_pos.astype(jnp.int32)[:, None])[:, None, None, :]
  uncond = jnp.broadcast_to((slots == 0)[None, None, None, :], cond.shape)
  denoise_fn = guided_denoise_fn(model, variables, cross_k, cross_v, cond, uncond,
                                 sampler.guidance_scale != 1.0)
  x0 = diffusion.sample(denoise_fn, rng, (batch, 1, model.config.sonar_embed_dim), alpha_bar,
                        sampler)
  return x0[:, 0]


class Decoder:
  """Generation state: the contextualizer's KV cache + a per-row cross-attention K/V buffer."""

  def __init__(self, model: Any, latent_noise_scale: float, sampler: diffusion.SamplerConfig):
    del latent_noise_scale  # the diffusion sampler draws its own noise
    self.model = model
    self.sampler = sampler
    self.alpha_bar = diffusion.alpha_bar_from_config(model.config)

  def _concept(self, variables: decoding.Variables, state: dict[str, Any], query_pos: Array,
               rng: Array) -> Array:
    x0 = two_tower_predict(self.model, variables, state["cross_k"], state["cross_v"], query_pos,
                           rng, self.sampler, self.alpha_bar)
    return decoding.denormalize(variables, x0)

  def start(self, variables: decoding.Variables, prompts: Array, lengths: Array, total: int,
            rng: Array) -> tuple[Any, Array]:
    batch, plen = prompts.shape[:2]
    cache, positions, index = decoding.prefill_inputs(self.model.config, prompts, total)
    context, _, cache = self.model.apply(
        variables, prompts, None, positions, cache=cache, cache_index=index, deterministic=True,
        method=TwoTowerLCM.contextualize)
    k, v = self.model.apply(variables, context, prepend_zero=True, method=TwoTowerLCM.cross_kv)
    shape = (k.shape[0], batch, total + 1) + k.shape[3:]
    state = {"cache": cache,
             "cross_k": jnp.zeros(shape, k.dtype).at[:, :, :plen + 1].set(k),
             "cross_v": jnp.zeros(shape, v.dtype).at[:, :, :plen + 1].set(v)}
    return state, self._concept(variables, state, lengths, rng)

  def advance(self, variables: decoding.Variables, state: dict[str, Any], concept: Array,
              slot: Array, rng: Array) -> tuple[Any, Array]:
    context, _, cache = self.model.apply(
        variables, concept[:, None], None, slot[:, None], cache=state["cache"], cache_index=slot,
        deterministic=True, method=TwoTowerLCM.contextualize)
    k, v = self.model.apply(variables, context, prepend_zero=False, method=TwoTowerLCM.cross_kv)
    write = jax.vmap(layers.update_cache, in_axes=(0, 0, None))
    state = {"cache": cache, "cross_k": write(state["cross_k"], k, slot + 1),
             "cross_v": write(state["cross_v"], v, slot + 1)}
    return state, self._concept(variables, state, slot + 1, rng)


def matmul_param_count(cfg: ModelConfig) -> int:
  """With the exact shortcuts on: ``pre_linear`` and the contextualizer layers; the denoiser's
  ``initial_proj``, ``final_proj`` and per layer the self-attention ``v_proj`` + ``output_proj``
  (q/k skipped: identity mask), the cross-attention q/k/v/output (k/v run once per context
  position, i.e. once per concept; the extra zero slot is added in
  :func:`train_flops_per_concept`) and the FFN. The modulators and ``embed_time`` run on the
  (T, d) timestep table, not per concept, so they are NOT in this count."""
  d, s, f = cfg.model_dim, cfg.sonar_embed_dim, cfg.swiglu_inner_dim
  inner = cfg.num_heads * cfg.head_dim
  body = cfg.num_layers * flops.body_layer_matmul_params(cfg)
  denoiser_layer = 2 * d * inner + 4 * d * inner + 3 * d * f
  return s * d + body + s * d + cfg.denoiser_num_layers * denoiser_layer + d * s


def train_flops_per_concept(cfg: ModelConfig, seq_len: int, rows_per_step: int = 0) -> int:
  """As executed with the exact shortcuts on:

  * contextualizer: the Base-LCM body (``keys = seq_len``), plus ``pre_linear``;
  * denoiser self-attention: ``output_proj(v_proj(h))`` only (identity mask);
  * denoiser cross-attention: ``seq_len`` queries against ``seq_len + 1`` keys (the zero slot),
    whose k/v projections run on ``seq_len + 1`` rows per ``seq_len`` concepts;
  * the timestep table (``embed_time`` on T timesteps and every layer's Linear(d, 9d)) runs once
    per step: counted only when ``rows_per_step`` (rows per step and device) is given, amortised
    over ``rows_per_step * seq_len`` concepts (negligible when that is >> T).
  Rounded to an integer.
  """
  d, n_den, num_t = cfg.model_dim, cfg.denoiser_num_layers, cfg.num_diffusion_train_steps
  inner = cfg.num_heads * cfg.head_dim
  # Per row of seq_len concepts, so that the zero slot's k/v rows stay exact integers.
  per_row = seq_len * 6 * matmul_param_count(cfg)
  per_row += 6 * n_den * 2 * d * inner                                      # zero slot k/v
  per_row += seq_len * 3 * (flops.attention_fwd_flops(cfg, seq_len, cfg.num_layers)
                            + flops.attention_fwd_flops(cfg, seq_len + 1, n_den))
  result = per_row / seq_len
  if rows_per_step > 0:
    table = 6 * num_t * (cfg.timestep_embed_dim * d + d * d + n_den * d * 9 * d)
    result += table / (rows_per_step * seq_len)
  return int(round(result))


def generation_flops(cfg: ModelConfig, batch: int, prompt_len: int, max_len: int,
                     visited: int = 0, halves: int = 1) -> int:
  """``visited`` DDIM timesteps per concept, ``halves`` = 2 with guidance:

  * contextualizer (``pre_linear`` + layers, ``keys = slots``) on ``prompt_len + max_len - 1``
    positions; the denoiser's cross k/v projections on ``prompt_len + max_len`` context rows
    (the zero slot included);
  * per generated concept, ``visited`` denoiser calls of ``halves`` queries each:
    ``initial_proj``, per layer the self-attention v/output projections, the cross-attention
    q/output projections and the products against ``keys = slots + 1``, the FFN, ``final_proj``;
    plus the timestep embedding and every layer's modulator: per query when a call has fewer
    than T queries, else once on the (T, d) table per call (the model's shortcut 2).
  """
  d, s, f = cfg.model_dim, cfg.sonar_embed_dim, cfg.swiglu_inner_dim
  inner = cfg.num_heads * cfg.head_dim
  n_den, num_t = cfg.denoiser_num_layers, cfg.num_diffusion_train_steps
  slots = prompt_len + max_len
  positions = prompt_len + max_len - 1
  body = cfg.num_layers * flops.body_layer_matmul_params(cfg)
  context = batch * positions * (2 * (s * d + body)
                                 + flops.attention_fwd_flops(cfg, slots, cfg.num_layers))
  cross_kv = batch * slots * 2 * n_den * 2 * d * inner
  query = 2 * (s * d + n_den * (4 * d * inner + 3 * d * f) + d * s)
  query += flops.attention_fwd_flops(cfg, slots + 1, n_den)
  time_table = 2 * (cfg.timestep_embed_dim * d + d * d + n_den * d * 9 * d)
  queries = batch * halves
  per_call = queries * query + (time_table * num_t if queries >= num_t else time_table * queries)
  return context + cross_kv + max_len * visited * per_call


def describe_layers(cfg: ModelConfig) -> str:
  return (f"{cfg.num_layers} contextualizer + {cfg.denoiser_num_layers} denoiser "
          f"(T={cfg.num_diffusion_train_steps}, {cfg.beta_schedule})")


FAMILY = Family(
    name="two_tower_diffusion_lcm", title="Two-Tower diffusion LCM", module=TwoTowerLCM,
    loss=diffusion.x0_loss, teacher_forced=teacher_forced, decoder=Decoder, samples=True,
    matmul_param_count=matmul_param_count, train_flops_per_concept=train_flops_per_concept,
    generation_flops=generation_flops, describe_layers=describe_layers,
    config_fields=DIFFUSION_FIELDS | {"denoiser_num_layers"})
