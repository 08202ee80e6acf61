"""Plain-PyTorch models and generation (lcm_interop.torch_models, lcm_interop.torch_generate)
against the JAX models, through an actual export (``export_weights`` -> ``load_from_card``).
The One-Tower's parity tests are in tests/interop/test_interop.py.

The weights are a fresh init with every parameter jittered (the zero-initialised AdaLN modulators
too, so every path matters) and a non-trivial normalizer. Float32 on both sides: the two
frameworks differ only in rounding, ~1e-7 relative; we assert a max relative error (max |diff| /
max |JAX|) of 1e-5. Generation is fed the JAX sampler's own noise draws (the conventions of
lcm_jax.generate / lcm_jax.diffusion, written out in ``jax_noise`` below), so the concepts agree
to the same tolerance and the stopping rules stop the same rows at the same concepts.
"""

import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the optional 'data' extra
pytest.importorskip("yaml")

# pylint: disable=g-import-not-at-top
from lcm_jax import diffusion  # noqa: E402
from lcm_interop import export  # noqa: E402
from lcm_jax import generate as gen_lib  # noqa: E402
from lcm_interop import torch_generate, torch_models  # noqa: E402
from lcm_jax.models.base_lcm import BaseLCM  # noqa: E402
from lcm_jax.models.config import ModelConfig  # noqa: E402
from lcm_jax.models.two_tower import TwoTowerLCM, cross_attention_mask  # noqa: E402
from tests import helpers  # noqa: E402
from tests.interop.test_export import spec_shapes  # noqa: E402

DIM = 16
TOL = 1e-5
FAMILIES = ("base_lcm", "two_tower_diffusion_lcm")
MEASURED: dict = {}  # max relative errors, printed at the end (pytest -s)


def _cfg(family: str) -> ModelConfig:
  return ModelConfig(family=family, model_dim=32, num_layers=2, denoiser_num_layers=2, num_heads=4,
                     ffn_inner_dim=96, sonar_embed_dim=DIM, dropout=0.0, dtype="float32")




@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
  """``(jax model, variables, torch model, export dir)`` of one family."""
  family = request.param
  cfg = _cfg(family)
  model = BaseLCM(cfg) if family == "base_lcm" else TwoTowerLCM(cfg)
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, DIM)), jnp.ones((1, 4), jnp.int32),
                 jnp.arange(4)[None])
  v = helpers.perturbed_variables(v, 1 if family == "base_lcm" else 2)
  out = str(tmp_path_factory.mktemp("torch") / family)
  export.export_weights(v["params"], v["buffers"], cfg, out)
  return model, v, torch_models.load_from_card(os.path.join(out, "model_card.yaml")), out


def _rel(ours, theirs, name):
  a = np.asarray(theirs, np.float64)
  b = np.asarray(ours, np.float64)
  err = float(np.abs(a - b).max() / np.abs(a).max())
  MEASURED[name] = max(err, MEASURED.get(name, 0.0))
  assert err <= TOL, f"{name}: max relative error {err:.3g}"
  return err


def _packed(seed=0):
  """Two rows of 12: [doc 5 | doc 4 | pad 3] and [doc 7 | doc 5]; garbage in the padding."""
  seg = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 7 + [2] * 5], np.int32)
  pos = np.array([list(range(5)) + list(range(4)) + [0] * 3, list(range(7)) + list(range(5))],
                 np.int32)
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(2, 12, DIM)).astype(np.float32)
  emb[0, 9:] = 50.0
  return emb, seg, pos


def _t(x, dtype=None):
  t = torch.from_numpy(np.array(x))
  return t if dtype is None else t.to(dtype)


# ---------------------------------------------------------------------------------------------
# Structure

