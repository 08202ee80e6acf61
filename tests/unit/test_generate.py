"""KV-cached generation (lcm_jax.generate, layers' KV cache) against full recomputation, the
stopping rules against a NumPy oracle, and the CLI end to end (`python -m lcm_jax.generate`).

Tolerances: float32 everywhere; cached vs uncached differ only in reduction order (masked cache
slots contribute exact zeros), so predictions agree to ~1e-6 relative; we assert 1e-5.
"""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm_jax import generate as gen_lib
from lcm_jax import layers
from lcm_jax.errors import UserError
from lcm_jax.models.config import ModelConfig
from tests import helpers
from tests.helpers import ROOT, main_cmd, run_cli

DIM = 16
RTOL, ATOL = 1e-5, 1e-5
PROMPT_LENGTHS = (3, 1, 5)


def _cfg(**kw) -> ModelConfig:
  base = dict(family="base_lcm", model_dim=32, num_layers=2, num_heads=4, ffn_inner_dim=96,
              ffn_multiple_of=16, sonar_embed_dim=DIM, dropout=0.0, dtype="float32")
  base.update(kw)
  return ModelConfig(**base)




def _prompts(seed=0, lengths=PROMPT_LENGTHS):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(n, DIM)).astype(np.float32) for n in lengths]


def _padded_rows(prompts, outputs, k, length):
  """Rows ``prompt_b + outputs[b, :k]`` right-padded to ``length``; with segment ids/positions."""
  rows = [np.concatenate([p, outputs[b, :k]], axis=0) for b, p in enumerate(prompts)]
  emb, lens = gen_lib.pad_prompts(rows, DIM, length)
  seg = (np.arange(length)[None] < lens[:, None]).astype(np.int32)
  pos = np.broadcast_to(np.arange(length, dtype=np.int32), seg.shape)
  return emb, seg, pos, lens


# ---------------------------------------------------------------------------------------------
# The KV cache of the shared stack

@pytest.mark.parametrize("scan", [True, False])
def test_stack_cache_chunked_prefill_equals_full_forward(scan):
  """Per-row chunks at different offsets (right-padded, padding overwritten later) give the same
  outputs as one uncached causal forward."""
  cfg = _cfg(scan_layers=scan)
  m = layers.TransformerStack(cfg)
  b, length = 3, 7
  x = jax.random.normal(jax.random.PRNGKey(0), (b, length, cfg.model_dim))
  seg = jnp.ones((b, length), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  v = m.init(jax.random.PRNGKey(1), x, seg, pos)
  full = np.asarray(m.apply(v, x, seg, pos))
  cached = jax.jit(lambda *a: m.apply(v, *a[:3], cache=a[3], cache_index=a[4]))

  first = np.array([1, 3, 2])  # valid tokens of each row's first chunk (padded to 3)
  cache = layers.init_cache(cfg, b, 12)
  chunk1 = np.zeros((b, 3, cfg.model_dim), np.float32)
  pos1 = np.zeros((b, 3), np.int32)
  for r in range(b):
    chunk1[r, :first[r]] = x[r, :first[r]]
    pos1[r] = np.arange(3)
  out1, cache = cached(jnp.asarray(chunk1), None, jnp.asarray(pos1), cache,
                       jnp.zeros((b,), jnp.int32))
  # Second chunk: the rest of each row, starting at its own offset (over its padded slots).
  rest = length - first.min()
  chunk2 = np.zeros((b, rest, cfg.model_dim), np.float32)
  pos2 = np.zeros((b, rest), np.int32)
  for r in range(b):
    n = length - first[r]
    chunk2[r, :n] = x[r, first[r]:]
    pos2[r] = first[r] + np.arange(rest)
  out2, cache = cached(jnp.asarray(chunk2), None, jnp.asarray(pos2), cache,
                       jnp.asarray(first, jnp.int32))
  assert cache["k"].shape == (cfg.num_layers, b, 12, cfg.num_heads, cfg.head_dim)
  for r in range(b):
    got = np.concatenate([np.asarray(out1)[r, :first[r]],
                          np.asarray(out2)[r, :length - first[r]]])
    np.testing.assert_allclose(got, full[r], rtol=RTOL, atol=ATOL)
  # One token at a time matches too (the decode path).
  cache = layers.init_cache(cfg, b, length)
  steps = []
  for i in range(length):
    o, cache = cached(x[:, i:i + 1], None, pos[:, i:i + 1], cache, jnp.full((b,), i, jnp.int32))
    steps.append(np.asarray(o))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=RTOL, atol=ATOL)


