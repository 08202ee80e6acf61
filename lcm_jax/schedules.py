"""The host-side, JAX-free part of the diffusion maths: noise schedules, loss
weights, DDIM timestep lists and coefficients, and the sampler settings :class:`SamplerConfig`.

Pure NumPy (float64) and the standard library: the JAX side (:mod:`lcm_jax.diffusion`, which
re-exports every name here) and the PyTorch side (:mod:`lcm_interop.torch_generate`, which must
run without JAX) compute the same schedules and validate the same settings with this one copy.
See :mod:`lcm_jax.diffusion` for the conventions (timestep spacings, zero terminal SNR, the
sampler's algorithm).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lcm_jax.errors import UserError

BETA_SCHEDULES = ("squaredcos_cap_v2", "sigmoid", "linear", "scaled_linear")
"""The noise schedules of :func:`alpha_bar_schedule` (``ModelConfig.beta_schedule``)."""
LOSS_WEIGHTINGS = ("none", "clamped_snr", "fragility")
"""The weightings of :func:`loss_weights` (``ModelConfig.loss_weighting``)."""
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


def alpha_bar_from_config(cfg: Any) -> np.ndarray:
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


def loss_weights_from_config(cfg: Any) -> np.ndarray:
  """:func:`loss_weights` of :func:`alpha_bar_from_config` with the config's weighting fields."""
  return loss_weights(alpha_bar_from_config(cfg), cfg.loss_weighting,
                      snr_clamp_min=cfg.snr_clamp_min, snr_clamp_max=cfg.snr_clamp_max,
                      fragility_a=cfg.fragility_a, fragility_b=cfg.fragility_b)


# ----------------------------------------------------------------------------------------------
# DDIM timestep lists and coefficients

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


def _ddim_sigma_and_dir_coef(xp: Any, ab: Any, ab_prev: Any, eta: float) -> tuple[Any, Any]:
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


# ----------------------------------------------------------------------------------------------
# Sampler settings

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
