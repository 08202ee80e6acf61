"""Diffusion maths of the diffusion LCMs (Two-Tower, One-Tower): schedules, the x0 loss, DDIM.

Three parts:
  * Noise schedules, computed once on the host in float64 NumPy (with the DDIM timestep lists and
    :class:`SamplerConfig`, in the JAX-free :mod:`lcm_jax.schedules`, re-exported here):
    :func:`alpha_bar_schedule`
    (``squaredcos_cap_v2`` | ``linear`` | ``scaled_linear`` | ``sigmoid``, optionally rescaled to
    zero terminal SNR, Lin et al. 2023, "Common diffusion noise schedules and sample steps are
    flawed"), :func:`snr`, :func:`loss_weights`; and the training-side JAX helpers
    :func:`add_noise` and :func:`sample_timesteps`.
  * DDIM timestep lists: :func:`ddim_timesteps` and :func:`ddim_alpha_pairs`.
  * The jittable DDIM sampler with classifier-free guidance: :class:`SamplerConfig`,
    :func:`sample` and its pieces :func:`predict_eps`, :func:`guided_eps`, :func:`ddim_step`.

The model predicts the clean sample x0 ("sample" prediction). Forward process:
``x_t = sqrt(ab[t]) * x0 + sqrt(1 - ab[t]) * eps`` with ``ab = alpha_bar``, t an integer in [0, T).
With zero terminal SNR ``ab[T-1] == 0``: x_{T-1} is pure noise and no epsilon can be recovered
from an x0 prediction there, so the sampler uses the conditional x0 as is at that step.

What the reference does (a diffusers-style DDIM scheduler): timestep spacing
"trailing", ``eta = 0``, and ``alpha_bar_prev = 1`` after the last visited step
(``set_alpha_to_one``). Its trailing spacing is computed with an INTEGER step,
``np.arange(T, 0, -(T // n)) - 1``, so asking for n = 40 steps over T = 100 visits 50 timesteps
(99, 97, ..., 1), and it computes the previous timestep as ``t - T // n``, which is always the next
element of that list. We offer this list as ``"trailing_reference"`` (the default, to reproduce
the reference's samples) and the exact trailing spacing of Lin et al. as ``"trailing"``:
``round(np.arange(T, 0, -T / n)) - 1``, exactly n timesteps (for 40 over 100: 99, 97, 94, 92,
..., 4, 1). Here the previous timestep of a visited t is ALWAYS the next element of the list (and
``alpha_bar_prev = 1`` after the last), whatever the spacing; for the exact trailing list this
differs from diffusers, which steps to ``t - T // n`` even where the list skips 3 timesteps.
``"leading"`` (``arange(n) * (T // n)``, reversed) and ``"linspace"`` (``round(linspace(0, T-1,
n))``, reversed) are offered too.

Sampler conventions fixed here (see :func:`sample` for the full algorithm):
  * the initial noise is ``jax.random.normal(jax.random.split(rng)[0], shape)``, scaled by
    ``initial_noise_scale`` and clipped to ``+-clip_noise``; ``split(rng)[1]`` seeds the
    ``eta > 0`` noise; the x after every DDIM step is clipped to ``+-clip_noise`` too, as in the
    reference (``clip_noise`` 100 by default: a no-op for normalized SONAR vectors in practice);
  * the x0 of each step can be thresholded as diffusers' DDIM does (``clip_sample`` static,
    ``thresholding`` dynamic; both off by default, as in the reference), see :func:`threshold_x0`;
  * guidance works in epsilon space and the guided x0 is recomputed from the guided epsilon;
    epsilon scaling (exposure-bias correction, Ning et al. 2023) divides the epsilon used by the
    DDIM update only, AFTER the guided x0 is formed, so it never changes the x0 prediction and
    guidance with identical conditional/unconditional outputs equals no guidance;
  * the sampler returns the x0 of the last visited step; since ``alpha_bar_prev = 1`` there, the
    x after that step is the same x0.

Conditioning: guidance rescale divides by ``std(eps)``. Where the conditional and unconditional
x0 disagree by O(1), the guided trajectory drifts away from the conditional x0, ``std(eps_c)``
grows like ``1 / sqrt(1 - alpha_bar)`` at low noise while ``std(eps)`` does not, and the sampler
amplifies float32 rounding by orders of magnitude (the reference's algorithm, not this code).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

# The host-side (NumPy, JAX-free) half lives in lcm_jax.schedules, shared with the PyTorch side
# (lcm_interop.torch_generate); every name stays importable from here.
from lcm_jax.schedules import (BETA_SCHEDULES, LOSS_WEIGHTINGS, TIMESTEP_SPACINGS,  # noqa: F401
                               SamplerConfig, _ddim_coefficients, _ddim_sigma_and_dir_coef,
                               _scaled_log, _stable_sigmoid, alpha_bar_from_config,
                               alpha_bar_schedule, ddim_alpha_pairs, ddim_timesteps, loss_weights,
                               loss_weights_from_config, rescale_to_zero_terminal_snr, snr)

Array = jax.Array
DenoiseOutput = Union[Array, tuple[Array, Array]]
DenoiseFn = Callable[[Array, Array, bool], DenoiseOutput]
"""``denoise_fn(x_t, t, with_uncond)``: the x0 prediction, or ``(x0_cond, x0_uncond)``."""



# ----------------------------------------------------------------------------------------------
# Training-side JAX helpers

def add_noise(x0: Array, noise: Array, t: Array, alpha_bar_table: Array) -> Array:
  """``x_t = sqrt(ab[t]) * x0 + sqrt(1 - ab[t]) * noise`` in float32.

  Args:
    x0: clean samples (..., S).
    noise: standard normal noise, same shape as ``x0``.
    t: integer timesteps broadcastable to ``x0.shape[:-1]``.
    alpha_bar_table: (T,) float32 ``alpha_bar`` (e.g. ``jnp.asarray(alpha_bar, jnp.float32)``).
  """
  ab = jnp.asarray(alpha_bar_table, jnp.float32)[jnp.asarray(t)][..., None]
  x0 = jnp.asarray(x0, jnp.float32)
  noise = jnp.asarray(noise, jnp.float32)
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def sample_timesteps(rng: Array, shape: tuple[int, ...], num_steps: int) -> Array:
  """Uniform integer timesteps in [0, num_steps), int32, of the given shape."""
  return jax.random.randint(rng, shape, 0, num_steps, dtype=jnp.int32)


# ----------------------------------------------------------------------------------------------
# The x0-prediction loss of every diffusion family

def x0_loss_from_draws(model: Any, variables: dict[str, Any], batch: dict[str, Array],
                       timesteps: Array, noise: Array, drop_cond: Optional[Array], *,
                       dropout_rng: Optional[Array] = None, deterministic: bool = True
                       ) -> tuple[Array, Array, dict[str, Array]]:
  """The diffusion loss given explicit draws of t (B, L) int, eps (B, L, S) and drop_cond.

  ``x0`` = normalized embeddings, ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps``; per scored
  position (``batch["target_mask"] > 0``) the loss is ``w(t) * sum_d (x0_hat - x0)^2``.
  Returns SUMS ``(loss_sum, count, {"unweighted_loss": sum without w(t)})``. ``model`` is any
  diffusion family's module: it has ``normalize`` and is called as ``model(embeddings,
  segment_ids, positions, noisy=, timesteps=, drop_cond=, deterministic=) -> (x0_hat, _)``.
  """
  cfg = model.config
  x0 = model.apply(variables, batch["embeddings"], method="normalize")
  alpha_bar = jnp.asarray(alpha_bar_from_config(cfg), jnp.float32)
  weights = jnp.asarray(loss_weights_from_config(cfg), jnp.float32)
  timesteps = jnp.asarray(timesteps, jnp.int32)
  noisy = add_noise(x0, noise, timesteps, alpha_bar)
  rngs = {} if deterministic or dropout_rng is None else {"dropout": dropout_rng}
  x0_hat, _ = model.apply(variables, batch["embeddings"], batch["segment_ids"],
                          batch["positions"], noisy=noisy, timesteps=timesteps,
                          drop_cond=drop_cond, deterministic=deterministic, rngs=rngs)
  per_position = jnp.sum(jnp.square(x0_hat - x0), axis=-1)
  scored = batch["target_mask"] > 0
  unweighted = jnp.sum(jnp.where(scored, per_position, 0.0))
  loss_sum = jnp.sum(jnp.where(scored, weights[timesteps] * per_position, 0.0))
  return loss_sum, jnp.sum(scored.astype(jnp.float32)), {"unweighted_loss": unweighted}


def x0_loss(model: Any, variables: dict[str, Any], batch: dict[str, Array], *,
            rng: Optional[Array], deterministic: bool) -> tuple[Array, Array, dict[str, Array]]:
  """The training/eval loss of the diffusion families (their ``Family.loss``).

  ``rng`` is split into dropout / timestep / noise / cfg streams; t ~ U{0..T-1} and eps ~ N(0, I)
  per position are drawn whatever ``deterministic`` says (it only switches model dropout).
  Conditioning dropout (prob ``cfg_dropout`` per position) applies in training only; with
  ``rng=None`` (evaluation) the draws come from ``jax.random.key(0)`` and nothing is dropped.
  """
  cfg = model.config
  training = rng is not None
  if rng is None:
    rng = jax.random.key(0)
  dropout_rng, t_rng, noise_rng, cfg_rng = jax.random.split(rng, 4)
  shape = batch["segment_ids"].shape
  timesteps = sample_timesteps(t_rng, shape, cfg.num_diffusion_train_steps)
  noise = jax.random.normal(noise_rng, shape + (cfg.sonar_embed_dim,), jnp.float32)
  drop_cond = None
  if training and cfg.cfg_dropout > 0:
    drop_cond = jax.random.bernoulli(cfg_rng, cfg.cfg_dropout, shape)
  return x0_loss_from_draws(model, variables, batch, timesteps, noise, drop_cond,
                            dropout_rng=dropout_rng, deterministic=deterministic)


# ----------------------------------------------------------------------------------------------
# Sampler

def _eps_from_x0(x: Array, x0: Array, sqrt_ab: Array, sqrt_one_minus_ab: Array) -> Array:
  """``(x - sqrt(ab) * x0) / sqrt(1 - ab)``, with a safe denominator where ``ab == 1``."""
  denom = jnp.where(sqrt_one_minus_ab > 0, sqrt_one_minus_ab, 1.0)
  return (x - sqrt_ab * x0) / denom


def predict_eps(x: Array, x0: Array, ab: Array) -> Array:
  """Epsilon implied by an x0 prediction: ``(x - sqrt(ab) * x0) / sqrt(1 - ab)`` in float32.

  At ``ab == 0`` this is ``x``; ``ab`` is a scalar or broadcastable to ``x``.
  """
  ab = jnp.asarray(ab, jnp.float32)
  return _eps_from_x0(jnp.asarray(x, jnp.float32), jnp.asarray(x0, jnp.float32), jnp.sqrt(ab),
                      jnp.sqrt(1.0 - ab))


def guided_eps(eps_cond: Array, eps_uncond: Array, guidance_scale: float,
               guidance_rescale: float = 0.0) -> Array:
  """Classifier-free guidance in epsilon space, then guidance rescale (Lin et al. 2023).

  ``eps = eps_u + g * (eps_c - eps_u)``; if ``r > 0``:
  ``eps = r * eps * std(eps_c) / std(eps) + (1 - r) * eps`` with the UNBIASED std over the last
  axis (per vector), as torch's ``std`` is; where ``std(eps)`` is 0 the ratio is taken as 1.
  (Both stds share the ``1 / (S - 1)`` factor, so it cancels in the ratio: biased and unbiased
  agree for S > 1.)
  """
  eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
  if guidance_rescale == 0.0:
    return eps
  std_cond = jnp.std(eps_cond, axis=-1, keepdims=True, ddof=1)
  std_guided = jnp.std(eps, axis=-1, keepdims=True, ddof=1)
  ok = std_guided > 0
  ratio = jnp.where(ok, std_cond / jnp.where(ok, std_guided, 1.0), 1.0)
  return guidance_rescale * (eps * ratio) + (1.0 - guidance_rescale) * eps


def _ddim_update(x0: Array, eps: Array, sqrt_ab_prev: Array, dir_coef: Array, sigma: Array,
                 noise: Array | None) -> Array:
  """``sqrt(ab_prev) * x0 + sqrt(1 - ab_prev - sigma^2) * eps + sigma * noise``."""
  out = sqrt_ab_prev * x0 + dir_coef * eps
  if noise is not None:
    out = out + sigma * noise
  return out


def ddim_step(x: Array, x0: Array, eps: Array, ab: Array, ab_prev: Array, eta: float = 0.0,
              noise: Array | None = None) -> Array:
  """One DDIM update to the previous timestep, float32 (Song et al. 2021, eq. 12).

  ``sigma = eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev)`` (0 at ``ab == 1``);
  ``x_prev = sqrt(ab_prev) * x0 + sqrt(1 - ab_prev - sigma^2) * eps + sigma * noise``.
  ``x`` only fixes the output shape (the update needs x0 and eps, not x); ``noise`` may be None
  when ``eta == 0``. ``ab`` / ``ab_prev`` are scalars or broadcastable to ``x``.
  """
  ab = jnp.asarray(ab, jnp.float32)
  ab_prev = jnp.asarray(ab_prev, jnp.float32)
  sigma, dir_coef = _ddim_sigma_and_dir_coef(jnp, ab, ab_prev, eta)
  if eta > 0 and noise is None:
    raise ValueError("ddim_step: eta > 0 needs noise")
  out = _ddim_update(jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32),
                     jnp.sqrt(ab_prev), dir_coef, sigma,
                     None if noise is None else jnp.asarray(noise, jnp.float32))
  return jnp.broadcast_to(out, jnp.shape(x))


def threshold_x0(x0: Array, cfg: SamplerConfig) -> Array:
  """The x0 clipping of a DDIM step, as diffusers' DDIM defines it (float32, per vector).

  ``thresholding`` (dynamic, Saharia et al. 2022): ``s = clip(quantile(|x0|, ratio), 1,
  sample_max_value)`` over the last axis (linear interpolation, as ``torch.quantile``), then
  ``clip(x0, -s, s) / s``; else ``clip_sample`` (static): ``clip(x0, -range, range)``; else x0.
  The reference's vectors are (B, 1, S), so its per-row quantile is this per-vector one.
  """
  x0 = jnp.asarray(x0, jnp.float32)
  if cfg.thresholding:
    s = jnp.quantile(jnp.abs(x0), cfg.dynamic_thresholding_ratio, axis=-1, keepdims=True)
    s = jnp.clip(s, 1.0, cfg.sample_max_value)
    return jnp.clip(x0, -s, s) / s
  if cfg.clip_sample:
    return jnp.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
  return x0


def sample(denoise_fn: DenoiseFn, rng: Array, shape: tuple[int, ...], alpha_bar: np.ndarray,
           cfg: SamplerConfig) -> Array:
  """DDIM sampling from noise to x0 (float32, normalized space); jittable (``cfg`` static).

  Args:
    denoise_fn: ``denoise_fn(x_t, t, with_uncond)`` with ``x_t`` float32 of ``shape`` and ``t`` a
      scalar int32 array; returns the x0 prediction, or ``(x0_cond, x0_uncond)`` when
      ``with_uncond`` (a Python bool, ``cfg.guidance_scale != 1.0``) is True.
    rng: PRNG key; ``split(rng)[0]`` draws the initial noise, ``split(rng)[1]`` the eta noise.
    shape: the sample shape (..., S).
    alpha_bar: the training schedule, a CONCRETE host array (T,) (not a traced value).
    cfg: sampler settings, validated against T.

  Algorithm, for each visited t (:func:`ddim_timesteps`) with ``ab = alpha_bar[t]`` and
  ``ab_prev`` from :func:`ddim_alpha_pairs`:
    1. ``x0_c`` (and ``x0_u`` if guided) = denoise_fn(x, t);
    2. ``eps_c = (x - sqrt(ab) x0_c) / sqrt(1 - ab)``; if guided, ``eps_u`` likewise,
       ``eps = guided_eps(eps_c, eps_u, g, r)`` and ``x0 = (x - sqrt(1 - ab) eps) / sqrt(ab)``;
       unguided, ``eps = eps_c`` and ``x0 = x0_c``;
    3. where ``ab == 0`` (zero terminal SNR): ``x0 = x0_c`` and ``eps = x`` (no guidance);
    4. ``eps /= epsilon_scaling``; ``x0 = threshold_x0(x0)`` (static/dynamic thresholding, off by
       default; eps is NOT recomputed from the thresholded x0, as in the reference);
    5. ``x = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z`` (:func:`ddim_step`),
       then ``x = clip(x, -clip_noise, clip_noise)`` (the reference clips after every step).
  The initial x is ``clip(initial_noise_scale * N(0, I), -clip_noise, clip_noise)``.
  Returns the (thresholded) x0 of the last visited step (not x after it).
  """
  alpha_bar = np.asarray(alpha_bar, np.float64)
  if alpha_bar.ndim != 1:
    raise ValueError(f"sample: alpha_bar must be 1-D, got shape {alpha_bar.shape}")
  cfg.validate(alpha_bar.shape[0])
  timesteps = ddim_timesteps(alpha_bar.shape[0], cfg.num_steps, cfg.timestep_spacing)
  ab, ab_prev = ddim_alpha_pairs(alpha_bar, timesteps)
  coefs = _ddim_coefficients(ab, ab_prev, cfg.eta)
  with_uncond = bool(cfg.guidance_scale != 1.0)
  stochastic = cfg.eta > 0.0
  g, r, eps_scale = float(cfg.guidance_scale), float(cfg.guidance_rescale), cfg.epsilon_scaling

  init_key, noise_key = jax.random.split(rng)
  x = jax.random.normal(init_key, shape, jnp.float32) * jnp.float32(cfg.initial_noise_scale)
  x = jnp.clip(x, -cfg.clip_noise, cfg.clip_noise)

  xs = {k: jnp.asarray(v, jnp.bool_ if k == "zero_snr" else jnp.float32)
        for k, v in coefs.items()}
  xs["t"] = jnp.asarray(timesteps, jnp.int32)
  if stochastic:
    xs["key"] = jax.random.split(noise_key, timesteps.shape[0])

  def step(carry: tuple[Array, Array], s: dict[str, Array]) -> tuple[tuple[Array, Array], None]:
    x, _ = carry
    out = denoise_fn(x, s["t"], with_uncond)
    if with_uncond:
      x0_c, x0_u = out
      x0_c = jnp.asarray(x0_c, jnp.float32)
      x0_u = jnp.asarray(x0_u, jnp.float32)
      eps_c = _eps_from_x0(x, x0_c, s["sqrt_ab"], s["sqrt_one_minus_ab"])
      eps_u = _eps_from_x0(x, x0_u, s["sqrt_ab"], s["sqrt_one_minus_ab"])
      eps = guided_eps(eps_c, eps_u, g, r)
      safe_sqrt_ab = jnp.where(s["zero_snr"], 1.0, s["sqrt_ab"])
      x0 = (x - s["sqrt_one_minus_ab"] * eps) / safe_sqrt_ab
    else:
      x0_c = jnp.asarray(out, jnp.float32)
      eps = _eps_from_x0(x, x0_c, s["sqrt_ab"], s["sqrt_one_minus_ab"])
      x0 = x0_c
    x0 = jnp.where(s["zero_snr"], x0_c, x0)
    eps = jnp.where(s["zero_snr"], x, eps)
    if eps_scale != 1.0:
      eps = eps / jnp.float32(eps_scale)
    x0 = threshold_x0(x0, cfg)
    z = jax.random.normal(s["key"], shape, jnp.float32) if stochastic else None
    x_prev = _ddim_update(x0, eps, s["sqrt_ab_prev"], s["dir_coef"], s["sigma"], z)
    x_prev = jnp.clip(x_prev, -cfg.clip_noise, cfg.clip_noise)
    return (x_prev, x0), None

  (_, x0), _ = jax.lax.scan(step, (x, jnp.zeros(shape, jnp.float32)), xs)
  return x0