def test_update_cache_drops_out_of_range_writes():
  cache = jnp.zeros((2, 4, 1, 1))
  new = jnp.ones((2, 2, 1, 1))
  out = np.asarray(layers.update_cache(cache, new, jnp.array([1, 3])))[..., 0, 0]
  np.testing.assert_array_equal(out, [[0, 1, 1, 0], [0, 0, 0, 1]])


# ---------------------------------------------------------------------------------------------
# Base-LCM

@pytest.fixture(scope="module")
def base_lcm():
  from lcm_jax.models.base_lcm import BaseLCM  # pylint: disable=g-import-not-at-top
  cfg = _cfg()
  model = BaseLCM(cfg)
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, DIM)), jnp.ones((1, 4), jnp.int32),
                 jnp.arange(4)[None])
  return model, helpers.perturbed_variables(v, 1)


def _base_full_predictions(model, variables, prompts, outputs, steps, rng, temperature):
  """For each step k: the uncached model on prompt + outputs[:, :k] -> concept k (raw space)."""
  length = max(PROMPT_LENGTHS) + steps
  apply = jax.jit(lambda e, s, p: model.apply(variables, e, s, p)[0])
  preds = []
  for k in range(steps):
    emb, seg, pos, lens = _padded_rows(prompts, outputs, k, length)
    p = np.asarray(apply(emb, seg, pos))[np.arange(len(prompts)), lens - 1]
    if temperature:
      p = p + temperature * np.asarray(gen_lib.latent_noise(gen_lib.step_rng(rng, k), p.shape))
    preds.append(np.asarray(gen_lib.denormalize(variables, jnp.asarray(p))))
  return np.stack(preds, axis=1)


@pytest.mark.parametrize("temperature,loop", [(0.0, "while"), (0.3, "python")])
def test_base_lcm_cached_generation_equals_full_recomputation(base_lcm, temperature, loop):
  model, variables = base_lcm
  steps = 6
  prompts = _prompts()
  rng = jax.random.PRNGKey(7)
  res = gen_lib.generate(model, variables, prompts,
                         gen_lib.GenerationConfig(max_len=steps,
                                                  sample_latent_variable=temperature > 0,
                                                  temperature=temperature),
                         loop=loop, rng=rng)
  assert res.embeddings.shape == (3, steps, DIM)
  np.testing.assert_array_equal(res.lengths, steps)
  assert list(res.reason_names()) == ["max_len"] * 3
  expected = _base_full_predictions(model, variables, prompts, res.embeddings, steps, rng,
                                    temperature)
  np.testing.assert_allclose(res.embeddings, expected, rtol=RTOL, atol=ATOL)
  assert np.abs(np.diff(res.embeddings, axis=1)).max() > 1e-3  # not a trivial fixed point


def test_while_and_python_loops_agree(base_lcm):
  model, variables = base_lcm
  prompts = _prompts(3)
  cfg = gen_lib.GenerationConfig(max_len=5, min_gen_len=1, repetition_threshold=0.5)
  a = gen_lib.generate(model, variables, prompts, cfg, loop="while")
  b = gen_lib.generate(model, variables, prompts, cfg, loop="python")
  np.testing.assert_array_equal(a.embeddings, b.embeddings)
  np.testing.assert_array_equal(a.lengths, b.lengths)
  np.testing.assert_array_equal(a.stop_reasons, b.stop_reasons)


# ---------------------------------------------------------------------------------------------
# Stopping rules

def _cos(a, b):
  return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-8))


