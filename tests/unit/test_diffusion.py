"""Diffusion schedules, loss weights and the DDIM sampler against independent oracles.

Oracles: the spec's reference alpha_bar values, scalar float64 loops written
here from the formulas, and a float64 NumPy DDIM sampler (guidance, unbiased-std rescale,
zero-terminal-SNR step) that walks the reference's timesteps as the reference computes them
(``t -> t - T // n``). Tolerances: float64 vs float64 1e-12; float32 JAX vs float64 NumPy ~1e-5.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm_jax import diffusion
from lcm_jax.errors import UserError
from lcm_jax.models.config import ModelConfig

T = 100
SHAPE = (2, 3, 16)


# ---------------------------------------------------------------------------------------------
# Scalar float64 oracles for the schedules.

def loop_cosine_zero_snr(num_steps: int) -> np.ndarray:
  """Cosine schedule by a scalar loop over alphas, rescaled through SNR-space formulas."""
  def f(u):
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  alpha_bar, prod = [], 1.0
  for i in range(num_steps):
    beta = min(1.0 - f((i + 1) / num_steps) / f(i / num_steps), 0.999)
    prod *= 1.0 - beta
    alpha_bar.append(prod)
  # sqrt(alpha_bar) = sqrt(SNR / (1 + SNR)); shift/scale it, then back to alpha_bar.
  snrs = [a / (1.0 - a) for a in alpha_bar]
  roots = [math.sqrt(s / (1.0 + s)) for s in snrs]
  first, last = roots[0], roots[-1]
  return np.array([((r - last) * first / (first - last)) ** 2 for r in roots])


def loop_linear(betas) -> np.ndarray:
  out, prod = [], 1.0
  for b in betas:
    prod *= 1.0 - b
    out.append(prod)
  return np.array(out)


def test_cosine_zero_snr_matches_spec_values_and_loop_oracle():
  ab = diffusion.alpha_bar_schedule("squaredcos_cap_v2", T)
  assert ab.shape == (T,) and ab.dtype == np.float64
  # The spec's values and half a unit of their last stated digit.
  spec = {0: (0.99937, 5e-6), 10: (0.9667, 5e-5), 50: (0.4781, 5e-5), 90: (0.0194, 5e-5),
          98: (2.28e-4, 5e-7)}
  for t, (value, half_unit) in spec.items():
    assert abs(ab[t] - value) <= half_unit, (t, ab[t], value)
    assert abs(ab[t] - value) / value < 2e-3, (t, ab[t], value)
  assert ab[99] == 0.0
  np.testing.assert_allclose(ab, loop_cosine_zero_snr(T), rtol=1e-12, atol=1e-15)
  # Without the rescale the last value is small but not 0 (beta capped at 0.999).
  raw = diffusion.alpha_bar_schedule("squaredcos_cap_v2", T, rescale_zero_terminal_snr=False)
  assert 0.0 < raw[-1] < 1e-6 and raw[0] == pytest.approx(ab[0], rel=1e-14)
  assert np.all(np.diff(ab) < 0)


def test_linear_and_scaled_linear_match_loops_and_rescale_keeps_first():
  for name, betas in (("linear", np.linspace(1e-4, 0.02, T)),
                      ("scaled_linear", [(1e-2 + i * (math.sqrt(0.02) - 1e-2) / (T - 1)) ** 2
                                         for i in range(T)])):
    raw = diffusion.alpha_bar_schedule(name, T, rescale_zero_terminal_snr=False)
    np.testing.assert_allclose(raw, loop_linear(betas), rtol=1e-12)
    rescaled = diffusion.alpha_bar_schedule(name, T)
    assert rescaled[0] == pytest.approx(raw[0], rel=1e-14)
    assert rescaled[-1] == 0.0 and raw[-1] > 0.01
    assert np.all(np.diff(rescaled) < 0)
  # A 3-step linear schedule by hand: sqrt-shift-scale-square.
  raw = loop_linear([0.1, 0.2, 0.3])
  s = np.sqrt(raw)
  expected = ((s - s[-1]) * s[0] / (s[0] - s[-1])) ** 2
  got = diffusion.alpha_bar_schedule("linear", 3, beta_start=0.1, beta_end=0.3)
  np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_sigmoid_schedule():
  ab = diffusion.alpha_bar_schedule("sigmoid", T, sigmoid_alpha=1.5, sigmoid_beta=0.0)
  assert np.all(np.isfinite(ab)) and np.all(np.diff(ab) < 0)
  assert ab[0] > 0.99 and ab[-1] == 0.0
  assert ab[49] == pytest.approx(0.5, abs=1e-15)  # tau = 0.5: logit 0, sigmoid(beta = 0)
  tau = 10 / T  # t = 9
  expected = 1.0 / (1.0 + math.exp(-(0.7 - 3.5 * math.log(tau / (1 - tau)))))
  got = diffusion.alpha_bar_schedule("sigmoid", T, sigmoid_alpha=3.5, sigmoid_beta=0.7)
  assert got[9] == pytest.approx(expected, rel=1e-12)
  # The rescale is a no-op: the last is already 0.
  raw = diffusion.alpha_bar_schedule("sigmoid", T, rescale_zero_terminal_snr=False)
  np.testing.assert_array_equal(raw, ab)


def test_schedule_errors_and_config():
  with pytest.raises(ValueError, match="schedule"):
    diffusion.alpha_bar_schedule("cosine", T)
  with pytest.raises(ValueError, match="num_steps"):
    diffusion.alpha_bar_schedule("linear", 0)
  cfg = ModelConfig(family="two_tower_diffusion_lcm", beta_schedule="sigmoid", sigmoid_alpha=3.5,
                    num_diffusion_train_steps=50, loss_weighting="clamped_snr", snr_clamp_max=2.0)
  ab = diffusion.alpha_bar_from_config(cfg)
  np.testing.assert_array_equal(ab, diffusion.alpha_bar_schedule("sigmoid", 50, sigmoid_alpha=3.5))
  w = diffusion.loss_weights_from_config(cfg)
  np.testing.assert_array_equal(w, np.clip(ab / (1 - ab), 0.0, 2.0))


def test_loss_weights():
  ab = diffusion.alpha_bar_schedule("squaredcos_cap_v2", T)
  with np.errstate(divide="ignore"):
    snr = ab / (1.0 - ab)
  np.testing.assert_array_equal(diffusion.loss_weights(ab, "none"), np.ones(T))
  got = diffusion.loss_weights(ab, "clamped_snr", snr_clamp_min=0.5, snr_clamp_max=5.0)
  np.testing.assert_allclose(got, np.clip(snr, 0.5, 5.0), rtol=1e-14)
  assert got[0] == 5.0 and got[-1] == 0.5
  with np.errstate(all="raise"):
    frag = diffusion.loss_weights(ab, "fragility", fragility_a=-4.0, fragility_b=3.5)
  assert np.all(np.isfinite(frag)) and np.all(frag > 0) and np.all(frag <= 1)
  assert frag[-1] == 1.0  # log SNR = -inf
  t = 50
  expected = 1.0 / (1.0 + math.exp(-(-4.0 * math.log(snr[t]) + 3.5)))
  assert frag[t] == pytest.approx(expected, rel=1e-12)
  assert np.all(np.diff(frag) >= 0)  # noisier -> larger weight for a < 0
  # a = 0 is a constant sigmoid(b), also at SNR 0; alpha_bar = 1 (SNR inf) is finite too.
  flat = diffusion.loss_weights(np.array([1.0, 0.5, 0.0]), "fragility", fragility_a=0.0,
                                fragility_b=0.3)
  np.testing.assert_allclose(flat, 1 / (1 + math.exp(-0.3)), rtol=1e-14)
  ends = diffusion.loss_weights(np.array([1.0, 0.0]), "fragility")
  np.testing.assert_array_equal(ends, [0.0, 1.0])
  with pytest.raises(ValueError, match="kind"):
    diffusion.loss_weights(ab, "min_snr")


def test_add_noise_and_sample_timesteps():
  rng = np.random.default_rng(0)
  ab = diffusion.alpha_bar_schedule("squaredcos_cap_v2", T)
  x0 = rng.standard_normal(SHAPE)
  noise = rng.standard_normal(SHAPE)
  t = rng.integers(0, T, SHAPE[:-1])
  got = diffusion.add_noise(jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32),
                            jnp.asarray(t), jnp.asarray(ab, jnp.float32))
  assert got.dtype == jnp.float32 and got.shape == SHAPE
  expected = np.sqrt(ab[t])[..., None] * x0 + np.sqrt(1 - ab[t])[..., None] * noise
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
  # Broadcast t (batch, 1) over the length axis; t = 99 is pure noise.
  got = diffusion.add_noise(x0, noise, jnp.full((2, 1), 99), jnp.asarray(ab, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), noise, rtol=1e-6, atol=1e-6)
  ts = diffusion.sample_timesteps(jax.random.key(0), (4096,), T)
  assert ts.dtype == jnp.int32 and int(ts.min()) == 0 and int(ts.max()) == T - 1


# ---------------------------------------------------------------------------------------------
# Timestep lists.

def test_ddim_timesteps_lists():
  ref = diffusion.ddim_timesteps(100, 40, "trailing_reference")
  assert ref.dtype == np.int64
  assert ref.tolist() == list(range(99, 0, -2))  # 50 values: 99, 97, ..., 1
  assert len(ref) == 50
  exact = diffusion.ddim_timesteps(100, 40, "trailing")
  assert len(exact) == 40 and exact[0] == 99 and exact[-1] == 1
  assert exact[:6].tolist() == [99, 97, 94, 91, 89, 87]  # round(97.5) = 98, round(92.5) = 92
  assert np.all(np.diff(exact) < 0)
  np.testing.assert_array_equal(diffusion.ddim_timesteps(100, 40, "leading"),
                                np.arange(78, -1, -2))
  lin = diffusion.ddim_timesteps(100, 40, "linspace")
  assert len(lin) == 40 and lin[0] == 99 and lin[-1] == 0
  assert lin[1] == round(99 * 38 / 39)
  for n in (1, 7, 29, 31, 58, 97, 100):  # 29/31/58/97: float arange is one element too long
    for spacing in diffusion.TIMESTEP_SPACINGS:
      ts = diffusion.ddim_timesteps(100, n, spacing)
      assert np.all(np.diff(ts) < 0) and ts.min() >= 0 and ts.max() <= 99, (n, spacing)
      if spacing != "trailing_reference":
        assert len(ts) == n, (n, spacing)
  np.testing.assert_array_equal(diffusion.ddim_timesteps(100, 100, "trailing"),
                                np.arange(99, -1, -1))
  for bad in (0, 101):
    with pytest.raises(ValueError, match="num_inference_steps"):
      diffusion.ddim_timesteps(100, bad, "trailing")
  with pytest.raises(ValueError, match="spacing"):
    diffusion.ddim_timesteps(100, 40, "uniform")


def test_ddim_alpha_pairs_match_reference_prev_rule():
  ab = diffusion.alpha_bar_schedule("squaredcos_cap_v2", T)
  for n in (40, 30, 7, 1, 100):
    ts = diffusion.ddim_timesteps(T, n, "trailing_reference")
    ab_t, ab_prev = diffusion.ddim_alpha_pairs(ab, ts)
    step = T // n
    # The reference: prev = t - T // n, alpha 1 once prev < 0.
    expected_prev = [ab[t - step] if t - step >= 0 else 1.0 for t in ts]
    np.testing.assert_array_equal(ab_prev, expected_prev)
    np.testing.assert_array_equal(ab_t, ab[ts])
  ts = diffusion.ddim_timesteps(T, 40, "trailing")
  _, ab_prev = diffusion.ddim_alpha_pairs(ab, ts)
  assert ab_prev[0] == ab[97] and ab_prev[1] == ab[94] and ab_prev[-1] == 1.0
  with pytest.raises(ValueError, match="descending"):
    diffusion.ddim_alpha_pairs(ab, np.array([1, 5]))


# ---------------------------------------------------------------------------------------------
# Sampler pieces.

def test_step_helpers():
  rng = np.random.default_rng(1)
  x, x0, noise = (rng.standard_normal(SHAPE) for _ in range(3))
  ab, ab_prev = 0.3, 0.7
  eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
  np.testing.assert_allclose(np.asarray(diffusion.predict_eps(x, x0, ab)), eps, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(diffusion.predict_eps(x, x0, 0.0)), x, rtol=1e-6)
  for eta in (0.0, 0.5, 1.0):
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
    expected = (math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sigma ** 2) * eps
                + sigma * noise)
    got = diffusion.ddim_step(x, x0, eps, ab, ab_prev, eta, noise)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
  # eta = 0 ignores the noise; ab = 0 (terminal) is finite.
  a = diffusion.ddim_step(x, x0, eps, ab, ab_prev, 0.0, noise)
  b = diffusion.ddim_step(x, x0, eps, ab, ab_prev, 0.0, 10 * noise + 3)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  term = diffusion.ddim_step(x, x0, x, 0.0, 0.5, 1.0, noise)
  assert np.all(np.isfinite(np.asarray(term)))
  # guided_eps: plain CFG, and the rescale with the UNBIASED std (ddof=1).
  ec, eu = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
  plain = eu + 3.0 * (ec - eu)
  np.testing.assert_allclose(np.asarray(diffusion.guided_eps(ec, eu, 3.0, 0.0)), plain,
                             rtol=1e-5, atol=1e-5)
  ratio = np.std(ec, axis=-1, ddof=1, keepdims=True) / np.std(plain, axis=-1, ddof=1,
                                                               keepdims=True)
  expected = 0.7 * plain * ratio + 0.3 * plain
  np.testing.assert_allclose(np.asarray(diffusion.guided_eps(ec, eu, 3.0, 0.7)), expected,
                             rtol=1e-5, atol=1e-5)


def test_sampler_config_validate():
  diffusion.SamplerConfig().validate(T)
  hash(diffusion.SamplerConfig())
  cases = [(dict(guidance_rescale=1.5), "guidance_rescale"), (dict(num_steps=0), "num_steps"),
           (dict(num_steps=101), "num_steps"), (dict(timestep_spacing="foo"), "timestep_spacing"),
           (dict(guidance_scale=-1.0), "guidance_scale"),
           (dict(initial_noise_scale=0.0), "initial_noise_scale"),
           (dict(epsilon_scaling=0.0), "epsilon_scaling"), (dict(eta=-0.1), "eta"),
           (dict(clip_noise=0.0), "clip_noise"),
           (dict(clip_sample_range=0.0), "clip_sample_range"),
           (dict(dynamic_thresholding_ratio=1.5), "dynamic_thresholding_ratio"),
           (dict(sample_max_value=0.5), "sample_max_value")]
  for kw, field in cases:
    with pytest.raises(UserError, match=field):
      diffusion.SamplerConfig(**kw).validate(T)
  ab = diffusion.alpha_bar_schedule("squaredcos_cap_v2", T)
  with pytest.raises(ValueError, match="num_steps"):
    diffusion.sample(lambda x, t, u: x, jax.random.key(0), SHAPE, ab,
                     diffusion.SamplerConfig(num_steps=101))


# ---------------------------------------------------------------------------------------------
# The sampler against a float64 NumPy DDIM.

_W = np.random.default_rng(7).standard_normal((2, SHAPE[-1]))


def np_denoise(x, t):
  """(x0_cond, x0_uncond): fixed nonlinear functions of x and t with different constants.

  The two branches disagree by O(0.1-1), as a trained model's would. Where they disagree by
  O(1) (independent random targets), the guided trajectory drifts far from the conditional
  x0, std(eps_c) / std(eps) reaches ~50 at low noise and the rescaled sampler amplifies float32
  rounding ~1e4-fold: a float32-vs-float64 comparison would then test conditioning, not code.
  """
  cond = 0.8 * np.tanh(0.7 * x + 0.01 * t) + _W[0]
  uncond = 0.6 * np.tanh(0.9 * x - 0.02 * t) + _W[0] + 0.1 * _W[1]
  return cond, uncond


def make_jax_denoise(calls: list):
  w = jnp.asarray(_W, jnp.float32)

  def fn(x, t, with_uncond):
    calls.append(with_uncond)
    assert x.dtype == jnp.float32 and x.shape == SHAPE
    assert t.shape == () and t.dtype == jnp.int32
    tf = t.astype(jnp.float32)
    cond = 0.8 * jnp.tanh(0.7 * x + 0.01 * tf) + w[0]
    if not with_uncond:
      return cond
    return cond, 0.6 * jnp.tanh(0.9 * x - 0.02 * tf) + w[0] + 0.1 * w[1]

  return fn


def initial_noise(rng, scale):
  """The documented initial noise: normal(split(rng)[0]) * scale, clipped to +-100."""
  z = np.asarray(jax.random.normal(jax.random.split(rng)[0], SHAPE, jnp.float32), np.float64)
  return np.clip(z * np.float32(scale), -100, 100)


def np_threshold(x0, thresholding=False, ratio=0.995, max_value=6.0, clip_sample=False,
                 clip_range=1.0):
  """diffusers' DDIM x0 clipping in float64, written from its definition: dynamic
  thresholding per vector (``s`` = the ``ratio`` quantile of |x0|, linear interpolation between
  order statistics, clamped to [1, max_value]; ``clip(x0, -s, s) / s``), else static clipping."""
  x0 = np.asarray(x0, np.float64)
  if thresholding:
    flat = np.sort(np.abs(x0).reshape(-1, x0.shape[-1]), axis=-1)
    pos = ratio * (flat.shape[-1] - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    s = flat[:, lo] + (pos - lo) * (flat[:, hi] - flat[:, lo])
    s = np.minimum(np.maximum(s, 1.0), max_value).reshape(x0.shape[:-1] + (1,))
    return np.minimum(np.maximum(x0, -s), s) / s
  if clip_sample:
    return np.minimum(np.maximum(x0, -clip_range), clip_range)
  return x0


def np_ddim(x, ab, n, g, r, eps_scaling, denoise, clip_noise=None, **threshold):
  """The reference's DDIM: trailing integer spacing, prev = t - T // n, alpha 1 past the end;
  x0 clipped/thresholded (``threshold``: :func:`np_threshold`'s options) after epsilon scaling,
  epsilon NOT recomputed from it; x clipped to +-clip_noise after every step."""
  step = T // n
  x0 = None
  for t in range(T - 1, -1, -step):
    a = ab[t]
    a_prev = ab[t - step] if t - step >= 0 else 1.0
    x0_c, x0_u = denoise(x, t)
    if a == 0.0:
      x0, eps = x0_c, x
    elif g == 1.0:
      x0 = x0_c
      eps = (x - math.sqrt(a) * x0_c) / math.sqrt(1 - a)
    else:
      eps_c = (x - math.sqrt(a) * x0_c) / math.sqrt(1 - a)
      eps_u = (x - math.sqrt(a) * x0_u) / math.sqrt(1 - a)
      eps = eps_u + g * (eps_c - eps_u)
      if r > 0:
        std_c = np.std(eps_c, axis=-1, ddof=1, keepdims=True)
        std_g = np.std(eps, axis=-1, ddof=1, keepdims=True)
        eps = r * eps * std_c / std_g + (1 - r) * eps
      x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    eps = eps / eps_scaling
    x0 = np_threshold(x0, **threshold)
    x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    if clip_noise is not None:
      x = np.minimum(np.maximum(x, -clip_noise), clip_noise)
  return x0


@pytest.fixture(scope="module")
def cosine_ab():
  return diffusion.alpha_bar_schedule("squaredcos_cap_v2", T)


def test_oracle_denoiser_recovers_x0(cosine_ab):
  target = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)

  def oracle(x, t, with_uncond):
    x0 = jnp.broadcast_to(jnp.asarray(target), x.shape)
    return (x0, x0) if with_uncond else x0

  rng = jax.random.key(11)
  for g, r in ((1.0, 0.0), (3.0, 0.7), (3.0, 0.0)):
    cfg = diffusion.SamplerConfig(guidance_scale=g, guidance_rescale=r, epsilon_scaling=1.0)
    got = diffusion.sample(oracle, rng, SHAPE, cosine_ab, cfg)
    assert got.dtype == jnp.float32 and got.shape == SHAPE
    np.testing.assert_allclose(np.asarray(got), target, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("g,r,eps_scaling,n", [
    (1.0, 0.7, 1.0, 40),       # unguided: with_uncond False, r unused
    (3.0, 0.7, 1.0, 40),       # paper guidance + rescale
    (3.0, 0.0, 1.0, 40),       # guidance without rescale
    (3.0, 0.7, 1.00045, 25),   # paper settings with 25 steps (step 4)
])
def test_sample_matches_numpy_ddim(cosine_ab, g, r, eps_scaling, n):
  calls = []
  cfg = diffusion.SamplerConfig(num_steps=n, guidance_scale=g, guidance_rescale=r,
                                epsilon_scaling=eps_scaling)
  rng = jax.random.key(5)
  got = np.asarray(diffusion.sample(make_jax_denoise(calls), rng, SHAPE, cosine_ab, cfg))
  assert set(calls) == {g != 1.0}
  x = initial_noise(rng, cfg.initial_noise_scale)
  expected = np_ddim(x, cosine_ab, n, g, r, eps_scaling, np_denoise)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)
  if g != 1.0:  # the guided result really differs from the conditional-only one
    plain = np_ddim(x, cosine_ab, n, 1.0, 0.0, eps_scaling, np_denoise)
    assert np.max(np.abs(plain - expected)) > 1e-2


def test_guidance_with_equal_branches_equals_no_guidance(cosine_ab):
  """Identical cond/uncond: g and r change nothing, epsilon scaling included."""
  def fn(x, t, with_uncond):
    x0 = 0.9 * jnp.tanh(x + 0.01 * t.astype(jnp.float32))
    return (x0, x0) if with_uncond else x0

  rng = jax.random.key(2)
  base = diffusion.SamplerConfig(guidance_scale=1.0)
  plain = diffusion.sample(fn, rng, SHAPE, cosine_ab, base)
  guided = diffusion.sample(fn, rng, SHAPE, cosine_ab, base.replace(guidance_scale=3.0))
  np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), rtol=1e-4, atol=1e-4)


def test_eta_noise(cosine_ab):
  fn = make_jax_denoise([])
  cfg = diffusion.SamplerConfig(eta=1.0)
  a = diffusion.sample(fn, jax.random.key(4), SHAPE, cosine_ab, cfg)
  b = diffusion.sample(fn, jax.random.key(4), SHAPE, cosine_ab, cfg)
  c = diffusion.sample(fn, jax.random.key(9), SHAPE, cosine_ab, cfg)
  det = diffusion.sample(fn, jax.random.key(4), SHAPE, cosine_ab, cfg.replace(eta=0.0))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.all(np.isfinite(np.asarray(a)))
  assert np.max(np.abs(np.asarray(a) - np.asarray(det))) > 1e-3
  assert np.max(np.abs(np.asarray(a) - np.asarray(c))) > 1e-3


def test_sample_under_jit_equals_eager(cosine_ab):
  fn = make_jax_denoise([])
  cfg = diffusion.SamplerConfig()

  def run(rng, cfg):
    return diffusion.sample(fn, rng, SHAPE, cosine_ab, cfg)

  jitted = jax.jit(run, static_argnames="cfg")
  rng = jax.random.key(8)
  np.testing.assert_allclose(np.asarray(jitted(rng, cfg)), np.asarray(run(rng, cfg)), rtol=1e-6,
                             atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Clipping after every step and x0 thresholding (the reference's clip_noise, diffusers' options)

def test_threshold_x0_matches_numpy_definition():
  rng = np.random.default_rng(0)
  x0 = (rng.standard_normal((4, 1, 16)) * np.array([0.3, 1.5, 3.0, 20.0])[:, None, None])
  x0 = x0.astype(np.float32)
  for kw in (dict(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=6.0),
             dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=2.0),
             dict(clip_sample=True, clip_sample_range=0.7),
             dict(thresholding=True, clip_sample=True)):  # thresholding wins
    cfg = diffusion.SamplerConfig(**kw)
    got = np.asarray(diffusion.threshold_x0(jnp.asarray(x0), cfg))
    want = np_threshold(x0, thresholding=cfg.thresholding,
                        ratio=cfg.dynamic_thresholding_ratio, max_value=cfg.sample_max_value,
                        clip_sample=cfg.clip_sample, clip_range=cfg.clip_sample_range)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=str(kw))
    if cfg.thresholding:  # row 0: s clamps to 1 (plain clipping to [-1, 1]); row 3: to the max
      assert np.abs(got).max() <= 1.0 + 1e-6
      np.testing.assert_allclose(got[3], np.clip(x0[3], -cfg.sample_max_value,
                                                 cfg.sample_max_value) / cfg.sample_max_value,
                                 rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(diffusion.threshold_x0(x0, diffusion.SamplerConfig())),
                                x0)  # the defaults leave x0 alone


@pytest.mark.parametrize("g,r,kw", [
    (3.0, 0.7, dict(clip_noise=0.7)),
    (1.0, 0.0, dict(clip_noise=0.7, clip_sample=True, clip_sample_range=1.2)),
    (3.0, 0.7, dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)),
    (1.0, 0.0, dict(clip_noise=1.5, thresholding=True, dynamic_thresholding_ratio=0.75,
                    sample_max_value=1.8)),
])
def test_sample_clips_every_step_and_thresholds_like_numpy_ddim(cosine_ab, g, r, kw):
  """Every DDIM step of the sampler against the float64 NumPy step with the same clipping and
  thresholding; the settings are chosen so that they change the result."""
  cfg = diffusion.SamplerConfig(num_steps=20, guidance_scale=g, guidance_rescale=r,
                                epsilon_scaling=1.00045, **kw)
  rng = jax.random.key(6)
  got = np.asarray(diffusion.sample(make_jax_denoise([]), rng, SHAPE, cosine_ab, cfg))
  x = np.clip(initial_noise(rng, cfg.initial_noise_scale), -cfg.clip_noise, cfg.clip_noise)
  opts = dict(thresholding=cfg.thresholding, ratio=cfg.dynamic_thresholding_ratio,
              max_value=cfg.sample_max_value, clip_sample=cfg.clip_sample,
              clip_range=cfg.clip_sample_range)
  expected = np_ddim(x, cosine_ab, 20, g, r, cfg.epsilon_scaling, np_denoise,
                     clip_noise=cfg.clip_noise, **opts)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)
  # Not vacuous: clipping only the initial noise (the old sampler) / no thresholding differ.
  initial_only = np_ddim(x, cosine_ab, 20, g, r, cfg.epsilon_scaling, np_denoise, **opts)
  unthresholded = np_ddim(x, cosine_ab, 20, g, r, cfg.epsilon_scaling, np_denoise,
                          clip_noise=cfg.clip_noise)
  if cfg.clip_noise < 100:
    assert np.max(np.abs(initial_only - expected)) > 1e-2
  if cfg.thresholding or cfg.clip_sample:
    assert np.max(np.abs(unthresholded - expected)) > 1e-2
