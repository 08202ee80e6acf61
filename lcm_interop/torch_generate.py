"""Generation with the plain-PyTorch models of :mod:`lcm_interop.torch_models`: the DDIM + guidance
sampler of :mod:`lcm_jax.diffusion` and the KV-cached decoding loop and stopping rules of
:mod:`lcm_jax.generate`, reimplemented in torch. Importing it imports no JAX.

Same settings, defaults and validation as the JAX side (the JAX-free
:class:`~lcm_jax.generation_config.GenerationConfig` and :class:`~lcm_jax.schedules.SamplerConfig`
are shared, as are the host float64 schedule/timestep/coefficient computations of
:mod:`lcm_jax.schedules`), and the same algorithm step by step:
  * prompts right-padded, one KV-cache prefill from slot 0, concept k of row b predicted at
    document position ``n_b + k`` and fed back at that slot (Two-Tower: the contextualizer's
    cache plus a per-row cross-attention K/V buffer with the zero slot at index 0);
  * Two-Tower: :func:`sample` over one query per row, conditional half seeing the zero slot and
    the context of positions ``< n_b + k``, unconditional half the zero slot only (one 2B batch);
  * One-Tower: a cache of the CLEAN concepts' keys/values (prompts prefilled from slot 0, each
    generated concept appended as a clean query at t = 0); :func:`sample` over ONE noisy query per
    row at position ``n_b + k`` seeing the slots ``< n_b + k`` and itself, the unconditional half
    (guided) itself only, both as 2 queries of one call;
  * Base-LCM: the post-net prediction plus ``temperature * noise`` when
    ``sample_latent_variable`` (and ``temperature > 0``);
  * diffusion families: the latent clipped to ``+-clip_noise`` after every DDIM step, optional
    static/dynamic thresholding of x0 (:func:`threshold_x0`);
  * stopping (per row, frozen once stopped): ``eot`` (cosine to the end-of-text vector >=
    ``eot_threshold``), ``repetition`` (cosine to the previous concept >=
    ``repetition_threshold``), neither for the first ``min_gen_len`` generated concepts (never
    the first one; the reference's rule), EOT first; ``max_len``. Triggering concepts are kept.

Noise is injectable, so that both implementations can be fed the same draws: ``noise(k, step,
shape)`` returns a float32 STANDARD normal tensor for generated concept ``k`` (0-based); ``step``
is None for the concept's main draw (diffusion families: the initial DDIM noise, shape (B, 1, S),
before
``initial_noise_scale`` and clipping; Base-LCM: the latent noise, shape (B, S)) and ``i`` for the
``eta > 0`` noise of DDIM step i (shape (B, 1, S)). The JAX side draws, for ``rng``:
``key = jax.random.fold_in(rng, k)``; Base-LCM ``jax.random.normal(key, shape)``; diffusion
families ``init, eta = jax.random.split(key)``, ``jax.random.normal(init, shape)`` and, for step i,
``jax.random.normal(jax.random.split(eta, n_visited)[i], shape)``. A callback that computes these
reproduces :func:`lcm_jax.generate.generate` concept for concept (up to float32 rounding);
the default, :func:`torch_noise`, draws from a seeded ``torch.Generator`` instead.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from lcm_interop import reference
from lcm_interop.torch_models import Model, update_cache
from lcm_jax import schedules as diffusion  # the JAX-free half of lcm_jax.diffusion
from lcm_jax.errors import UserError
from lcm_jax.generation_config import (EOT, MAX_LEN, REPETITION, RUNNING, GenerationConfig,
                                       GenerationResult, may_stop_early, pad_prompts)

NoiseFn = Callable[[int, Optional[int], tuple[int, ...]], Tensor]
DenoiseFn = Callable[[Tensor, int, bool], Union[Tensor, tuple[Tensor, Tensor]]]


def torch_noise(seed: int = 0, device: Union[str, torch.device] = "cpu") -> NoiseFn:
  """A :data:`NoiseFn` drawing from one ``torch.Generator(seed)`` in call order."""
  gen = torch.Generator(device=device).manual_seed(seed)

  def noise(k: int, step: Optional[int], shape: tuple[int, ...]) -> Tensor:
    del k, step
    return torch.randn(shape, generator=gen, dtype=torch.float32, device=device)

  return noise


def cosine(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
  """Cosine over the last axis in float32: ``a.b / max(|a| |b|, eps)``."""
  a, b = a.to(torch.float32), b.to(torch.float32)
  den = torch.sqrt(torch.sum(a * a, -1)) * torch.sqrt(torch.sum(b * b, -1))
  return torch.sum(a * b, -1) / torch.clamp(den, min=eps)


# ----------------------------------------------------------------------------------------------
# DDIM sampler with classifier-free guidance

def guided_eps(eps_cond: Tensor, eps_uncond: Tensor, guidance_scale: float,
               guidance_rescale: float = 0.0) -> Tensor:
  """``eps_u + g (eps_c - eps_u)``, then rescale by ``r std(eps_c)/std(eps) + (1 - r)`` (unbiased
  std over the last axis; ratio 1 where ``std(eps) == 0``)."""
  eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
  if guidance_rescale == 0.0:
    return eps
  std_cond = torch.std(eps_cond, dim=-1, keepdim=True)
  std_guided = torch.std(eps, dim=-1, keepdim=True)
  ok = std_guided > 0
  ratio = torch.where(ok, std_cond / torch.where(ok, std_guided, torch.ones_like(std_guided)),
                      torch.ones_like(std_guided))
  return guidance_rescale * (eps * ratio) + (1.0 - guidance_rescale) * eps


def _eps_from_x0(x: Tensor, x0: Tensor, sqrt_ab: Tensor, sqrt_one_minus_ab: Tensor) -> Tensor:
  denom = torch.where(sqrt_one_minus_ab > 0, sqrt_one_minus_ab, torch.ones_like(sqrt_one_minus_ab))
  return (x - sqrt_ab * x0) / denom


def threshold_x0(x0: Tensor, cfg: diffusion.SamplerConfig) -> Tensor:
  """:func:`lcm_jax.diffusion.threshold_x0` in torch: dynamic thresholding (per vector, last axis,
  ``torch.quantile``), else static ``clip_sample``, else x0 unchanged."""
  if cfg.thresholding:
    s = torch.quantile(x0.abs(), float(cfg.dynamic_thresholding_ratio), dim=-1, keepdim=True)
    s = torch.clamp(s, min=1.0, max=float(cfg.sample_max_value))
    return torch.maximum(torch.minimum(x0, s), -s) / s
  if cfg.clip_sample:
    return torch.clamp(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
  return x0


def sample(denoise_fn: DenoiseFn, shape: tuple[int, ...], alpha_bar: np.ndarray,
           cfg: diffusion.SamplerConfig, *, initial_noise: Optional[Tensor] = None,
           step_noise: Optional[Callable[[int], Tensor]] = None,
           device: Union[str, torch.device] = "cpu") -> Tensor:
  """DDIM from noise to x0 (float32, normalized space): :func:`lcm_jax.diffusion.sample` in torch.

  Args:
    denoise_fn: ``denoise_fn(x_t, t, with_uncond)``, t a Python int; returns x0, or
      ``(x0_cond, x0_uncond)`` when ``with_uncond`` (``cfg.guidance_scale != 1``).
    shape: sample shape (..., S).
    alpha_bar: the training schedule (T,) (:func:`lcm_jax.schedules.alpha_bar_from_config`).
    cfg: sampler settings, validated against T.
    initial_noise: standard normal of ``shape`` (default ``torch.randn``); scaled by
      ``initial_noise_scale`` and clipped to ``+-clip_noise`` here.
    step_noise: ``i -> standard normal of shape`` for ``eta > 0`` (default ``torch.randn``).

  Per visited t: x0_c (x0_u); eps_c = (x - sqrt(ab) x0_c)/sqrt(1 - ab); guided: eps =
  :func:`guided_eps`, x0 = (x - sqrt(1 - ab) eps)/sqrt(ab); at ab == 0: x0 = x0_c, eps = x;
  eps /= epsilon_scaling; x0 = :func:`threshold_x0` (x0); x = sqrt(ab_prev) x0 +
  sqrt(1 - ab_prev - sigma^2) eps + sigma z, clipped to +-clip_noise. Returns the last x0.
  """
  alpha_bar = np.asarray(alpha_bar, np.float64)
  cfg.validate(alpha_bar.shape[0])
  timesteps = diffusion.ddim_timesteps(alpha_bar.shape[0], cfg.num_steps, cfg.timestep_spacing)
  ab, ab_prev = diffusion.ddim_alpha_pairs(alpha_bar, timesteps)
  coefs = diffusion._ddim_coefficients(ab, ab_prev, cfg.eta)  # pylint: disable=protected-access
  c = {k: torch.as_tensor(np.asarray(v, np.bool_ if k == "zero_snr" else np.float32),
                          device=device) for k, v in coefs.items()}
  with_uncond = bool(cfg.guidance_scale != 1.0)
  g, r = float(cfg.guidance_scale), float(cfg.guidance_rescale)
  eps_scale = torch.tensor(cfg.epsilon_scaling, dtype=torch.float32, device=device)

  if initial_noise is None:
    initial_noise = torch.randn(shape, dtype=torch.float32, device=device)
  x = initial_noise.to(device=device, dtype=torch.float32) * torch.tensor(
      cfg.initial_noise_scale, dtype=torch.float32, device=device)
  x = torch.clamp(x, -cfg.clip_noise, cfg.clip_noise)
  x0 = torch.zeros(shape, dtype=torch.float32, device=device)
  for i, t in enumerate(timesteps.tolist()):
    s = {k: v[i] for k, v in c.items()}
    out = denoise_fn(x, int(t), with_uncond)
    if with_uncond:
      x0_c, x0_u = (o.to(torch.float32) for o in out)
      eps_c = _eps_from_x0(x, x0_c, s["sqrt_ab"], s["sqrt_one_minus_ab"])
      eps_u = _eps_from_x0(x, x0_u, s["sqrt_ab"], s["sqrt_one_minus_ab"])
      eps = guided_eps(eps_c, eps_u, g, r)
      safe_sqrt_ab = torch.where(s["zero_snr"], torch.ones_like(s["sqrt_ab"]), s["sqrt_ab"])
      x0 = (x - s["sqrt_one_minus_ab"] * eps) / safe_sqrt_ab
    else:
      x0_c = out.to(torch.float32)  # type: ignore[union-attr]
      eps = _eps_from_x0(x, x0_c, s["sqrt_ab"], s["sqrt_one_minus_ab"])
      x0 = x0_c
    if bool(s["zero_snr"]):
      x0, eps = x0_c, x
    if cfg.epsilon_scaling != 1.0:
      eps = eps / eps_scale
    x0 = threshold_x0(x0, cfg)
    x = s["sqrt_ab_prev"] * x0 + s["dir_coef"] * eps
    if cfg.eta > 0.0:
      z = step_noise(i) if step_noise is not None else torch.randn(shape, device=device)
      x = x + s["sigma"] * z.to(device=device, dtype=torch.float32)
    x = torch.clamp(x, -cfg.clip_noise, cfg.clip_noise)
  return x0


# ----------------------------------------------------------------------------------------------
# Per-family decoders

class BaseLCMDecoder:
  """Base-LCM: the post-net prediction (+ latent noise), one cached call per concept."""

  def __init__(self, model: Model, gen: GenerationConfig,
               sampler: Optional[diffusion.SamplerConfig]):
    del sampler
    self.model = model
    self.temperature = float(gen.temperature) if gen.sample_latent_variable else 0.0

  def _concept(self, pred: Tensor, k: int, noise: NoiseFn) -> Tensor:
    if self.temperature > 0:
      pred = pred + self.temperature * noise(k, None, tuple(pred.shape)).to(pred.device)
    return self.model.denormalize(pred)

  def start(self, prompts: Tensor, lengths: Tensor, total: int, noise: NoiseFn) -> tuple[Any,
                                                                                           Tensor]:
    batch, plen = prompts.shape[:2]
    cache = self.model.init_cache(batch, total)
    positions = torch.arange(plen, device=prompts.device)[None].expand(batch, plen)
    preds, _ = self.model.forward_cached(prompts, positions, cache,
                                         torch.zeros(batch, dtype=torch.long,
                                                     device=prompts.device))
    last = preds[torch.arange(batch, device=prompts.device), lengths - 1]
    return cache, self._concept(last, 0, noise)

  def advance(self, cache: Any, concept: Tensor, slot: Tensor, k: int,
              noise: NoiseFn) -> tuple[Any, Tensor]:
    preds, _ = self.model.forward_cached(concept[:, None], slot[:, None], cache, slot)
    return cache, self._concept(preds[:, 0], k, noise)


class TwoTowerDecoder:
  """Two-Tower: the contextualizer's KV cache + a per-row cross-attention K/V buffer."""

  def __init__(self, model: Model, gen: GenerationConfig, sampler: diffusion.SamplerConfig):
    del gen
    self.model, self.sampler = model, sampler
    self.alpha_bar = diffusion.alpha_bar_from_config(model.config)

  def _concept(self, state: dict[str, Any], query_pos: Tensor, k: int,
               noise: NoiseFn) -> Tensor:
    cross_k, cross_v = state["cross_k"], state["cross_v"]
    batch, lk = cross_k.shape[1], cross_k.shape[2]
    device = cross_k.device
    slots = torch.arange(lk, device=device)
    cond = (slots[None, :] <= query_pos[:, None])[:, None, None, :]
    uncond = (slots == 0)[None, None, None, :].expand_as(cond)
    guided = self.sampler.guidance_scale != 1.0
    if guided:
      k2, v2 = torch.cat([cross_k, cross_k], dim=1), torch.cat([cross_v, cross_v], dim=1)
      mask2 = torch.cat([cond, uncond], dim=0)

    def denoise_fn(x_t: Tensor, t: int, with_uncond: bool) -> Any:
      if with_uncond:
        ts = torch.full((2 * batch, 1), t, dtype=torch.long, device=device)
        out = self.model.denoise(torch.cat([x_t, x_t], dim=0), ts, k2, v2, mask2)
        return out[:batch], out[batch:]
      ts = torch.full((batch, 1), t, dtype=torch.long, device=device)
      return self.model.denoise(x_t, ts, cross_k, cross_v, cond)

    shape = (batch, 1, self.model.config.sonar_embed_dim)
    x0 = sample(denoise_fn, shape, self.alpha_bar, self.sampler,
                initial_noise=noise(k, None, shape), step_noise=lambda i: noise(k, i, shape),
                device=device)
    return self.model.denormalize(x0[:, 0])

  def start(self, prompts: Tensor, lengths: Tensor, total: int,
            noise: NoiseFn) -> tuple[Any, Tensor]:
    batch, plen = prompts.shape[:2]
    cache = self.model.init_cache(batch, total)
    positions = torch.arange(plen, device=prompts.device)[None].expand(batch, plen)
    context, _ = self.model.contextualize_cached(
        prompts, positions, cache, torch.zeros(batch, dtype=torch.long, device=prompts.device))
    k, v = self.model.cross_kv(context, prepend_zero=True)
    shape = (k.shape[0], batch, total + 1) + tuple(k.shape[3:])
    state = {"cache": cache, "cross_k": k.new_zeros(shape), "cross_v": v.new_zeros(shape)}
    state["cross_k"][:, :, :plen + 1] = k
    state["cross_v"][:, :, :plen + 1] = v
    return state, self._concept(state, lengths, 0, noise)

  def advance(self, state: dict[str, Any], concept: Tensor, slot: Tensor, k: int,
              noise: NoiseFn) -> tuple[Any, Tensor]:
    context, _ = self.model.contextualize_cached(concept[:, None], slot[:, None], state["cache"],
                                                 slot)
    ck, cv = self.model.cross_kv(context, prepend_zero=False)
    for layer in range(ck.shape[0]):
      update_cache(state["cross_k"][layer], ck[layer], slot + 1)
      update_cache(state["cross_v"][layer], cv[layer], slot + 1)
    return state, self._concept(state, slot + 1, k, noise)