def _oracle(free, prompts, eot, cfg):
  """Expected (lengths, reasons) from an unstopped run ``free`` (B, >= max_len, S).

  The reference's rule (``LCMGenerator.finalize_step``): the concept written at position
  ``step_nr`` may stop a row only if ``step_nr - prompt_len >= min_gen_len``; generated concept k
  (0-based) is written at ``prompt_len + k``."""
  lengths, reasons = [], []
  for b, p in enumerate(prompts):
    prev = p[-1]
    for k in range(cfg.max_len):
      c = free[b, k]
      ok = k >= cfg.min_gen_len
      if ok and eot is not None and _cos(c, eot) >= cfg.eot_threshold:
        reason = "eot"
      elif ok and cfg.repetition_threshold is not None and _cos(c, prev) >= \
          cfg.repetition_threshold:
        reason = "repetition"
      elif k + 1 == cfg.max_len:
        reason = "max_len"
      else:
        prev = c
        continue
      lengths.append(k + 1)
      reasons.append(reason)
      break
  return np.array(lengths), reasons


def test_stopping_rules_and_frozen_rows(base_lcm):
  model, variables = base_lcm
  prompts = _prompts(5)
  free = gen_lib.generate(model, variables, prompts, gen_lib.GenerationConfig(max_len=8)).embeddings
  eot = free[0, 2].copy()  # row 0's third concept is "End of text."
  assert _cos(free[0, 0], eot) < 0.9999 and _cos(free[0, 1], eot) < 0.9999
  rep = _cos(free[1, 1], free[1, 2]) - 1e-6  # row 1 repeats at its third concept at the latest
  cases = [
      gen_lib.GenerationConfig(max_len=8, eot_threshold=0.9999),
      gen_lib.GenerationConfig(max_len=8, min_gen_len=3, eot_threshold=0.9999),
      gen_lib.GenerationConfig(max_len=2, eot_threshold=0.9999),
      gen_lib.GenerationConfig(max_len=8, eot_threshold=0.9999, repetition_threshold=rep),
  ]
  generator_cache = {}
  for cfg in cases:
    generator = generator_cache.setdefault(cfg, gen_lib.Generator(model, cfg, eot_vector=eot))
    res = generator(variables, prompts)
    lengths, reasons = _oracle(free, prompts, eot, cfg)
    np.testing.assert_array_equal(res.lengths, lengths, err_msg=str(cfg))
    assert list(res.reason_names()) == reasons, cfg
    for b in range(len(prompts)):  # outputs = the unstopped run's prefix, frozen after the stop
      np.testing.assert_allclose(res.embeddings[b, :lengths[b]], free[b, :lengths[b]],
                                 rtol=1e-6, atol=1e-6)
      assert not res.embeddings[b, lengths[b]:].any()
  # The EOT case really stopped row 0 at its third concept and kept that concept.
  res = gen_lib.generate(model, variables, prompts, cases[0], eot_vector=eot)
  assert res.lengths[0] == 3 and res.reason_names()[0] == "eot"
  np.testing.assert_allclose(res.embeddings[0, 2], eot, rtol=1e-6, atol=1e-6)
  assert res.lengths.max() > 3  # others continued after row 0 froze
  # min_gen_len=3: row 0 may not stop at 3.
  res = gen_lib.generate(model, variables, prompts, cases[1], eot_vector=eot)
  assert res.lengths.min() >= 4


