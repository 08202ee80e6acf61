"""Diffusion maths of the Two-Tower LCM (LCM_SPEC section 5): schedules, loss weights, DDIM.

Three parts:
  * Noise schedules, computed once on the host in float64 NumPy: :func:`alpha_bar_schedule`
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

What the reference does (LCM_SPEC section 5, a diffusers-style DDIM scheduler): timestep spacing
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

import dataclasses
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.errors import UserError
from lcm_jax.models.config import BETA_SCHEDULES, LOSS_WEIGHTINGS, ModelConfig

Array = jax.Array
DenoiseOutput = Union[Array, tuple[Array, Array]]
DenoiseFn = Callable[[Array, Array, bool], DenoiseOutput]
"""``denoise_fn(x_t, t, with_uncond)``: the x0 prediction, or ``(x0_cond, x0_uncond)``."""

TIMESTEP_SPACINGS = ("trailing_reference", "trailing", "leading", "linspace")


# ----------------------------------------------------------------------------------------------
# Host-side float64 helpers

def _stable_sigmoid(z: np.ndarray) -> np.ndarray:
  """Logistic function in float64 without overflow warnings; +-inf map to 1 / 0, never NaN."""
  z = np.asarray(z, np.float64)
  e = np.exp(-np.abs(z))  # in [0, 1]; 0 for |z| = inf
  return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _scaled_log(values: np.ndarray, scale: float) -> np.ndarray:
  """``scale * log(values)`` for values in [0, inf], with ``0 * log(0 or inf)`` taken as 0."""
  with np.errstate(divide="ignore"):
    logs = np.log(np.asarray(values, np.float64))
  if scale == 0.0:
    return np.zeros_like(logs)
  return scale * logs  # finite * +-inf = +-inf, no NaN since scale != 0


# ----------------------------------------------------------------------------------------------
# Noise schedules

def rescale_to_zero_terminal_snr(alpha_bar: np.ndarray) -> np.ndarray:
  """Lin et al. 2023 (Algorithm 1): makes ``alpha_bar[-1] == 0`` keeping ``alpha_bar[0]``.

  On ``s = sqrt(alpha_bar)``: shift so the last is 0, scale so the first is unchanged, square
  back. A no-op (exactly) where the last value is already 0.
  """
  alpha_bar = np.asarray(alpha_bar, np.float64)
  if alpha_bar[-1] == 0.0:
    return alpha_bar.copy()
  s = np.sqrt(alpha_bar)
  first, last = s[0], s[-1]
  if first == last:
    raise ValueError("rescale_to_zero_terminal_snr: the schedule is constant, cannot rescale "
                     f"(alpha_bar[0] == alpha_bar[-1] == {alpha_bar[0]})")
  s = (s - last) * (first / (first - last))
  s[-1] = 0.0  # exact, whatever the rounding
  return s * s


def _cosine_f(u: np.ndarray) -> np.ndarray:
  """The squaredcos_cap_v2 (improved DDPM, s = 0.008) alpha_bar function of u in [0, 1]."""
  return np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2


def alpha_bar_schedule(name: str, num_steps: int = 100, *, beta_start: float = 1e-4,
                       beta_end: float = 0.02, sigmoid_alpha: float = 1.5,
                       sigmoid_beta: float = 0.0, rescale_zero_terminal_snr: bool = True,
                       max_beta: float = 0.999) -> np.ndarray:
  """Cumulative signal fraction ``alpha_bar[t]`` for t = 0..T-1, shape (T,) float64.

  Schedules:
    * ``squaredcos_cap_v2``: ``beta_i = min(1 - f((i+1)/T) / f(i/T), max_beta)`` with
      ``f(u) = cos((u + 0.008) / 1.008 * pi/2)^2``; ``alpha_bar = cumprod(1 - beta)``.
    * ``linear``: ``beta = linspace(beta_start, beta_end, T)``.
    * ``scaled_linear``: ``beta = linspace(sqrt(beta_start), sqrt(beta_end), T)^2``.
    * ``sigmoid`` (paper eq. 14, OUR READING of it):
      ``alpha_bar(t) = sigmoid(sigmoid_beta - sigmoid_alpha * logit(tau))``, ``tau = (t+1)/T``,
      so ``alpha_bar[T-1] = 0`` and ``log SNR(t) = sigmoid_beta - sigmoid_alpha * logit(tau)``.
      The paper's "sigmoid(3.5, 0)" is ``sigmoid_alpha=3.5, sigmoid_beta=0``.

  ``rescale_zero_terminal_snr`` (the reference's default) then applies
  :func:`rescale_to_zero_terminal_snr` to every schedule (a no-op where the last is already 0).
  With the defaults (cosine, T=100, rescale): alpha_bar[0] 0.99937, [10] 0.9667, [50] 0.4781,
  [90] 0.0194, [98] 2.28e-4, [99] 0.
  """
  if name not in BETA_SCHEDULES:
    raise ValueError(f"alpha_bar_schedule: unknown schedule {name!r}; expected one of "
                     f"{BETA_SCHEDULES}")
  if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
    raise ValueError(f"alpha_bar_schedule: num_steps must be a positive int, got {num_steps!r}")
  if not 0.0 < max_beta <= 1.0:
    raise ValueError(f"alpha_bar_schedule: max_beta must be in (0, 1], got {max_beta!r}")
  t = np.arange(num_steps, dtype=np.float64)
  if name == "squaredcos_cap_v2":
    betas = np.minimum(1.0 - _cosine_f((t + 1) / num_steps) / _cosine_f(t / num_steps), max_beta)
    alpha_bar = np.cumprod(1.0 - betas)
  elif name in ("linear", "scaled_linear"):
    if not 0.0 <= beta_start <= 1.0 or not 0.0 <= beta_end <= 1.0:
      raise ValueError(f"alpha_bar_schedule: beta_start/beta_end must be in [0, 1], got "
                       f"{beta_start!r}, {beta_end!r}")
    if name == "linear":
      betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    else:
      betas = np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), num_steps, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1.0 - betas)
  else:  # sigmoid
    tau = (t + 1) / num_steps
    with np.errstate(divide="ignore"):
      logit = np.log(tau) - np.log1p(-tau)  # +inf at tau = 1
    alpha_bar = _stable_sigmoid(sigmoid_beta - sigmoid_alpha * logit)
  if rescale_zero_terminal_snr:
    alpha_bar = rescale_to_zero_terminal_snr(alpha_bar)
  return alpha_bar


def alpha_bar_from_config(cfg: ModelConfig) -> np.ndarray:
  """:func:`alpha_bar_schedule` with the diffusion fields of a :class:`ModelConfig`."""
  return alpha_bar_schedule(
      cfg.beta_schedule, cfg.num_diffusion_train_steps, beta_start=cfg.beta_start,
      beta_end=cfg.beta_end, sigmoid_alpha=cfg.sigmoid_alpha, sigmoid_beta=cfg.sigmoid_beta,
      rescale_zero_terminal_snr=cfg.rescale_zero_terminal_snr)


def snr(alpha_bar: np.ndarray) -> np.ndarray:
  """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` (float64): 0 at 0, inf at 1."""
  alpha_bar = np.asarray(alpha_bar, np.float64)
  with np.errstate(divide="ignore"):
    return alpha_bar / (1.0 - alpha_bar)


def loss_weights(alpha_bar: np.ndarray, kind: str, *, snr_clamp_min: float = 0.0,
                 snr_clamp_max: float = 5.0, fragility_a: float = -4.0,
                 fragility_b: float = 3.5) -> np.ndarray:
  """Per-timestep loss weights w(t), shape (T,) float64.

    * ``none``: 1.
    * ``clamped_snr``: ``clip(SNR(t), snr_clamp_min, snr_clamp_max)``.
    * ``fragility``: ``sigmoid(fragility_a * log SNR(t) + fragility_b)``. This form is OUR
      READING of the paper's fragility weighting, not verified against the reference code. At
      ``alpha_bar = 0`` (log SNR = -inf) it is 1 for a < 0 (0 for a > 0, sigmoid(b) for a = 0);
      never NaN.
  """
  alpha_bar = np.asarray(alpha_bar, np.float64)
  if kind == "none":
    return np.ones_like(alpha_bar)
  ratio = snr(alpha_bar)
  if kind == "clamped_snr":
    if snr_clamp_min > snr_clamp_max:
      raise ValueError(f"loss_weights: snr_clamp_min {snr_clamp_min} > snr_clamp_max "
                       f"{snr_clamp_max}")
    return np.clip(ratio, snr_clamp_min, snr_clamp_max)
  if kind == "fragility":
    return _stable_sigmoid(_scaled_log(ratio, fragility_a) + fragility_b)
  raise ValueError(f"loss_weights: unknown kind {kind!r}; expected one of {LOSS_WEIGHTINGS}")


def loss_weights_from_config(cfg: ModelConfig) -> np.ndarray:
  """:func:`loss_weights` of :func:`alpha_bar_from_config` with the config's weighting fields."""
  return loss_weights(alpha_bar_from_config(cfg), cfg.loss_weighting,
                      snr_clamp_min=cfg.snr_clamp_min, snr_clamp_max=cfg.snr_clamp_max,
                      fragility_a=cfg.fragility_a, fragility_b=cfg.fragility_b)


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
# DDIM timestep lists

def ddim_timesteps(num_train_steps: int, num_inference_steps: int,
                   spacing: str = "trailing_reference") -> np.ndarray:
  """Descending timesteps a DDIM sampler visits, int64.

  Spacings (T = num_train_steps, n = num_inference_steps):
    * ``trailing_reference`` (default; the reference's integer quirk):
      ``np.arange(T, 0, -(T // n)) - 1``; ``ceil(T / (T // n))`` values, e.g. 50 for 40 over 100.
    * ``trailing`` (exact, Lin et al. 2023): ``round(np.arange(T, 0, -T / n)) - 1``; n values
      (truncated to n: for n = 29, 31, 58, 62, 97 ... over 100 the float arange has an extra
      last element that would give timestep -1).
    * ``leading``: ``(arange(n) * (T // n))`` reversed; n values, the largest below T - 1 in
      general.
    * ``linspace``: ``round(linspace(0, T - 1, n))`` reversed; n values.
  """
  if not isinstance(num_train_steps, (int, np.integer)) or num_train_steps < 1:
    raise ValueError(f"ddim_timesteps: num_train_steps must be a positive int, got "
                     f"{num_train_steps!r}")
  if (not isinstance(num_inference_steps, (int, np.integer))
      or not 1 <= num_inference_steps <= num_train_steps):
    raise ValueError(f"ddim_timesteps: num_inference_steps must be an int in [1, "
                     f"{num_train_steps}], got {num_inference_steps!r}")
  big_t, n = int(num_train_steps), int(num_inference_steps)
  if spacing == "trailing_reference":
    steps = np.arange(big_t, 0, -(big_t // n), dtype=np.int64) - 1
  elif spacing == "trailing":
    # np.arange itself (its float rounding decides the .5 ties, as in diffusers), truncated to n:
    # for some (T, n) a float step makes it one element longer, a value ~1e-14 that would
    # round to timestep -1.
    steps = np.round(np.arange(big_t, 0, -big_t / n)[:n]).astype(np.int64) - 1
  elif spacing == "leading":
    steps = (np.arange(n, dtype=np.int64) * (big_t // n))[::-1].copy()
  elif spacing == "linspace":
    steps = np.round(np.linspace(0, big_t - 1, n))[::-1].astype(np.int64)
  else:
    raise ValueError(f"ddim_timesteps: unknown spacing {spacing!r}; expected one of "
                     f"{TIMESTEP_SPACINGS}")
  return steps


def ddim_alpha_pairs(alpha_bar: np.ndarray, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(ab_t, ab_prev)`` float64 for each visited timestep.

  ``ab_prev[i] = alpha_bar[timesteps[i + 1]]`` and 1 after the last (``set_alpha_to_one``).
  """
  alpha_bar = np.asarray(alpha_bar, np.float64)
  timesteps = np.asarray(timesteps, np.int64)
  if timesteps.ndim != 1 or timesteps.size == 0:
    raise ValueError(f"ddim_alpha_pairs: timesteps must be a non-empty 1-D array, got shape "
                     f"{timesteps.shape}")
  if timesteps.min() < 0 or timesteps.max() >= alpha_bar.shape[0]:
    raise ValueError(f"ddim_alpha_pairs: timesteps out of [0, {alpha_bar.shape[0]})")
  if np.any(np.diff(timesteps) >= 0):
    raise ValueError("ddim_alpha_pairs: timesteps must be strictly descending")
  ab_t = alpha_bar[timesteps]
  ab_prev = np.concatenate([alpha_bar[timesteps[1:]], [1.0]])
  return ab_t, ab_prev


# ----------------------------------------------------------------------------------------------
# Sampler

@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """DDIM sampling settings; defaults are the paper's. Frozen, so usable as a jit static arg."""

  num_steps: int = 40
  """Requested inference steps n (``trailing_reference`` visits ``ceil(T / (T // n))``)."""
  guidance_scale: float = 3.0
  """Classifier-free guidance g; 1.0 runs the conditional model only."""
  guidance_rescale: float = 0.7
  """Guidance rescale r in [0, 1] (Lin et al. 2023); 0 disables it."""
  initial_noise_scale: float = 0.6
  """Standard deviation of the initial noise."""
  epsilon_scaling: float = 1.00045
  """Epsilon (used by the DDIM update) is divided by this; 1.0 = off."""
  eta: float = 0.0
  """DDIM stochasticity; 0 = deterministic DDIM."""
  timestep_spacing: str = "trailing_reference"
  """One of :data:`TIMESTEP_SPACINGS`."""
  clip_noise: float = 100.0
  """The latent is clipped to +-clip_noise: the initial noise and the x after EVERY DDIM step
  (the reference's ``clip_noise``, default 100)."""
  clip_sample: bool = False
  """Static thresholding (diffusers' ``clip_sample``): the x0 prediction of each step is clipped
  to +-clip_sample_range. Ignored when ``thresholding`` is on."""
  clip_sample_range: float = 1.0
  """The bound of ``clip_sample`` (diffusers' default 1.0)."""
  thresholding: bool = False
  """Dynamic thresholding (Saharia et al. 2022, diffusers' ``thresholding``): per vector,
  ``s = clip(quantile(|x0|, dynamic_thresholding_ratio), 1, sample_max_value)`` and
  ``x0 = clip(x0, -s, s) / s``. Off by default, as in the reference."""
  dynamic_thresholding_ratio: float = 0.995
  """The quantile of ``thresholding`` (the reference's default 0.995)."""
  sample_max_value: float = 6.0
  """The largest ``s`` of ``thresholding`` (the reference generator's default 6.0)."""

  def validate(self, num_train_steps: int) -> None:
    """Raises :class:`~lcm_jax.errors.UserError` naming the field if a setting is out of range."""
    if (not isinstance(self.num_steps, (int, np.integer)) or isinstance(self.num_steps, bool)
        or not 1 <= self.num_steps <= num_train_steps):
      raise UserError(f"SamplerConfig.num_steps: expected an int in [1, {num_train_steps}], got "
                       f"{self.num_steps!r}")
    if not self.guidance_scale >= 0.0:
      raise UserError(f"SamplerConfig.guidance_scale: expected >= 0, got "
                       f"{self.guidance_scale!r}")
    if not 0.0 <= self.guidance_rescale <= 1.0:
      raise UserError(f"SamplerConfig.guidance_rescale: expected in [0, 1], got "
                       f"{self.guidance_rescale!r}")
    if not self.initial_noise_scale > 0.0:
      raise UserError(f"SamplerConfig.initial_noise_scale: expected > 0, got "
                       f"{self.initial_noise_scale!r}")
    if not self.epsilon_scaling > 0.0:
      raise UserError(f"SamplerConfig.epsilon_scaling: expected > 0, got "
                       f"{self.epsilon_scaling!r}")
    if not self.eta >= 0.0:
      raise UserError(f"SamplerConfig.eta: expected >= 0, got {self.eta!r}")
    if self.timestep_spacing not in TIMESTEP_SPACINGS:
      raise UserError(f"SamplerConfig.timestep_spacing: {self.timestep_spacing!r} not in "
                       f"{TIMESTEP_SPACINGS}")
    if not self.clip_noise > 0.0:
      raise UserError(f"SamplerConfig.clip_noise: expected > 0, got {self.clip_noise!r}")
    if not self.clip_sample_range > 0.0:
      raise UserError(f"SamplerConfig.clip_sample_range: expected > 0, got "
                      f"{self.clip_sample_range!r}")
    if not 0.0 <= self.dynamic_thresholding_ratio <= 1.0:
      raise UserError(f"SamplerConfig.dynamic_thresholding_ratio: expected a quantile in [0, 1], "
                      f"got {self.dynamic_thresholding_ratio!r}")
    if not self.sample_max_value >= 1.0:
      raise UserError(f"SamplerConfig.sample_max_value: expected >= 1 (s is clipped to "
                      f"[1, sample_max_value]), got {self.sample_max_value!r}")

  def replace(self, **changes: Any) -> "SamplerConfig":
    """A copy with some fields changed."""
    return dataclasses.replace(self, **changes)


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


def _ddim_sigma_and_dir_coef(xp: Any, ab: Array, ab_prev: Array, eta: float) -> tuple[Array, Array]:
  """DDIM ``sigma`` and ``dir_coef = sqrt(1 - ab_prev - sigma^2)``, computed with ``xp`` (np / jnp).

  ``sigma = eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev)``, 0 where ``ab == 1``;
  the denominators are made safe, so there is no division by zero at ``ab == 1`` or
  ``ab_prev == 0``.
  """
  one_minus_ab = 1.0 - ab
  safe = xp.where(one_minus_ab > 0, one_minus_ab, 1.0)
  ratio = xp.where(ab_prev > 0, ab / xp.where(ab_prev > 0, ab_prev, 1.0), 1.0)
  sigma = eta * xp.sqrt(xp.maximum((1.0 - ab_prev) / safe, 0.0)) * xp.sqrt(
      xp.maximum(1.0 - ratio, 0.0))
  sigma = xp.where(one_minus_ab > 0, sigma, 0.0)
  return sigma, xp.sqrt(xp.maximum(1.0 - ab_prev - sigma * sigma, 0.0))


def _ddim_coefficients(ab: np.ndarray, ab_prev: np.ndarray, eta: float) -> dict[str, np.ndarray]:
  """Host float64 DDIM coefficients per visited step (exact even where ab is close to 1)."""
  ab = np.asarray(ab, np.float64)
  ab_prev = np.asarray(ab_prev, np.float64)
  sigma, dir_coef = _ddim_sigma_and_dir_coef(np, ab, ab_prev, eta)
  return dict(
      sqrt_ab=np.sqrt(ab), sqrt_one_minus_ab=np.sqrt(1.0 - ab), sqrt_ab_prev=np.sqrt(ab_prev),
      dir_coef=dir_coef, sigma=sigma, zero_snr=ab == 0.0)


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