def test_state_dict_is_the_spec_list_and_loads_strictly(pair):
  _, _, tm, out = pair
  sd = tm.state_dict()
  assert {k: tuple(v.shape) for k, v in sd.items()} == spec_shapes(tm.config)
  assert all(v.dtype == torch.float32 for v in sd.values())
  assert not tm.training
  # The checkpoint is what the model holds, bit for bit.
  saved = torch.load(os.path.join(out, "model.pt"), weights_only=True)["model"]
  for k, v in saved.items():
    assert torch.equal(sd[k], v), k


def test_rope_rotates_adjacent_pairs():
  """Interleaved layout: (x[2i], x[2i+1]) as the complex number x[2i] + i x[2i+1], times
  exp(i * pos * 10000^(-2i/D))."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 3, 2, 8)).astype(np.float32)
  pos = np.array([[0, 1, 7]])
  got = torch_models.apply_rope(_t(x), torch_models.rope_tables(_t(pos), 8)).numpy()
  z = x[..., 0::2] + 1j * x[..., 1::2]
  freqs = 10000.0 ** (-np.arange(0, 8, 2) / 8)
  z = z * np.exp(1j * pos[..., None, None] * freqs)
  want = np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Forward passes

def test_forward_matches_jax(pair):
  model, v, tm, _ = pair
  emb, seg, pos = _packed()
  family = tm.config.family
  with torch.no_grad():
    if family == "base_lcm":
      want, want_norm = model.apply(v, emb, seg, pos)
      got, got_norm = tm(_t(emb), _t(seg, torch.long), _t(pos, torch.long))
      valid = seg > 0  # padding outputs are garbage on both sides
      _rel(got.numpy()[valid], np.asarray(want)[valid], "base_lcm forward")
    else:
      rng = np.random.default_rng(1)
      noisy = rng.normal(size=emb.shape).astype(np.float32)
      t = rng.integers(0, 100, size=seg.shape).astype(np.int32)
      drop = rng.random(seg.shape) < 0.3
      want, want_norm = model.apply(v, emb, seg, pos, noisy=noisy, timesteps=t, drop_cond=drop)
      got, got_norm = tm(_t(emb), _t(seg, torch.long), _t(pos, torch.long), noisy=_t(noisy),
                         timesteps=_t(t, torch.long), drop_cond=_t(drop))
      _rel(got.numpy(), want, "two_tower forward")
      ctx_want, _ = model.apply(v, emb, seg, pos, method=TwoTowerLCM.contextualize)
      ctx_got, _ = tm.contextualize(_t(emb), _t(seg, torch.long), _t(pos, torch.long))
      valid = seg > 0
      _rel(ctx_got.numpy()[valid], np.asarray(ctx_want)[valid], "two_tower contextualizer")
  _rel(got_norm.numpy(), want_norm, f"{family} normalizer")


@pytest.mark.parametrize("pair", ["two_tower_diffusion_lcm"], indirect=True)
def test_two_tower_denoiser_matches_jax(pair):
  """The denoiser alone, for given noisy inputs and timesteps (including t = 0 and T - 1), with a
  fine-tuning-style shifted mask over a separate context."""
  model, v, tm, _ = pair
  rng = np.random.default_rng(5)
  ctx = rng.normal(size=(3, 9, DIM)).astype(np.float32)
  ctx_seg = np.ones((3, 9), np.int32)
  ctx_seg[2, 7:] = 0
  ctx_pos = np.broadcast_to(np.arange(9, dtype=np.int32), (3, 9))
  noisy = rng.normal(size=(3, 4, DIM)).astype(np.float32)
  t = np.array([[0, 99, 50, 7], [1, 2, 3, 4], [98, 60, 30, 10]], np.int32)
  shift = np.array([2, 5, 0], np.int32)
  q = dict(q_segment_ids=np.ones((3, 4), np.int32), q_index=np.arange(4)[None].repeat(3, 0))
  drop = np.zeros((3, 4), bool)
  drop[1, 2] = True

  context, _ = model.apply(v, ctx, ctx_seg, ctx_pos, method=TwoTowerLCM.contextualize)
  k, vv = model.apply(v, context, method=TwoTowerLCM.cross_kv)
  mask = cross_attention_mask(ctx_seg, drop, shift=shift, **q)
  want = model.apply(v, noisy, t, k, vv, mask, method=TwoTowerLCM.denoise)

  with torch.no_grad():
    tctx, _ = tm.contextualize(_t(ctx), _t(ctx_seg, torch.long), _t(ctx_pos, torch.long))
    tk, tv = tm.cross_kv(tctx)
    tmask = torch_models.cross_attention_mask(
        _t(ctx_seg, torch.long), _t(drop), shift=_t(shift, torch.long),
        q_segment_ids=_t(q["q_segment_ids"], torch.long), q_index=_t(q["q_index"], torch.long))
    np.testing.assert_array_equal(tmask.numpy(), np.asarray(mask))
    got = tm.denoise(_t(noisy), _t(t, torch.long), tk, tv, tmask)
  _rel(tk.numpy(), k, "two_tower cross K")
  _rel(got.numpy(), want, "two_tower denoiser")
  # The zero slot's keys are the k biases.
  bias = tm.denoiser.layers[1].cross_attention.k_proj.bias.detach().numpy().reshape(4, 8)
  np.testing.assert_array_equal(tk[1, 0, 0].numpy(), bias)


def test_kv_cache_equals_full_forward(pair):
  _, _, tm, _ = pair
  rng = np.random.default_rng(3)
  emb = _t(rng.normal(size=(2, 6, DIM)).astype(np.float32))
  fn = tm.forward if tm.config.family == "base_lcm" else tm.contextualize
  cached = tm.forward_cached if tm.config.family == "base_lcm" else tm.contextualize_cached
  with torch.no_grad():
    full, _ = fn(emb)
    cache = tm.init_cache(2, 8)
    first, _ = cached(emb[:, :4], torch.arange(4)[None].expand(2, 4), cache,
                      torch.zeros(2, dtype=torch.long))
    rest = [cached(emb[:, i:i + 1], torch.full((2, 1), i), cache, torch.full((2,), i))[0]
            for i in range(4, 6)]
  torch.testing.assert_close(torch.cat([first] + rest, dim=1), full, rtol=1e-5, atol=1e-5)


def test_low_precision_checkpoint_loads_and_runs(pair, tmp_path):
  model, v, _, _ = pair
  cfg = model.config
  out = str(tmp_path / "bf16")
  export.export_weights(v["params"], v["buffers"], cfg, out, dtype="bfloat16")
  tm = torch_models.load_from_card(out, dtype=None)
  assert tm.lcm.layers[0].ffn.gate_proj.weight.dtype == torch.bfloat16 if cfg.family == \
      "base_lcm" else tm.denoiser.layers[0].modulator.fc.weight.dtype == torch.bfloat16
  center = tm.frontend.sonar_normalizer.center if cfg.family == "base_lcm" else \
      tm.sonar_normalizer.center
  assert center.dtype == torch.float32
  emb, seg, pos = _packed()
  with torch.no_grad():
    got, _ = tm(_t(emb), _t(seg, torch.long), _t(pos, torch.long))
  want, _ = model.apply(v, emb, seg, pos)
  valid = seg > 0
  err = np.abs(got.numpy()[valid] - np.asarray(want)[valid]).max() / np.abs(want).max()
  assert got.dtype == torch.float32 and 0 < err < 0.1


# ---------------------------------------------------------------------------------------------
# Sampler and generation

def sampler_noise(key, sampler, shape):
  """``(initial noise, i -> eta noise of step i)`` as ``diffusion.sample(..., key, shape, ...)``
  draws them."""
  visited = len(diffusion.ddim_timesteps(100, sampler.num_steps, sampler.timestep_spacing))
  init_key, eta_key = jax.random.split(key)
  normal = lambda k: _t(np.array(jax.random.normal(k, shape, jnp.float32)))  # noqa: E731
  return normal(init_key), lambda i: normal(jax.random.split(eta_key, visited)[i])


def jax_noise(rng, family, sampler):
  """The draws lcm_jax.generate makes for concept k (as a torch_generate NoiseFn)."""

  def noise(k, step, shape):
    key = gen_lib.step_rng(rng, k)
    if family == "base_lcm":
      return _t(np.array(gen_lib.latent_noise(key, shape)))
    initial, eta = sampler_noise(key, sampler, shape)
    return initial if step is None else eta(step)

  return noise


@pytest.mark.parametrize("settings", [
    dict(),
    dict(guidance_scale=1.0, eta=0.5, timestep_spacing="trailing", num_steps=7),
    dict(guidance_rescale=0.0, epsilon_scaling=1.0, timestep_spacing="leading", num_steps=10),
    dict(clip_noise=0.6, thresholding=True, dynamic_thresholding_ratio=0.9,
         sample_max_value=1.5),
    dict(guidance_scale=1.0, eta=0.5, clip_noise=0.8, clip_sample=True, clip_sample_range=0.9),
])
def test_sampler_matches_jax(settings):
  """Both samplers on the same analytic denoiser and the same noise."""
  cfg = diffusion.SamplerConfig(**settings)
  alpha_bar = diffusion.alpha_bar_schedule("squaredcos_cap_v2", 100)
  shape = (3, 1, DIM)
  w = np.random.default_rng(0).normal(size=(DIM, DIM)).astype(np.float32) * 0.3

  def jax_fn(x, t, with_uncond):
    c = jnp.tanh(x @ w) * (1 + t / 100)
    return (c, 0.5 * c - 0.1) if with_uncond else c

  def torch_fn(x, t, with_uncond):
    c = torch.tanh(x @ _t(w)) * (1 + t / 100)
    return (c, 0.5 * c - 0.1) if with_uncond else c

  rng = jax.random.PRNGKey(4)
  want = diffusion.sample(jax_fn, rng, shape, alpha_bar, cfg)
  initial, eta = sampler_noise(rng, cfg, shape)
  got = torch_generate.sample(torch_fn, shape, alpha_bar, cfg, initial_noise=initial,
                              step_noise=eta)
  _rel(got.numpy(), want, "sampler")


def _cos(a, b):
  return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-8))


def _oracle(free, prompts, eot, gen):
  """Expected (lengths, reasons) of the stopping rules, from an unstopped run ``free``."""
  lengths, reasons = [], []
  for b, p in enumerate(prompts):
    prev = p[-1]
    for k in range(gen.max_len):
      c, ok = free[b, k], k >= gen.min_gen_len  # the reference's step_nr - prompt_len
      if ok and _cos(c, eot) >= gen.eot_threshold:
        reason = "eot"
      elif ok and _cos(c, prev) >= gen.repetition_threshold:
        reason = "repetition"
      elif k + 1 == gen.max_len:
        reason = "max_len"
      else:
        prev = c
        continue
      lengths.append(k + 1)
      reasons.append(reason)
      break
  return np.array(lengths), reasons


def _stopping_case(free, prompts, temperature):
  """Row 0's third concept is "End of text."; a repetition threshold (just below one of the
  run's consecutive cosines) such that EOT, repetition and max_len all occur."""
  eot = free[0, 2].copy()
  cands = sorted({_cos(free[b, k], free[b, k - 1]) for b in range(len(prompts))
                  for k in range(1, free.shape[1])}, reverse=True)
  for c in cands:
    gen = gen_lib.GenerationConfig(max_len=free.shape[1], min_gen_len=1, eot_threshold=0.9999,
                                   repetition_threshold=c - 1e-4,
                                   sample_latent_variable=temperature > 0,
                                   temperature=temperature)
    lengths, reasons = _oracle(free, prompts, eot, gen)
    if reasons[0] == "eot" and lengths[0] == 3 and {"repetition", "max_len"} <= set(reasons):
      return gen, eot, lengths, reasons
  raise AssertionError("no threshold gives all three stop reasons")