def test_first_generated_concept_never_stops(base_lcm):
  """The reference's min_gen_len: a first prediction that IS the end-of-text vector (or repeats
  the prompt) does not stop the row; min_gen_len generated concepts must come before a stop.
  (The old rule, min_len=1, stopped row 0 after one concept here.)"""
  model, variables = base_lcm
  prompts = _prompts(5)
  free = gen_lib.generate(model, variables, prompts, gen_lib.GenerationConfig(max_len=6)).embeddings
  eot = free[0, 0].copy()  # row 0's first prediction is exactly "End of text."
  default = gen_lib.GenerationConfig(max_len=6, eot_threshold=0.9999)
  assert default.min_gen_len == 1
  for loop in gen_lib.LOOPS:
    res = gen_lib.generate(model, variables, prompts, default, eot_vector=eot, loop=loop)
    lengths, reasons = _oracle(free, prompts, eot, default)
    assert res.lengths[0] > 1 and lengths[0] > 1
    np.testing.assert_array_equal(res.lengths, lengths)
    assert list(res.reason_names()) == reasons
  # A concept equal to EOT at the second position stops there (min_gen_len = 1 before it).
  res = gen_lib.generate(model, variables, prompts, default, eot_vector=free[0, 1].copy())
  assert res.lengths[0] == 2 and res.reason_names()[0] == "eot"
  # Every concept "repeats" (threshold -1): each row stops right after min_gen_len concepts.
  for n in (1, 2, 4):
    cfg = gen_lib.GenerationConfig(max_len=6, min_gen_len=n, repetition_threshold=-1.0)
    res = gen_lib.generate(model, variables, prompts, cfg)
    np.testing.assert_array_equal(res.lengths, n + 1)
    assert set(res.reason_names()) == {"repetition"}
  # min_gen_len >= max_len: only max_len stops (the reference accepts it too).
  cfg = gen_lib.GenerationConfig(max_len=3, min_gen_len=3, repetition_threshold=-1.0)
  res = gen_lib.generate(model, variables, prompts, cfg)
  np.testing.assert_array_equal(res.lengths, 3)
  assert set(res.reason_names()) == {"max_len"}


def test_latent_sampling_statistics_and_default_off(base_lcm):
  """sample_latent_variable adds temperature * N(0, I) in normalized space: over many rows and
  draws, (sampled - deterministic) / scale has mean ~0 and std ~temperature, independent
  across draws; off (the default), or temperature 0, is deterministic whatever the key."""
  model, variables = base_lcm
  _, scale = gen_lib.normalizer_buffers(variables["buffers"])
  scale = np.asarray(scale, np.float64)
  prompts = _prompts(2) * 64  # 192 rows
  det = gen_lib.Generator(model, gen_lib.GenerationConfig(max_len=1))
  base = det(variables, prompts, rng=jax.random.PRNGKey(0)).embeddings[:, 0]
  assert not gen_lib.GenerationConfig().sample_latent_variable  # our default: off
  for cfg in (gen_lib.GenerationConfig(max_len=1, temperature=2.0),
              gen_lib.GenerationConfig(max_len=1, sample_latent_variable=True, temperature=0.0)):
    for key in (1, 2):
      np.testing.assert_array_equal(
          gen_lib.generate(model, variables, prompts, cfg, rng=jax.random.PRNGKey(key)).embeddings[
              :, 0], base)
  temperature = 0.7
  gen = gen_lib.Generator(model, gen_lib.GenerationConfig(
      max_len=1, sample_latent_variable=True, temperature=temperature))
  draws = np.stack([gen(variables, prompts, rng=jax.random.PRNGKey(key)).embeddings[:, 0]
                    for key in range(4)])
  z = (draws.astype(np.float64) - base) / scale / temperature  # 4 x 192 x 16 standard normals
  n = z.size
  assert abs(z.mean()) < 4 / math.sqrt(n), z.mean()
  assert abs(z.std() - 1.0) < 4 / math.sqrt(2 * n), z.std()
  assert abs(np.corrcoef(z[0].ravel(), z[1].ravel())[0, 1]) < 4 / math.sqrt(z[0].size)


def test_latent_sampling_flag_rule():
  """The CLI rule: --[no]sample_latent_variable when given; else on exactly for --temperature>0."""
  f = gen_lib.latent_sampling_from_flags
  assert f(None, 1.0, False) is False   # nothing given: our default, off
  assert f(None, 0.3, True) is True     # --temperature=0.3 alone samples (as in the reference)
  assert f(None, 0.0, True) is False
  assert f(True, 1.0, False) is True and f(False, 0.3, True) is False


def test_generation_config_validation():
  for kw, field in [({"max_len": 0}, "max_len"), ({"min_gen_len": 0}, "min_gen_len"),
                    ({"eot_threshold": 1.5}, "eot_threshold"),
                    ({"repetition_threshold": -2.0}, "repetition_threshold"),
                    ({"temperature": -1.0}, "temperature")]:
    with pytest.raises(UserError, match=field):
      gen_lib.GenerationConfig(**kw).validate()
  with pytest.raises(ValueError, match="empty prompt"):
    gen_lib.pad_prompts([np.zeros((2, DIM)), np.zeros((0, DIM))], DIM)
  with pytest.raises(ValueError, match=r"expected \(n, 16\)"):
    gen_lib.pad_prompts([np.zeros((2, DIM + 1))], DIM)


