"""Teacher-forced next-concept predictions for every position of a packed batch, any family.

The evaluation view of a model: given the true concepts ``0..j-1`` of a document, what does it
predict for concept ``j``? One call predicts every position of a batch at once, with the family's
``teacher_forced`` (:mod:`lcm_jax.families`): Base-LCM one forward pass; the diffusion families
the DDIM sampler (with classifier-free guidance) on all positions in parallel, each position
seeing exactly what incremental generation sees when it produces that concept.

Outputs are TARGET-ALIGNED: ``out[:, j]`` predicts concept ``j``, in normalized space; column 0
of a document has no context (Base-LCM: undefined, zeros; diffusion: an unconditional sample).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from lcm_jax import diffusion
from lcm_jax import families
from lcm_jax.models.config import ModelConfig

Array = jax.Array


def teacher_forced(model: Any, cfg: ModelConfig, variables: dict[str, Any],
                   batch: dict[str, Array], *, sampler: diffusion.SamplerConfig | None = None,
                   rng: Array | None = None) -> tuple[Array, Array]:
  """Returns ``(predictions, normalized_inputs)``, both (B, L, S) float32, target-aligned.

  ``batch`` has ``embeddings`` (raw SONAR space), ``segment_ids`` and ``positions`` as produced by
  :mod:`lcm_jax.data`. ``sampler``/``rng`` are used by the sampling families only. Jittable with
  ``model``, ``cfg`` and ``sampler`` static.
  """
  return families.of(cfg).teacher_forced(model, variables, batch, sampler=sampler, rng=rng)


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
