"""The One-Tower diffusion LCM (the module and its pieces: :mod:`lcm_jax.models.one_tower`).

One causal transformer over interleaved clean and noisy copies of a document's concepts: a noisy
copy sees the clean concepts before it and itself, a clean concept the clean concepts up to
itself; the timestep embedding is concatenated to each input and learned positions are added.
Every concept is a target in one pass; classifier-free guidance drops a noisy copy's view of the
context. Same schedules, x0 loss and DDIM sampler as the Two-Tower. Generation caches the clean
concepts' keys/values; each denoising step recomputes only the noisy slot. The reference has no
One-Tower: its export is a card of lcm_jax's own.
"""

from __future__ import annotations

from typing import Any

from lcm_jax import diffusion
from lcm_jax.families.family import DIFFUSION_FIELDS, Family
from lcm_jax.models import one_tower


def decoder(model: Any, latent_noise_scale: float, sampler: diffusion.SamplerConfig) -> Any:
  del latent_noise_scale  # the diffusion sampler draws its own noise
  return one_tower.OneTowerDecoder(model, sampler)


FAMILY = Family(
    name="one_tower_diffusion_lcm", title="One-Tower diffusion LCM", module=one_tower.OneTowerLCM,
    loss=diffusion.x0_loss, teacher_forced=one_tower.teacher_forced, decoder=decoder,
    samples=True, matmul_param_count=one_tower.matmul_param_count,
    train_flops_per_concept=one_tower.train_flops_per_concept,
    generation_flops=one_tower.generation_flops, describe_layers=one_tower.describe_layers,
    config_fields=DIFFUSION_FIELDS)
