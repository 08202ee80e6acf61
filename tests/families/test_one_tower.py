"""One-Tower diffusion LCM (lcm_jax/models/one_tower.py) against independent oracles.

* the attention mask against a Python loop written from the spec;
* the forward against a float64 NumPy implementation that reads the reference-style state dict
  (``naming.flax_to_reference``) and builds the interleaved sequence and its mask by loops;
* invariances: a prediction ignores later concepts, other noisy copies and other documents;
* the loss against a direct computation from the draws; training reduces it;
* KV-cached generation (OneTowerDecoder) and teacher_forced against the DDIM sampler run over
  the full interleaved forward of the whole prefix, with the same rng;
* the 1.6B recipe's parameter count against a hand formula.

Tolerances: float32 JAX vs float64 NumPy rtol 1e-4; same-precision reformulations ~1e-5 (the
sampler's guidance amplifies float32 rounding a little: atol 1e-4 in raw space there).
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import one_tower_1b6
from lcm_jax import diffusion
from lcm_jax import errors
from lcm_interop import naming
from lcm_jax.models.config import ModelConfig
from lcm_jax.models.one_tower import (OneTowerDecoder, OneTowerLCM, context_mask,
                                      diffusion_loss, diffusion_loss_from_draws,
                                      matmul_param_count, one_tower_mask, param_count_formula,
                                      teacher_forced, train_flops_per_concept)
from tests import helpers

FAMILY = "one_tower_diffusion_lcm"
T_SMALL = 20


def _model_config(**fields) -> ModelConfig:
  return ModelConfig(**fields)


def _recipe_config(variant=""):
  c = one_tower_1b6.get_config(variant)
  return _model_config(**c.model.to_dict())


def _cfg(**kw) -> ModelConfig:
  base = dict(family=FAMILY, model_dim=32, num_layers=2, num_heads=4, ffn_inner_dim=96,
              ffn_multiple_of=16, sonar_embed_dim=16, dropout=0.0, dtype="float32",
              timestep_embed_dim=16, num_diffusion_train_steps=T_SMALL, max_seq_len=32)
  base.update(kw)
  return _model_config(**base)


def _packed():
  """Two rows of 12: [doc 5 | doc 4 | pad 3] and [doc 7 | doc 5]."""
  seg = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 7 + [2] * 5], np.int32)
  pos = np.array([list(range(5)) + list(range(4)) + [0] * 3, list(range(7)) + list(range(5))],
                 np.int32)
  return seg, pos


def _variables(cfg: ModelConfig, seed: int = 0):
  model = OneTowerLCM(cfg)
  emb = jnp.zeros((1, 4, cfg.sonar_embed_dim))
  variables = jax.jit(model.init)(jax.random.key(seed), emb, jnp.ones((1, 4), jnp.int32),
                                  jnp.arange(4)[None])
  return model, helpers.perturbed_variables(variables, seed + 1)


def _inputs(cfg: ModelConfig, seed: int = 3):
  rng = np.random.default_rng(seed)
  seg, pos = _packed()
  shape = seg.shape + (cfg.sonar_embed_dim,)
  emb = rng.normal(size=shape).astype(np.float32)
  noisy = rng.normal(size=shape).astype(np.float32)
  t = rng.integers(0, cfg.num_diffusion_train_steps, size=seg.shape).astype(np.int32)
  drop = rng.random(seg.shape) < 0.3
  return emb, seg, pos, noisy, t, drop


def _forward(model, variables, emb, seg, pos, noisy, t, drop=None):
  fn = jax.jit(lambda v, *a: model.apply(v, *a[:3], noisy=a[3], timesteps=a[4], drop_cond=a[5]))
  return fn(variables, emb, seg, pos, noisy, t, drop)


# ---------------------------------------------------------------------------------------------
# Oracles

def np_mask(seg_row, pos_row, drop_row=None):
  """(2L, 2L) by loops: index 2i clean concept i, 2i + 1 its noisy copy."""
  n = len(seg_row)
  mask = np.zeros((2 * n, 2 * n), bool)
  for qi in range(2 * n):
    i, q_noisy = divmod(qi, 2)
    for kj in range(2 * n):
      j, k_noisy = divmod(kj, 2)
      same = seg_row[i] > 0 and seg_row[j] == seg_row[i]
      if qi == kj:
        mask[qi, kj] = True
      elif not q_noisy and not k_noisy:
        mask[qi, kj] = same and pos_row[j] <= pos_row[i]
      elif q_noisy and not k_noisy:
        dropped = drop_row is not None and drop_row[i]
        mask[qi, kj] = same and pos_row[j] < pos_row[i] and not dropped
      # clean -> noisy: never; noisy -> other noisy: never
  return mask


def np_linear(x, sd, prefix):
  return x @ sd[prefix + "weight"].T + sd[prefix + "bias"]


def np_rms(x, w, eps=1e-5):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_silu(x):
  return x / (1.0 + np.exp(-x))


def np_attention(x, sd, p, num_heads, mask):
  n = x.shape[0]
  q = np_linear(x, sd, p + "q_proj.").reshape(n, num_heads, -1)
  k = np_linear(x, sd, p + "k_proj.").reshape(n, num_heads, -1)
  v = np_linear(x, sd, p + "v_proj.").reshape(n, num_heads, -1)
  out = np.zeros_like(q)
  for h in range(num_heads):
    scores = q[:, h] @ k[:, h].T / np.sqrt(q.shape[-1])
    for i in range(n):
      s = scores[i, mask[i]]
      w = np.exp(s - s.max())
      out[i, h] = (w / w.sum()) @ v[mask[i], h]
  return np_linear(out.reshape(n, -1), sd, p + "output_proj.")


def np_time_embedding(t, sd, dim):
  half = dim // 2
  feats = np.zeros(t.shape + (dim,))
  for i in range(half):
    f = np.exp(-np.log(10000.0) * i / half)
    feats[..., i] = np.cos(t * f)
    feats[..., half + i] = np.sin(t * f)
  h = np_silu(np_linear(feats, sd, "frontend.embed_time.fc1."))
  return np_linear(h, sd, "frontend.embed_time.fc2.")


def np_forward(sd, cfg, emb_row, seg_row, pos_row, noisy_row, t_row, drop_row):
  """x0_hat (L, S) of one packed row, float64."""
  x0 = (emb_row - sd["sonar_normalizer.center"]) / sd["sonar_normalizer.scale"]
  vecs, ts, ps = [], [], []
  for i in range(len(seg_row)):
    vecs += [x0[i], noisy_row[i]]
    ts += [0.0, float(t_row[i])]
    ps += [pos_row[i], pos_row[i]]
  vecs, ts = np.stack(vecs), np.array(ts)
  inp = np.concatenate([vecs, np_time_embedding(ts, sd, cfg.timestep_embed_dim)], axis=-1)
  h = np_linear(inp, sd, "frontend.pre_linear.") + sd["frontend.pos_encoder.weight"][ps]
  mask = np_mask(seg_row, pos_row, drop_row)
  for layer in range(cfg.num_layers):
    p = f"lcm.layers.{layer}."
    h = h + np_attention(np_rms(h, sd[p + "self_attn_layer_norm.weight"]), sd, p + "self_attn.",
                         cfg.num_heads, mask)
    g = np_rms(h, sd[p + "ffn_layer_norm.weight"])
    inner = np_silu(np_linear(g, sd, p + "ffn.gate_proj.")) * np_linear(g, sd, p + "ffn.inner_proj.")
    h = h + np_linear(inner, sd, p + "ffn.output_proj.")
  h = np_rms(h, sd["lcm.layer_norm.weight"])
  return np_linear(h[1::2], sd, "postnet.fc.")


def _ref64(variables):
  return {k: np.asarray(v, np.float64)
          for k, v in naming.flax_to_reference(variables["params"], variables["buffers"]).items()}


# ---------------------------------------------------------------------------------------------
# Mask

def test_mask_matches_loop_oracle():
  seg, pos = _packed()
  rng = np.random.default_rng(0)
  drop = rng.random(seg.shape) < 0.4
  drop[1, 8] = True   # a dropped position with context (doc 2, position 1)
  for d in (None, drop):
    got = np.asarray(one_tower_mask(jnp.asarray(seg), jnp.asarray(pos),
                                    None if d is None else jnp.asarray(d)))
    assert got.shape == (2, 1, 24, 24) and got.dtype == bool
    for b in range(2):
      np.testing.assert_array_equal(got[b, 0], np_mask(seg[b], pos[b], None if d is None else d[b]))
  # spot checks written by hand: noisy copy of concept 2 of doc 1 (row 0) sees clean 0, 1, itself
  m = np.asarray(one_tower_mask(jnp.asarray(seg), jnp.asarray(pos)))[0, 0]
  assert np.flatnonzero(m[2 * 2 + 1]).tolist() == [0, 2, 5]
  # clean concept 1 of doc 2 (row index 6) sees clean concepts 0, 1 of doc 2 (row 5, 6) only
  assert np.flatnonzero(m[2 * 6]).tolist() == [10, 12]
  # the teacher-forcing context mask is the noisy -> clean block without the self entries
  ctx = np.asarray(context_mask(jnp.asarray(seg), jnp.asarray(pos)))[:, 0]
  full = np.asarray(one_tower_mask(jnp.asarray(seg), jnp.asarray(pos)))[:, 0]
  np.testing.assert_array_equal(ctx, full[:, 1::2, 0::2])


# ---------------------------------------------------------------------------------------------
# Forward

@pytest.mark.parametrize("scan", [True, False])
def test_forward_matches_float64_numpy(scan):
  cfg = _cfg(scan_layers=scan)
  model, variables = _variables(cfg)
  emb, seg, pos, noisy, t, drop = _inputs(cfg)
  t[0, 2] = cfg.num_diffusion_train_steps - 1
  x0_hat, normalized = _forward(model, variables, emb, seg, pos, noisy, t, drop)
  sd = _ref64(variables)
  for b in range(2):
    want = np_forward(sd, cfg, emb[b].astype(np.float64), seg[b], pos[b],
                      noisy[b].astype(np.float64), t[b], drop[b])
    real = seg[b] > 0
    np.testing.assert_allclose(np.asarray(x0_hat[b])[real], want[real], rtol=1e-4, atol=1e-5)
  center, scale = sd["sonar_normalizer.center"], sd["sonar_normalizer.scale"]
  np.testing.assert_allclose(normalized, (emb - center) / scale, rtol=1e-5, atol=1e-6)
  # the model really uses its inputs: another timestep or dropped context changes the output
  t2 = t.copy()
  t2[1, 3] = (t2[1, 3] + 7) % cfg.num_diffusion_train_steps
  other, _ = _forward(model, variables, emb, seg, pos, noisy, t2, drop)
  assert np.abs(np.asarray(other[1, 3] - x0_hat[1, 3])).max() > 1e-3


def test_prediction_ignores_later_concepts_other_copies_and_other_documents():
  cfg = _cfg()
  model, variables = _variables(cfg)
  emb, seg, pos, noisy, t, drop = _inputs(cfg)
  drop[:] = False
  base, _ = _forward(model, variables, emb, seg, pos, noisy, t, drop)
  # Row 1, doc 1 spans indices 0..6. Change the clean concepts >= 3 and every noisy copy but 3.
  emb2, noisy2 = emb.copy(), noisy.copy()
  rng = np.random.default_rng(9)
  emb2[1, 3:7] += rng.normal(size=emb2[1, 3:7].shape).astype(np.float32)
  keep = noisy2[1, 3].copy()
  noisy2[1] += rng.normal(size=noisy2[1].shape).astype(np.float32)
  noisy2[1, 3] = keep
  moved, _ = _forward(model, variables, emb2, seg, pos, noisy2, t, drop)
  np.testing.assert_allclose(moved[1, 3], base[1, 3], rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(moved[1, 4] - base[1, 4])).max() > 1e-3   # concept 4 sees clean 3
  # Packing: each document alone (at the start of its own row) gives the same predictions.
  for b in range(2):
    for doc in (1, 2):
      idx = np.flatnonzero(seg[b] == doc)
      n = len(idx)
      alone, _ = _forward(model, variables, emb[b:b + 1, idx], np.ones((1, n), np.int32),
                          pos[b:b + 1, idx], noisy[b:b + 1, idx], t[b:b + 1, idx],
                          drop[b:b + 1, idx])
      np.testing.assert_allclose(alone[0], base[b, idx], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Loss and training

def _batch(seg, pos, emb):
  return {"embeddings": jnp.asarray(emb), "segment_ids": jnp.asarray(seg),
          "positions": jnp.asarray(pos),
          "target_mask": jnp.asarray(((seg > 0) & (pos > 0)).astype(np.float32))}


@pytest.mark.parametrize("weighting", ["none", "clamped_snr"])
def test_loss_equals_direct_computation_from_draws(weighting):
  cfg = _cfg(loss_weighting=weighting)
  model, variables = _variables(cfg)
  emb, seg, pos, _, t, drop = _inputs(cfg)
  t[0, 1] = cfg.num_diffusion_train_steps - 1   # alpha_bar = 0: pure noise
  eps = np.random.default_rng(5).normal(size=emb.shape).astype(np.float32)
  batch = _batch(seg, pos, emb)
  loss_sum, count, aux = jax.jit(
      lambda v, b, t, e, d: diffusion_loss_from_draws(model, v, b, t, e, d))(
          variables, batch, t, eps, drop)
  sd = _ref64(variables)
  x0 = (emb.astype(np.float64) - sd["sonar_normalizer.center"]) / sd["sonar_normalizer.scale"]
  ab = diffusion.alpha_bar_from_config(cfg)[t][..., None]
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
  x0_hat, _ = _forward(model, variables, emb, seg, pos, x_t.astype(np.float32), t, drop)
  err = ((np.asarray(x0_hat, np.float64) - x0) ** 2).sum(-1)
  w = diffusion.loss_weights_from_config(cfg)[t]
  scored = (seg > 0) & (pos > 0)
  assert np.isfinite(float(loss_sum))
  np.testing.assert_allclose(float(loss_sum), (w * err)[scored].sum(), rtol=2e-5)
  np.testing.assert_allclose(float(aux["unweighted_loss"]), err[scored].sum(), rtol=2e-5)
  assert float(count) == scored.sum() == 2 * 12 - 3 - 4


def test_loss_randomness_and_eval_determinism():
  cfg = _cfg(cfg_dropout=0.5)
  model, variables = _variables(cfg)
  emb, seg, pos, _, _, _ = _inputs(cfg)
  batch = _batch(seg, pos, emb)
  run = jax.jit(lambda v, b, r: diffusion_loss(model, v, b, rng=r, deterministic=True))
  ev = jax.jit(lambda v, b: diffusion_loss(model, v, b, rng=None, deterministic=True))
  a, b = run(variables, batch, jax.random.key(1)), run(variables, batch, jax.random.key(1))
  c = run(variables, batch, jax.random.key(2))
  assert float(a[0]) == float(b[0])
  assert float(a[0]) != float(c[0])
  e1, e2 = ev(variables, batch), ev(variables, batch)
  assert float(e1[0]) == float(e2[0]) and np.isfinite(float(e1[0]))
  assert float(a[1]) == float(e1[1]) == 17.0


def test_training_reduces_the_loss():
  c = helpers.small_train_config(one_tower_1b6, mesh=(1, 1, 1), dropout=0.0, batch=8)
  c.model.ffn_inner_dim = 96
  c.model.ffn_multiple_of = 16
  c.model.dtype = "float32"
  cfg = _model_config(**c.model.to_dict())
  model = OneTowerLCM(cfg)
  batch = {k: jnp.asarray(v) for k, v in helpers.packed_batch(c, random_walk=True).items()}
  variables = model.init(jax.random.key(0), batch["embeddings"][:1], batch["segment_ids"][:1],
                         batch["positions"][:1])
  norm = helpers.random_normalizer(cfg.sonar_embed_dim)
  buffers = {"sonar_normalizer": {"center": jnp.asarray(norm.center),
                                  "scale": jnp.asarray(norm.scale)}}
  params = nn.meta.unbox(variables["params"])
  tx = optax.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.0)
  opt = tx.init(params)

  def mean_loss(p, rng):
    s, n, _ = diffusion_loss(model, {"params": p, "buffers": buffers}, batch, rng=rng,
                             deterministic=False)
    return s / n

  @jax.jit
  def step(p, o, rng):
    loss, g = jax.value_and_grad(mean_loss)(p, rng)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  evaluate = jax.jit(lambda p: mean_loss(p, None))
  before = float(evaluate(params))
  losses = []
  for i in range(100):
    params, opt, loss = step(params, opt, jax.random.key(i))
    losses.append(float(loss))
  after = float(evaluate(params))
  print(f"eval loss per target {before:.4f} -> {after:.4f}; train {np.mean(losses[:5]):.4f} -> "
        f"{np.mean(losses[-5:]):.4f}")
  assert np.isfinite(losses).all()
  assert after < 0.6 * before
  assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


# ---------------------------------------------------------------------------------------------
# Sampling: KV-cached generation and teacher forcing vs the full forward

SAMPLER = diffusion.SamplerConfig(num_steps=5, guidance_scale=3.0, guidance_rescale=0.7)


def _full_forward_sample(model, variables, docs, rng, sampler=SAMPLER):
  """Concept n_b of each row, sampled with the full interleaved forward (``__call__``) on
  ``docs[b]`` (n_b, S) raw + one noisy slot at position n_b. Returns (B, S) raw."""
  cfg = model.config
  b, s = len(docs), cfg.sonar_embed_dim
  n = np.array([len(d) for d in docs])
  length = int(n.max()) + 1
  emb = np.zeros((b, length, s), np.float32)
  seg = np.zeros((b, length), np.int32)
  for i, d in enumerate(docs):
    emb[i, :n[i]] = d
    seg[i, :n[i] + 1] = 1
  pos = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length))
  rows, n = jnp.arange(b), jnp.asarray(n)

  def run(x_t, t, drop):
    noisy = jnp.zeros((b, length, s), jnp.float32).at[rows, n].set(x_t[:, 0])
    ts = jnp.full((b, length), t, jnp.int32)
    out, _ = model.apply(variables, emb, seg, pos, noisy=noisy, timesteps=ts,
                         drop_cond=jnp.full((b, length), drop))
    return out[rows, n][:, None]

  def denoise_fn(x_t, t, with_uncond):
    cond = run(x_t, t, False)
    return (cond, run(x_t, t, True)) if with_uncond else cond

  alpha_bar = diffusion.alpha_bar_from_config(cfg)
  x0 = jax.jit(lambda r: diffusion.sample(denoise_fn, r, (b, 1, s), alpha_bar, sampler))(rng)
  return np.asarray(model.apply(variables, x0[:, 0], method=OneTowerLCM.denormalize))


def test_cached_generation_equals_full_recomputation():
  cfg = _cfg()
  model, variables = _variables(cfg, seed=4)
  rng = np.random.default_rng(11)
  lengths = np.array([3, 1, 5], np.int32)
  max_len, plen = 4, int(lengths.max())
  prompts = np.zeros((3, plen, cfg.sonar_embed_dim), np.float32)
  for i, n in enumerate(lengths):
    prompts[i, :n] = rng.normal(size=(n, cfg.sonar_embed_dim))
  prompts[0, 3:] = 7.0   # padding garbage must not matter
  decoder = OneTowerDecoder(model, SAMPLER)
  key = jax.random.key(3)
  start = jax.jit(lambda v, p, l, r: decoder.start(v, p, l, plen + max_len, r))
  advance = jax.jit(decoder.advance)
  state, concept = start(variables, prompts, lengths, jax.random.fold_in(key, 0))
  docs = [prompts[i, :n] for i, n in enumerate(lengths)]
  for k in range(max_len):
    if k > 0:
      slot = jnp.asarray(lengths + k - 1)
      state, concept = advance(variables, state, concept, slot, jax.random.fold_in(key, k))
    want = _full_forward_sample(model, variables, docs, jax.random.fold_in(key, k))
    got = np.asarray(concept)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    docs = [np.concatenate([d, got[i:i + 1]]) for i, d in enumerate(docs)]
  # an unguided sampler goes through the same path without the unconditional half
  plain = OneTowerDecoder(model, SAMPLER.replace(guidance_scale=1.0))
  _, first = jax.jit(lambda v, p, l, r: plain.start(v, p, l, plen + max_len, r))(
      variables, prompts, lengths, key)
  want = _full_forward_sample(model, variables, [prompts[i, :n] for i, n in enumerate(lengths)],
                              key, SAMPLER.replace(guidance_scale=1.0))
  np.testing.assert_allclose(np.asarray(first), want, rtol=1e-4, atol=1e-4)


def test_teacher_forced_equals_full_forward_sampler():
  cfg = _cfg()
  model, variables = _variables(cfg, seed=6)
  emb, seg, pos, _, _, _ = _inputs(cfg)
  batch = _batch(seg, pos, emb)
  key = jax.random.key(5)
  predict = jax.jit(lambda v, b, r: teacher_forced(model, v, b, sampler=SAMPLER, rng=r))
  preds, normalized = predict(variables, batch, key)

  def denoise_fn(x_t, t, with_uncond):
    ts = jnp.full(seg.shape, t, jnp.int32)
    run = lambda drop: model.apply(variables, emb, seg, pos, noisy=x_t, timesteps=ts,
                                   drop_cond=jnp.full(seg.shape, drop))[0]
    return (run(False), run(True)) if with_uncond else run(False)

  alpha_bar = diffusion.alpha_bar_from_config(cfg)
  want = jax.jit(lambda r: diffusion.sample(denoise_fn, r, normalized.shape, alpha_bar,
                                            SAMPLER))(key)
  real = seg > 0
  np.testing.assert_allclose(np.asarray(preds)[real], np.asarray(want)[real], rtol=1e-4,
                             atol=1e-4)
  # position j's prediction depends on the clean concepts before it: change concept 2 of row 1
  emb2 = emb.copy()
  emb2[1, 2] += 1.0
  moved, _ = predict(variables, _batch(seg, pos, emb2), key)
  np.testing.assert_allclose(np.asarray(moved)[1, :3], np.asarray(preds)[1, :3], rtol=1e-6,
                             atol=1e-6)
  assert np.abs(np.asarray(moved)[1, 3] - np.asarray(preds)[1, 3]).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Recipe

def test_param_count_1b6_equals_hand_formula():
  cfg = _recipe_config()
  assert (cfg.num_layers, cfg.num_heads, cfg.model_dim, cfg.swiglu_inner_dim, cfg.head_dim) == (
      32, 32, 2048, 5632, 64)
  start = time.time()
  model = OneTowerLCM(cfg)
  emb = jax.ShapeDtypeStruct((1, 2, cfg.sonar_embed_dim), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  shapes = jax.eval_shape(lambda e, s, p: model.init(jax.random.key(0), e, s, p), emb, ids, ids)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))
  d, s, f, n, te, p = 2048, 1024, 5632, 32, 256, 4096
  layer = 4 * (d * d + d) + 2 * (d * f + f) + (f * d + d) + 2 * d
  hand = (te * d + d + d * d + d) + ((s + d) * d + d) + p * d + n * layer + d + (d * s + s)
  print(f"one_tower_1b6: param_count {count:,} (hand formula {hand:,}; eval_shape "
        f"{time.time() - start:.1f}s)")
  assert count == hand == param_count_formula(cfg) == 1_666_491_392
  buffers = jax.tree.leaves(shapes["buffers"])
  assert sorted(x.shape for x in buffers) == [(s,), (s,)]


def test_train_flops_per_concept_bench():
  cfg = _recipe_config("bench")
  d, s, f, n, length = 1024, 1024, 2816, 8, 128
  assert (cfg.model_dim, cfg.swiglu_inner_dim, cfg.num_layers) == (d, f, n)
  matmul = 2 * (s + d) * d + 2 * n * (4 * d * d + 3 * d * f) + d * s
  assert matmul_param_count(cfg) == matmul
  per_concept = 6 * matmul + 3 * 2 * n * 4 * (2 * length) * d
  assert train_flops_per_concept(cfg, length) == per_concept
  table = 6 * 100 * (256 * d + d * d) / (16 * length)
  assert train_flops_per_concept(cfg, length, rows_per_step=16) == round(per_concept + table)
  full = _recipe_config()
  print(f"one_tower_1b6: train FLOPs/concept {train_flops_per_concept(full, 128):.4e} "
        f"(matmul params {matmul_param_count(full):,})")


def test_recipe_variants():
  tiny, bench = _recipe_config("tiny"), _recipe_config("bench")
  assert tiny.family == bench.family == FAMILY
  assert (tiny.model_dim, tiny.num_layers) == (64, 2)
  assert (bench.model_dim, bench.num_layers, bench.num_heads) == (1024, 8, 16)
  with pytest.raises(errors.ConfigError):
    one_tower_1b6.get_config("huge")