@pytest.mark.parametrize("pair,variant", [("base_lcm", "guided"),  # latent noise, temperature
                                          ("two_tower_diffusion_lcm", "guided"),
                                          ("two_tower_diffusion_lcm", "unguided_eta")],
                         indirect=["pair"])
def test_generation_matches_jax(pair, variant):
  """Same noise -> same concepts, lengths and stop reasons (EOT, repetition, max_len)."""
  model, v, tm, _ = pair
  family = tm.config.family
  sampler = (diffusion.SamplerConfig(num_steps=5) if variant == "guided" else
             diffusion.SamplerConfig(num_steps=5, guidance_scale=1.0, eta=0.4))
  temperature = 0.3 if family == "base_lcm" else 0.0
  rng = jax.random.PRNGKey(7)
  prompts = [np.random.default_rng(i).normal(size=(n, DIM)).astype(np.float32)
             for i, n in enumerate((3, 1, 5, 2))]
  free = gen_lib.generate(model, v, prompts, gen_lib.GenerationConfig(
      max_len=6, sample_latent_variable=temperature > 0, temperature=temperature),
      sampler=sampler, rng=rng).embeddings
  gen, eot, lengths, reasons = _stopping_case(free, prompts, temperature)
  want = gen_lib.generate(model, v, prompts, gen, sampler=sampler, rng=rng, eot_vector=eot)
  got = torch_generate.generate(tm, prompts, gen, sampler=sampler, eot_vector=eot,
                                noise=jax_noise(rng, family, sampler))
  for res in (want, got):
    np.testing.assert_array_equal(res.lengths, lengths)
    assert list(res.reason_names()) == reasons
  _rel(got.embeddings, want.embeddings, f"{family} generation")
  for b, n in enumerate(lengths):  # frozen rows: zeros after their stop
    assert not got.embeddings[b, n:].any()
  # Another seed gives other concepts (the noise matters; the check above is not vacuous).
  other = torch_generate.generate(tm, prompts, gen, sampler=sampler, eot_vector=eot, seed=1)
  assert np.abs(other.embeddings[:, 0] - got.embeddings[:, 0]).max() > 1e-3