# ---------------------------------------------------------------------------------------------
# Two-Tower

def _two_tower_ready():
  return os.path.exists(os.path.join(ROOT, "lcm_jax", "models", "two_tower.py"))


@pytest.fixture(scope="module")
def two_tower():
  if not _two_tower_ready():
    pytest.skip("lcm_jax/models/two_tower.py not present")
  from lcm_jax.models.two_tower import TwoTowerLCM  # pylint: disable=g-import-not-at-top
  cfg = _cfg(family="two_tower_diffusion_lcm", denoiser_num_layers=2, timestep_embed_dim=16)
  model = TwoTowerLCM(cfg)
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, DIM)), jnp.ones((1, 4), jnp.int32),
                 jnp.arange(4)[None])
  return model, helpers.perturbed_variables(v, 2)


@pytest.mark.parametrize("guidance_scale", [3.0, 1.0])
def test_two_tower_cached_generation_equals_full_recomputation(two_tower, guidance_scale):
  """Same rng -> same DDIM noise: the cached contextualizer + cross-K/V buffer give the samples
  that full recomputation (no cache, all context recomputed) gives at every step."""
  from lcm_jax import diffusion  # pylint: disable=g-import-not-at-top
  from lcm_jax.models import two_tower as two_tower_mod  # pylint: disable=g-import-not-at-top
  from lcm_jax.models.two_tower import TwoTowerLCM  # pylint: disable=g-import-not-at-top
  model, variables = two_tower
  sampler = diffusion.SamplerConfig(num_steps=4, guidance_scale=guidance_scale)
  steps = 4
  prompts = _prompts(11)
  rng = jax.random.PRNGKey(3)
  res = gen_lib.generate(model, variables, prompts, gen_lib.GenerationConfig(max_len=steps),
                         sampler=sampler, rng=rng)
  assert res.embeddings.shape == (3, steps, DIM)
  length = max(PROMPT_LENGTHS) + steps
  alpha_bar = diffusion.alpha_bar_from_config(model.config)

  @jax.jit
  def full(emb, seg, pos, query_pos, key):
    """No cache: the whole contextualizer, the model's own cross-attention mask for one query
    per row at document position ``query_pos``, guidance as one 2B batch."""
    b = emb.shape[0]
    context, _ = model.apply(variables, emb, seg, pos, method=TwoTowerLCM.contextualize)
    k, v = model.apply(variables, context, method=TwoTowerLCM.cross_kv)
    q = dict(q_segment_ids=jnp.ones((b, 1), jnp.int32), q_index=query_pos[:, None])
    cond = two_tower_mod.cross_attention_mask(seg, **q)
    uncond = two_tower_mod.cross_attention_mask(seg, drop_cond=jnp.ones((b, 1), bool), **q)

    def denoise(x, t, with_uncond):
      if not with_uncond:
        return model.apply(variables, x, jnp.full((b, 1), t), k, v, cond,
                           method=TwoTowerLCM.denoise)
      out = model.apply(variables, jnp.concatenate([x, x]), jnp.full((2 * b, 1), t),
                        jnp.concatenate([k, k], axis=1), jnp.concatenate([v, v], axis=1),
                        jnp.concatenate([cond, uncond]), method=TwoTowerLCM.denoise)
      return out[:b], out[b:]

    x0 = diffusion.sample(denoise, key, (b, 1, DIM), alpha_bar, sampler)
    return model.apply(variables, x0[:, 0], method=TwoTowerLCM.denormalize)

  for k in range(steps):
    emb, seg, pos, lens = _padded_rows(prompts, res.embeddings, k, length)
    expected = np.asarray(full(emb, seg, pos, jnp.asarray(lens), gen_lib.step_rng(rng, k)))
    np.testing.assert_allclose(res.embeddings[:, k], expected, rtol=RTOL, atol=ATOL,
                               err_msg=f"step {k}")
  # The context matters (else the check above would be vacuous): another prompt, another sample.
  other = gen_lib.generate(model, variables, _prompts(12), gen_lib.GenerationConfig(max_len=1),
                           sampler=sampler, rng=rng)
  assert np.abs(other.embeddings[:, 0] - res.embeddings[:, 0]).max() > 1e-3