class OneTowerDecoder:
  """One-Tower: a cache of the clean concepts' K/V (slot = document position); each concept is
  sampled over one noisy query that sees the slots before it and itself
  (:class:`lcm_jax.models.one_tower.OneTowerDecoder`)."""

  def __init__(self, model: Model, gen: GenerationConfig, sampler: diffusion.SamplerConfig):
    del gen
    self.model, self.sampler = model, sampler
    self.alpha_bar = diffusion.alpha_bar_from_config(model.config)

  def _concept(self, state: dict[str, Any], query_pos: Tensor, k: int,
               noise: NoiseFn) -> Tensor:
    cache_k, cache_v = state["k"], state["v"]
    batch, total = cache_k.shape[1], cache_k.shape[2]
    device = cache_k.device
    slots = torch.arange(total, device=device)
    cond = (slots[None, :] < query_pos[:, None])[:, None, None, :]
    pos = query_pos[:, None]
    if self.sampler.guidance_scale != 1.0:  # the unconditional query sees only itself
      pos2 = torch.cat([pos, pos], dim=1)
      mask2 = torch.cat([cond, torch.zeros_like(cond)], dim=2)

    def denoise_fn(x_t: Tensor, t: int, with_uncond: bool) -> Any:
      if with_uncond:
        ts = torch.full((batch, 2), t, dtype=torch.long, device=device)
        out, _ = self.model.step(torch.cat([x_t, x_t], dim=1), ts, pos2, cache_k, cache_v, mask2)
        return out[:, :1], out[:, 1:]
      ts = torch.full((batch, 1), t, dtype=torch.long, device=device)
      return self.model.step(x_t, ts, pos, cache_k, cache_v, cond)[0]

    shape = (batch, 1, self.model.config.sonar_embed_dim)
    x0 = sample(denoise_fn, shape, self.alpha_bar, self.sampler,
                initial_noise=noise(k, None, shape), step_noise=lambda i: noise(k, i, shape),
                device=device)
    return self.model.denormalize(x0[:, 0])

  def start(self, prompts: Tensor, lengths: Tensor, total: int,
            noise: NoiseFn) -> tuple[Any, Tensor]:
    batch, plen = prompts.shape[:2]
    seg = torch.ones((batch, plen), dtype=torch.long, device=prompts.device)
    positions = torch.arange(plen, device=prompts.device)[None].expand(batch, plen)
    (k, v), _ = self.model.encode_context(prompts, seg, positions)
    shape = tuple(k.shape[:2]) + (total,) + tuple(k.shape[3:])
    state = {"k": k.new_zeros(shape), "v": v.new_zeros(shape)}
    state["k"][:, :, :plen] = k
    state["v"][:, :, :plen] = v
    return state, self._concept(state, lengths, 0, noise)

  def advance(self, state: dict[str, Any], concept: Tensor, slot: Tensor, k: int,
              noise: NoiseFn) -> tuple[Any, Tensor]:
    total = state["k"].shape[2]
    slots = torch.arange(total, device=slot.device)
    mask = (slots[None, :] < slot[:, None])[:, None, None, :]
    normalized = self.model.normalize(concept[:, None])
    _, (ck, cv) = self.model.step(normalized, torch.zeros_like(slot)[:, None], slot[:, None],
                                  state["k"], state["v"], mask)
    for layer in range(ck.shape[0]):
      update_cache(state["k"][layer], ck[layer], slot)
      update_cache(state["v"][layer], cv[layer], slot)
    return state, self._concept(state, slot + 1, k, noise)


