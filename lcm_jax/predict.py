"""Teacher-forced next-concept predictions for every position of a packed batch, both families.

The evaluation view of a model: given the true concepts ``0..j-1`` of a document, what does it
predict for concept ``j``? One call predicts every position of a batch at once:

* Base-LCM: one forward pass; the prediction for concept ``j`` is the post-net output at ``j-1``.
* Two-Tower: one contextualizer pass and one cross-attention K/V projection, then the DDIM sampler
  (with classifier-free guidance) runs on all positions in parallel; position ``j``'s denoiser sees
  the zero slot and context positions ``< j`` of its own document, exactly what incremental
  generation sees when it produces concept ``j`` after a prompt of ``j`` concepts.

Outputs are TARGET-ALIGNED: ``out[:, j]`` predicts concept ``j``, in normalized space; column 0
of a document has no context (Base-LCM: undefined, zeros; Two-Tower: an unconditional sample).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import diffusion
from lcm_jax.generate import guided_denoise_fn
from lcm_jax.models.config import ModelConfig

Array = jax.Array


def teacher_forced(model: Any, cfg: ModelConfig, variables: dict[str, Any],
                   batch: dict[str, Array], *, sampler: diffusion.SamplerConfig | None = None,
                   rng: Array | None = None) -> tuple[Array, Array]:
  """Returns ``(predictions, normalized_inputs)``, both (B, L, S) float32, target-aligned.

  ``batch`` has ``embeddings`` (raw SONAR space), ``segment_ids`` and ``positions`` as produced by
  :mod:`lcm_jax.data`. ``sampler``/``rng`` are used by the Two-Tower only. Jittable with
  ``model``, ``cfg`` and ``sampler`` static.
  """
  emb, seg, pos = batch["embeddings"], batch["segment_ids"], batch["positions"]
  if cfg.family == "base_lcm":
    preds, normalized = model.apply(variables, emb, seg, pos, deterministic=True)
    aligned = jnp.concatenate([jnp.zeros_like(preds[:, :1]), preds[:, :-1]], axis=1)
    return aligned, normalized
  if cfg.family != "two_tower_diffusion_lcm":
    raise ValueError(f"teacher_forced: unknown model family {cfg.family!r}")

  from lcm_jax.models import two_tower  # pylint: disable=g-import-not-at-top
  sampler = sampler or diffusion.SamplerConfig()
  rng = jax.random.key(0) if rng is None else rng
  context, normalized = model.apply(variables, emb, seg, pos, deterministic=True,
                                    method=two_tower.TwoTowerLCM.contextualize)
  k, v = model.apply(variables, context, method=two_tower.TwoTowerLCM.cross_kv)
  cond_mask = two_tower.cross_attention_mask(seg)
  uncond_mask = two_tower.cross_attention_mask(seg, drop_cond=jnp.ones(seg.shape, bool))
  alpha_bar = diffusion.alpha_bar_from_config(cfg)
  denoise = guided_denoise_fn(model, variables, k, v, cond_mask, uncond_mask,
                              sampler.guidance_scale != 1.0)
  preds = diffusion.sample(denoise, rng, normalized.shape, alpha_bar, sampler)
  return preds.astype(jnp.float32), normalized


def nearest_prototype_hits(predictions: np.ndarray, prototypes: np.ndarray,
                           successors: list[np.ndarray], threshold: float) -> np.ndarray:
  """For each prediction (N, S) and its set of true successor prototype ids: 1 if its nearest
  prototype (cosine) is one of them AND the cosine to that prototype is >= ``threshold``."""
  p = predictions / np.maximum(np.linalg.norm(predictions, axis=-1, keepdims=True), 1e-12)
  q = prototypes / np.maximum(np.linalg.norm(prototypes, axis=-1, keepdims=True), 1e-12)
  cos = p @ q.T
  best = cos.argmax(-1)
  return np.array([float(b in set(np.asarray(s).tolist()) and c[b] >= threshold)
                   for b, c, s in zip(best, cos, successors)])