@pytest.mark.parametrize("pair", FAMILIES, indirect=True)
def test_first_concept_never_stops_same_lengths_as_jax(pair):
  """The reference's min_gen_len rule on both sides: a first prediction equal to the EOT vector
  does not stop its row (the old rule stopped it after one concept), and an "everything repeats"
  threshold stops every row after exactly min_gen_len + 1 concepts; JAX and torch agree."""
  model, v, tm, _ = pair
  family = tm.config.family
  sampler = diffusion.SamplerConfig(num_steps=4, clip_noise=1.0, thresholding=True,
                                    dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
  rng = jax.random.PRNGKey(3)
  prompts = [np.random.default_rng(i).normal(size=(n, DIM)).astype(np.float32)
             for i, n in enumerate((2, 4, 1))]
  free = gen_lib.generate(model, v, prompts, gen_lib.GenerationConfig(max_len=5),
                          sampler=sampler, rng=rng).embeddings
  eot = free[0, 0].copy()
  cases = [(gen_lib.GenerationConfig(max_len=5, eot_threshold=0.9999), eot)] + [
      (gen_lib.GenerationConfig(max_len=5, min_gen_len=n, repetition_threshold=-1.0), None)
      for n in (1, 3)]
  for gen, eot_vec in cases:
    want = gen_lib.generate(model, v, prompts, gen, sampler=sampler, rng=rng, eot_vector=eot_vec)
    got = torch_generate.generate(tm, prompts, gen, sampler=sampler, eot_vector=eot_vec,
                                  noise=jax_noise(rng, family, sampler))
    np.testing.assert_array_equal(got.lengths, want.lengths)
    assert list(got.reason_names()) == list(want.reason_names())
    if eot_vec is not None:
      assert want.lengths[0] > 1
    else:
      np.testing.assert_array_equal(want.lengths, gen.min_gen_len + 1)
    _rel(got.embeddings, want.embeddings, f"{family} generation (thresholded, clipped)")


@pytest.mark.parametrize("pair", ["base_lcm"], indirect=True)
def test_torch_latent_sampling_statistics(pair):
  """torch Base-LCM: sample_latent_variable adds temperature * N(0, I) in normalized space
  (mean ~0, std ~temperature over many rows and seeds); off (the default) is deterministic."""
  _, v, tm, _ = pair
  _, scale = gen_lib.normalizer_buffers(v["buffers"])
  scale = np.asarray(scale, np.float64)
  prompts = [np.random.default_rng(i).normal(size=(n, DIM)).astype(np.float32)
             for i, n in enumerate((3, 1, 5))] * 64
  base = torch_generate.generate(tm, prompts, gen_lib.GenerationConfig(max_len=1),
                                 seed=0).embeddings[:, 0]
  again = torch_generate.generate(tm, prompts, gen_lib.GenerationConfig(max_len=1, temperature=3.0),
                                  seed=5).embeddings[:, 0]
  np.testing.assert_array_equal(again, base)
  temperature = 0.5
  gen = gen_lib.GenerationConfig(max_len=1, sample_latent_variable=True, temperature=temperature)
  draws = np.stack([torch_generate.generate(tm, prompts, gen, seed=s).embeddings[:, 0]
                    for s in range(4)])
  z = (draws.astype(np.float64) - base) / scale / temperature
  n = z.size
  assert abs(z.mean()) < 4 / math.sqrt(n), z.mean()
  assert abs(z.std() - 1.0) < 4 / math.sqrt(2 * n), z.std()


def test_generator_validation(pair):
  _, _, tm, _ = pair
  with pytest.raises(ValueError, match="max_len"):
    torch_generate.Generator(tm, gen_lib.GenerationConfig(max_len=0))
  with pytest.raises(ValueError, match="eot_vector"):
    torch_generate.Generator(tm, eot_vector=np.zeros(DIM))
  with pytest.raises(ValueError, match="empty prompt"):
    torch_generate.generate(tm, [np.zeros((0, DIM))])
  if tm.config.family == "two_tower_diffusion_lcm":
    with pytest.raises(ValueError, match="guidance_rescale"):
      torch_generate.Generator(tm, sampler=diffusion.SamplerConfig(guidance_rescale=2.0))


def test_load_from_card_errors(pair, tmp_path):
  _, _, _, out = pair
  with pytest.raises(ValueError, match="does not exist"):
    torch_models.load_from_card(str(tmp_path / "missing.yaml"))
  ckpt = torch.load(os.path.join(out, "model.pt"), weights_only=True)
  key = sorted(ckpt["model"])[0]
  del ckpt["model"][key]
  bad = tmp_path / "bad"
  bad.mkdir()
  for name in os.listdir(out):
    if name != "model.pt":
      (bad / name).write_bytes(open(os.path.join(out, name), "rb").read())
  torch.save(ckpt, bad / "model.pt")
  with pytest.raises(ValueError, match=f"model.pt: missing key.*'{key}'"):
    torch_models.load_from_card(str(bad))


def test_training_path_does_not_import_torch():
  code = ("import sys; import lcm_jax.main, lcm_jax.train, lcm_jax.generate, lcm_jax.predict, "
          "lcm_jax.models.two_tower, lcm_jax.diffusion; assert 'torch' not in sys.modules")
  r = subprocess.run([sys.executable, "-c", code], cwd=helpers.ROOT, env=helpers.cli_env(),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]


def test_print_measured_errors():
  """Reports the max relative errors measured above (visible with ``pytest -s``)."""
  for name, err in sorted(MEASURED.items()):
    print(f"max relative error {name}: {err:.3g}")
  assert all(math.isfinite(e) for e in MEASURED.values())