def test_two_tower_bad_sampler_settings(two_tower):
  from lcm_jax import diffusion  # pylint: disable=g-import-not-at-top
  model, _ = two_tower
  with pytest.raises(ValueError, match="guidance_rescale"):
    gen_lib.Generator(model, sampler=diffusion.SamplerConfig(guidance_rescale=2.0))
  with pytest.raises(ValueError, match="num_steps"):
    gen_lib.Generator(model, sampler=diffusion.SamplerConfig(num_steps=0))


# ---------------------------------------------------------------------------------------------
# CLI end to end

CLI_DIM = 32


def _train(data, wd, config):
  r = run_cli(main_cmd(wd, data, "--config.train.num_steps=2", "--config.train.checkpoint_every=2",
                       "--config.train.eval_every=0", "--config.train.log_every=1",
                       "--config.data.seq_len=16", "--config.data.max_doc_len=16",
                       "--config.data.global_batch_size=8", config=config))
  assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A synthetic corpus and a tiny Base-LCM trained on it for 2 steps (one checkpoint)."""
  base = tmp_path_factory.mktemp("gen_cli")
  data = str(base / "synthetic")
  r = run_cli([sys.executable, "-m", "data_prep.synthetic", f"--out={data}", "--num_docs=64",
               f"--dim={CLI_DIM}", "--seed=1", "--num_shards=1"])
  assert r.returncode == 0, r.stderr[-3000:]
  wd = str(base / "wd")
  _train(data, wd, "configs/mse_1b6.py:tiny")
  return data, wd


def _gen_cmd(wd, prompts, out, *extra):
  return [sys.executable, "-m", "lcm_jax.generate", f"--workdir={wd}", f"--prompts={prompts}",
          f"--out={out}", *extra]


def test_cli_generates(trained, tmp_path):
  data, wd = trained
  rng = np.random.default_rng(0)
  prompts = {"a": rng.normal(size=(2, CLI_DIM)), "bb": rng.normal(size=(5, CLI_DIM)),
             "c": rng.normal(size=(1, CLI_DIM))}
  path = str(tmp_path / "prompts.npz")
  np.savez(path, **{f"prompt_{k}": v.astype(np.float32) for k, v in prompts.items()})
  out = str(tmp_path / "out" / "gen.npz")
  r = run_cli(_gen_cmd(wd, path, out, "--max_len=4", "--batch_size=2",
                       f"--eot_vector={os.path.join(data, 'process.npz')}"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "generated 3 prompts from step 2" in r.stdout
  with np.load(out) as f:
    assert list(f["ids"]) == ["a", "bb", "c"]
    assert f["embeddings"].shape == (3, 4, CLI_DIM) and f["embeddings"].dtype == np.float32
    assert list(f["prompt_lengths"]) == [2, 5, 1]
    lengths, reasons = f["lengths"], list(f["stop_reasons"])
    assert all(1 <= n <= 4 for n in lengths) and set(reasons) <= {"eot", "repetition", "max_len"}
    for n, reason, emb in zip(lengths, reasons, f["embeddings"]):
      assert (reason == "max_len") == (n == 4 and reason != "eot")
      assert np.isfinite(emb).all() and np.abs(emb[:n]).sum(-1).min() > 0 and not emb[n:].any()
    assert int(f["step"]) == 2
  assert os.listdir(os.path.dirname(out)) == ["gen.npz"]  # no temporary files left

  # The padded-array layout of the output is accepted as prompts too (and the same config
  # given explicitly instead of the checkpoint's meta gives the same numbers).
  with np.load(out) as f:
    again = str(tmp_path / "again.npz")
    np.savez(again, embeddings=np.stack([np.pad(v, ((0, 5 - len(v)), (0, 0)))
                                         for v in prompts.values()]).astype(np.float32),
             lengths=np.array([2, 5, 1]), ids=np.array(["a", "bb", "c"]))
    first = {k: f[k] for k in ("embeddings", "lengths")}
  out2 = str(tmp_path / "gen2.npz")
  r = run_cli(_gen_cmd(wd, again, out2, "--max_len=4", "--batch_size=8", "--loop=python",
                       f"--eot_vector={os.path.join(data, 'process.npz')}",
                       f"--config={os.path.join(ROOT, 'configs/mse_1b6.py')}:tiny"))
  assert r.returncode == 0, r.stderr[-3000:]
  with np.load(out2) as f:
    np.testing.assert_array_equal(f["lengths"], first["lengths"])
    np.testing.assert_allclose(f["embeddings"], first["embeddings"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,expected", [
    ("wrong_dim", ["prompts.npz", "'prompt_bad'", "(n, 32)"]),
    ("empty", ["prompts.npz", "'prompt_empty'", "empty prompt"]),
    ("no_checkpoint", ["--workdir", "has no checkpoints"]),
    ("guidance_rescale", ["guidance_rescale", "[0, 1]"]),
    ("min_gen_len", ["bad generation flag", "min_gen_len", ">= 1"]),
    ("thresholding", ["bad sampler flag", "sample_max_value", ">= 1"]),
    ("out_is_dir", ["--out", "is a directory"]),
])
def test_cli_bad_input_fails_cleanly(trained, tmp_path, kind, expected):
  _, wd = trained
  rng = np.random.default_rng(0)
  prompts = {"prompt_ok": rng.normal(size=(3, CLI_DIM)).astype(np.float32)}
  extra = []
  if kind == "wrong_dim":
    prompts["prompt_bad"] = np.zeros((2, CLI_DIM - 4), np.float32)
  elif kind == "empty":
    prompts["prompt_empty"] = np.zeros((0, CLI_DIM), np.float32)
  elif kind == "no_checkpoint":
    wd = str(tmp_path / "empty_wd")
    os.makedirs(wd)
  elif kind == "min_gen_len":
    extra = ["--min_gen_len=0"]
  elif kind == "thresholding":
    extra = ["--thresholding", "--sample_max_value=0.5"]
  elif kind == "guidance_rescale":
    extra = ["--guidance_rescale=2"]
  path = str(tmp_path / "prompts.npz")
  np.savez(path, **prompts)
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  out = str(out_dir) if kind == "out_is_dir" else str(out_dir / "gen.npz")
  r = run_cli(_gen_cmd(wd, path, out, *extra))
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  err = r.stderr.strip().splitlines()[-1]
  assert err.startswith("error: "), err
  for e in expected:
    assert e in err, f"{e!r} not in {err!r}"
  assert os.listdir(out_dir) == []


def test_cli_two_tower(trained, tmp_path):
  """The Two-Tower path through the CLI: restore (its own variable layout), guided DDIM, outputs."""
  if not _two_tower_ready():
    pytest.skip("lcm_jax/models/two_tower.py not present")
  data, _ = trained
  wd = str(tmp_path / "tt_wd")
  _train(data, wd, "configs/two_tower_1b6.py:tiny")
  rng = np.random.default_rng(1)
  path = str(tmp_path / "prompts.npz")
  np.savez(path, prompt_0=rng.normal(size=(3, CLI_DIM)).astype(np.float32),
           prompt_1=rng.normal(size=(1, CLI_DIM)).astype(np.float32))
  out = str(tmp_path / "gen.npz")
  r = run_cli(_gen_cmd(wd, path, out, "--max_len=3", "--num_steps=4", "--seed=5"))
  assert r.returncode == 0, r.stderr[-3000:]
  with np.load(out) as f:
    assert list(f["ids"]) == ["0", "1"] and f["embeddings"].shape == (2, 3, CLI_DIM)
    assert list(f["lengths"]) == [3, 3] and list(f["stop_reasons"]) == ["max_len"] * 2
    assert np.isfinite(f["embeddings"]).all() and np.abs(f["embeddings"]).min(-1).max() > 0