# ----------------------------------------------------------------------------------------------
# The generator

class Generator:
  """Batched generation for one torch model and one set of settings.

  Args:
    model: a :mod:`lcm_interop.torch_models` model (its family's entry names the decoder).
    config: stopping rules (and Base-LCM latent sampling), validated here.
    sampler: DDIM settings of the diffusion families (default
      :class:`~lcm_jax.schedules.SamplerConfig`), validated against
      ``num_diffusion_train_steps``; ignored for Base-LCM.
    eot_vector: optional (S,) raw-space end-of-text vector; None turns the EOT stop off.
  """

  def __init__(self, model: Model, config: GenerationConfig = GenerationConfig(), *,
               sampler: Optional[diffusion.SamplerConfig] = None,
               eot_vector: Optional[Any] = None):
    cfg = model.config
    config.validate()
    self.model, self.config = model, config
    family = reference.of(cfg)
    if family.samples:
      sampler = sampler or diffusion.SamplerConfig()
      sampler.validate(cfg.num_diffusion_train_steps)
    self._decoder: Any = family.decoder_class()(model, config, sampler)
    self.eot = None
    if eot_vector is not None:
      eot = np.asarray(eot_vector, np.float32)
      if eot.shape != (cfg.sonar_embed_dim,):
        raise UserError(f"eot_vector: shape {eot.shape}, expected ({cfg.sonar_embed_dim},)")
      if not np.all(np.isfinite(eot)) or not np.any(eot):
        raise UserError("eot_vector: must be finite and non-zero")
      self.eot = torch.from_numpy(eot)

  def _emit(self, carry: dict[str, Any], concept: Tensor) -> None:
    """Stopping rules for concept number ``carry["k"] + 1`` (updates ``carry`` in place)."""
    gen, k = self.config, carry["k"]
    count = k + 1
    active = ~carry["done"]
    may_stop = may_stop_early(count, gen)
    eot_hit = torch.zeros_like(active)
    if self.eot is not None:
      eot_hit = cosine(concept, self.eot.to(concept.device)[None]) >= gen.eot_threshold
    rep_hit = torch.zeros_like(active)
    if gen.repetition_threshold is not None:
      rep_hit = cosine(concept, carry["last"]) >= gen.repetition_threshold
    running = torch.full_like(carry["reasons"], MAX_LEN if count >= gen.max_len else RUNNING)
    reason = torch.where(may_stop & eot_hit, torch.full_like(running, EOT),
                         torch.where(may_stop & rep_hit, torch.full_like(running, REPETITION),
                                     running))
    carry["outputs"][:, k] = torch.where(active[:, None], concept, carry["outputs"][:, k])
    carry["lengths"] = torch.where(active, torch.full_like(carry["lengths"], count),
                                   carry["lengths"])
    carry["reasons"] = torch.where(active, reason, carry["reasons"])
    carry["done"] = carry["done"] | (active & (reason != RUNNING))
    carry["last"] = torch.where(active[:, None], concept, carry["last"])

  @torch.inference_mode()
  def __call__(self, prompts: Any, lengths: Optional[Any] = None, *,
               noise: Optional[NoiseFn] = None, seed: int = 0,
               valid: Optional[Any] = None) -> GenerationResult:
    """Generates for one batch.

    Args:
      prompts: a list of (n_i, S) arrays, or a right-padded (B, L, S) array with ``lengths``
        (raw SONAR space).
      lengths: (B,) prompt lengths (>= 1) when ``prompts`` is padded.
      noise: the noise source (:data:`NoiseFn`); default :func:`torch_noise` of ``seed``.
      valid: optional (B,) bool; False rows (batch padding) are never generated for.
    """
    cfg = self.model.config
    device = next(self.model.parameters()).device
    dim = cfg.sonar_embed_dim
    if lengths is None:
      prompts, lengths = pad_prompts([np.asarray(p) for p in prompts], dim)
    prompts = torch.as_tensor(np.asarray(prompts, np.float32), device=device)
    lengths = torch.as_tensor(np.asarray(lengths), dtype=torch.long, device=device)
    if (prompts.ndim != 3 or prompts.shape[-1] != dim or lengths.shape != prompts.shape[:1]
        or not bool(((lengths >= 1) & (lengths <= prompts.shape[1])).all())):
      raise UserError(f"Generator: prompts {tuple(prompts.shape)} / lengths "
                       f"{lengths.tolist()} do not describe (B, L, {dim}) prompts of 1..L "
                       "concepts")
    noise = noise or torch_noise(seed, device)
    batch, plen = prompts.shape[:2]
    valid_t = (torch.ones(batch, dtype=torch.bool) if valid is None
               else torch.as_tensor(np.asarray(valid, bool))).to(device)
    max_len = self.config.max_len
    state, concept = self._decoder.start(prompts, lengths, plen + max_len, noise)
    carry = {"k": 0, "outputs": torch.zeros((batch, max_len, dim), device=device),
             "lengths": torch.zeros(batch, dtype=torch.long, device=device),
             "reasons": torch.zeros(batch, dtype=torch.long, device=device),
             "done": ~valid_t,
             "last": prompts[torch.arange(batch, device=device), lengths - 1].clone()}
    self._emit(carry, concept)
    while carry["k"] + 1 < max_len and not bool(carry["done"].all()):
      k = carry["k"] + 1
      slot = lengths + k - 1  # position of the concept fed back (number k - 1)
      state, concept = self._decoder.advance(state, carry["last"], slot, k, noise)
      carry["k"] = k
      self._emit(carry, concept)
    return GenerationResult(carry["outputs"].cpu().numpy().astype(np.float32),
                            carry["lengths"].cpu().numpy().astype(np.int32),
                            carry["reasons"].cpu().numpy().astype(np.int32))


def generate(model: Model, prompts: Sequence[Any],
             config: GenerationConfig = GenerationConfig(), **kwargs: Any) -> GenerationResult:
  """One-off :class:`Generator` call (``kwargs``: sampler, eot_vector, noise, seed)."""
  call = {k: kwargs.pop(k) for k in ("noise", "seed", "valid") if k in kwargs}
  return Generator(model, config, **kwargs)(prompts, **call)
