"""Two-Tower diffusion LCM against independent float64 NumPy oracles.

The oracle below is written from the spec and reads the REFERENCE state dict (torch layout, keys
of section 9, produced by ``naming.to_reference``), so it also checks the key mapping and the
(self-attn, cross-attn, ffn) x (shift, scale, gate) chunk order. It computes everything the long
way (q/k projections of the identity-mask self-attention, per-position modulators).

Tolerances: float32 JAX vs float64 NumPy, rtol 1e-4 (a few hundred float32 ops deep); same-precision
reformulations (shortcuts, scan, packing, shift) ~1e-5; sharded vs single device 2e-5 as
tests/unit/test_train.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import two_tower_1b6, two_tower_7b
from lcm_jax import diffusion
from lcm_jax import evaluate
from lcm_jax import families
from lcm_jax import sharding
from lcm_jax import train
from lcm_interop import naming
from lcm_jax.models.config import ModelConfig
from lcm_jax.models.two_tower import (TwoTowerLCM, cross_attention_mask, diffusion_loss,
                                      diffusion_loss_from_draws, timestep_features)
from tests import helpers

FAMILY = "two_tower_diffusion_lcm"
T_SMALL = 20   # <= B * L of the packed batch below, so the timestep-table shortcut is exercised


def _cfg(**kw) -> ModelConfig:
  base = dict(family=FAMILY, model_dim=32, num_layers=2, denoiser_num_layers=2, num_heads=4,
              ffn_inner_dim=96, ffn_multiple_of=16, sonar_embed_dim=16, dropout=0.0,
              dtype="float32", timestep_embed_dim=16, num_diffusion_train_steps=T_SMALL)
  base.update(kw)
  return ModelConfig(**base)


def _packed():
  """Two rows of 12: [doc 5 | doc 4 | pad 3] and [doc 7 | doc 5]."""
  seg = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 7 + [2] * 5], np.int32)
  pos = np.array([list(range(5)) + list(range(4)) + [0] * 3, list(range(7)) + list(range(5))],
                 np.int32)
  return seg, pos


def _init(cfg: ModelConfig, seed: int = 0, direct: bool = False):
  model = TwoTowerLCM(cfg, direct=direct)
  emb = jnp.zeros((1, 4, cfg.sonar_embed_dim))
  seg = jnp.ones((1, 4), jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(seed), emb, seg, jnp.arange(4)[None])
  return model, nn.meta.unbox(variables["params"]), variables["buffers"]


def _randomize(params, seed: int = 1, scale: float = 0.05):
  """Perturbs every parameter, and makes the (zero-initialised) modulators clearly non-zero."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for (path, leaf), key in zip(leaves, keys):
    names = [getattr(p, "key", str(p)) for p in path]
    noise = jax.random.normal(key, leaf.shape, leaf.dtype)
    out.append(noise * 0.1 if "modulator" in names else leaf + scale * noise)
  return jax.tree_util.tree_unflatten(treedef, out)


def _buffers(cfg: ModelConfig, seed: int = 2):
  rng = np.random.default_rng(seed)
  return {"sonar_normalizer": {
      "center": jnp.asarray(rng.normal(size=cfg.sonar_embed_dim).astype(np.float32) * 0.1),
      "scale": jnp.asarray(rng.uniform(0.5, 2.0, size=cfg.sonar_embed_dim).astype(np.float32))}}


def _inputs(cfg: ModelConfig, seed: int = 3):
  rng = np.random.default_rng(seed)
  seg, pos = _packed()
  shape = seg.shape + (cfg.sonar_embed_dim,)
  emb = rng.normal(size=shape).astype(np.float32)
  noisy = rng.normal(size=shape).astype(np.float32)
  t = rng.integers(0, cfg.num_diffusion_train_steps, size=seg.shape).astype(np.int32)
  return emb, seg, pos, noisy, t


def _forward(model, params, buffers, emb, seg, pos, noisy, t, drop=None):
  fn = jax.jit(lambda p, b, *a: model.apply({"params": p, "buffers": b}, *a[:3], noisy=a[3],
                                            timesteps=a[4], drop_cond=a[5]))
  return fn(params, buffers, emb, seg, pos, noisy, t, drop)


# ---------------------------------------------------------------------------------------------
# float64 NumPy oracle, on reference (torch-layout) keys

def np_linear(x, sd, prefix):
  return x @ sd[prefix + "weight"].T + sd[prefix + "bias"]


def np_rms(x, w, eps=1e-5):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_silu(x):
  return x / (1.0 + np.exp(-x))


def np_swiglu(x, sd, p):
  gate = np_silu(np_linear(x, sd, p + "gate_proj."))
  return np_linear(gate * np_linear(x, sd, p + "inner_proj."), sd, p + "output_proj.")


def np_rope(x, positions, theta=10000.0):
  """x (L, H, D): rotates adjacent pairs (2i, 2i+1) by positions * theta^(-2i/D)."""
  d = x.shape[-1]
  out = np.empty_like(x)
  for i in range(d // 2):
    ang = positions[:, None] * theta ** (-2.0 * i / d)
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[..., 2 * i], x[..., 2 * i + 1]
    out[..., 2 * i] = a * c - b * s
    out[..., 2 * i + 1] = a * s + b * c
  return out


def np_attention(xq, xkv, sd, p, num_heads, mask, q_pos=None, k_pos=None):
  """Full multi-head attention of xq (Lq, d) over xkv (Lk, d) with a (Lq, Lk) bool mask."""
  lq, lk = xq.shape[0], xkv.shape[0]
  q = np_linear(xq, sd, p + "q_proj.").reshape(lq, num_heads, -1)
  k = np_linear(xkv, sd, p + "k_proj.").reshape(lk, num_heads, -1)
  v = np_linear(xkv, sd, p + "v_proj.").reshape(lk, num_heads, -1)
  if q_pos is not None:
    q, k = np_rope(q, q_pos), np_rope(k, k_pos)
  hd = q.shape[-1]
  out = np.zeros_like(q)
  for h in range(num_heads):
    scores = q[:, h] @ k[:, h].T / np.sqrt(hd)
    for i in range(lq):
      allowed = mask[i]
      if not allowed.any():
        continue
      s = scores[i, allowed]
      w = np.exp(s - s.max())
      out[i, h] = (w / w.sum()) @ v[allowed, h]
  return np_linear(out.reshape(lq, -1), sd, p + "output_proj.")


def np_timestep_features(t, dim):
  half = dim // 2
  out = np.zeros(t.shape + (dim,))
  for i in range(half):
    f = np.exp(-np.log(10000.0) * i / half)
    out[..., i] = np.cos(t * f)          # cos first
    out[..., half + i] = np.sin(t * f)
  return out


def np_cross_mask(seg_row, drop_row=None, q_seg=None, q_index=None, shift=0):
  """(Lq, Lc + 1): zero slot always; context j iff same non-padding doc and j < q_index + shift."""
  q_seg = seg_row if q_seg is None else q_seg
  q_index = np.arange(len(q_seg)) if q_index is None else q_index
  mask = np.zeros((len(q_seg), len(seg_row) + 1), bool)
  for i in range(len(q_seg)):
    mask[i, 0] = True
    if q_seg[i] == 0 or (drop_row is not None and drop_row[i]):
      continue
    for j in range(len(seg_row)):
      mask[i, j + 1] = seg_row[j] == q_seg[i] and j < q_index[i] + shift
  return mask


def np_contextualizer(sd, cfg, emb_row, seg_row, pos_row):
  x = (emb_row - sd["sonar_normalizer.center"]) / sd["sonar_normalizer.scale"]
  x = np_linear(x, sd, "encoder_frontend.pre_linear.")
  n = len(seg_row)
  mask = np.array([[seg_row[i] > 0 and seg_row[j] == seg_row[i] and j <= i for j in range(n)]
                   for i in range(n)])
  pos = pos_row.astype(np.float64)
  for l in range(cfg.num_layers):
    p = f"context_encoder.layers.{l}."
    h = np_rms(x, sd[p + "self_attn_layer_norm.weight"])
    x = x + np_attention(h, h, sd, p + "self_attn.", cfg.num_heads, mask, pos, pos)
    x = x + np_swiglu(np_rms(x, sd[p + "ffn_layer_norm.weight"]), sd, p + "ffn.")
  return np_rms(x, sd["context_encoder.layer_norm.weight"])


def np_denoiser(sd, cfg, noisy_row, t_row, context_row, mask):
  d = cfg.model_dim
  temb = np_timestep_features(t_row.astype(np.float64), cfg.timestep_embed_dim)
  temb = np_linear(np_silu(np_linear(temb, sd, "denoiser.embed_time.fc1.")), sd,
                   "denoiser.embed_time.fc2.")
  x = np_linear(noisy_row, sd, "denoiser.initial_proj.fc.")
  kv = np.concatenate([np.zeros((1, d)), context_row], axis=0)
  eye = np.eye(len(x), dtype=bool)
  for l in range(cfg.denoiser_num_layers):
    p = f"denoiser.layers.{l}."
    mod = np_linear(np_silu(temb), sd, p + "modulator.fc.")
    c = [mod[:, k * d:(k + 1) * d] for k in range(9)]
    h = np_rms(x, sd[p + "self_attn_layer_norm.weight"]) * (1 + c[1]) + c[0]
    x = x + c[2] * np_attention(h, h, sd, p + "self_attn.", cfg.num_heads, eye)
    h = np_rms(x, sd[p + "cross_attention_layer_norm.weight"]) * (1 + c[4]) + c[3]
    x = x + c[5] * np_attention(h, kv, sd, p + "cross_attention.", cfg.num_heads, mask)
    h = np_rms(x, sd[p + "ffn_layer_norm.weight"]) * (1 + c[7]) + c[6]
    x = x + c[8] * np_swiglu(h, sd, p + "ffn.")
  return np_linear(np_rms(x, sd["denoiser.layer_norm.weight"]), sd, "denoiser.final_proj.fc.")


def _ref64(params, buffers, cfg):
  return {k: np.asarray(v, np.float64)
          for k, v in naming.to_reference(params, buffers, cfg).items()}


# ---------------------------------------------------------------------------------------------

def test_timestep_features_cos_first_and_frequencies():
  t = np.array([0, 1, 7, 99], np.int32)
  got = np.asarray(timestep_features(jnp.asarray(t), 256))
  assert got.shape == (4, 256) and got.dtype == np.float32
  i = np.arange(128)
  f = np.exp(-np.log(10000.0) * i / 128)
  np.testing.assert_allclose(got[:, :128], np.cos(t[:, None] * f), atol=2e-5)
  np.testing.assert_allclose(got[:, 128:], np.sin(t[:, None] * f), atol=2e-5)
  np.testing.assert_array_equal(got[0, :128], 1.0)   # t = 0: cos half first, all ones
  np.testing.assert_array_equal(got[0, 128:], 0.0)
  np.testing.assert_allclose(got[1, 1], np.cos(np.exp(-np.log(10000.0) / 128)), rtol=1e-6)


def test_cross_attention_mask_matches_loops():
  seg, _ = _packed()
  drop = np.zeros(seg.shape, bool)
  drop[0, 3] = drop[1, 8] = True
  got = np.asarray(cross_attention_mask(jnp.asarray(seg), jnp.asarray(drop)))
  assert got.shape == (2, 1, 12, 13) and got.dtype == bool
  for b in range(2):
    np.testing.assert_array_equal(got[b, 0], np_cross_mask(seg[b], drop[b]))
  assert got[..., 0].all()                      # the zero slot is visible to everyone
  assert not got[0, 0, 9:, 1:].any()            # padding queries see only the zero slot
  assert not got[0, 0, 5, 1:].any()             # first concept of doc 2: only the zero slot
  assert got[0, 0, 6, 1:].sum() == 1 and got[0, 0, 6, 6]  # sees doc 2's first concept only
  # fine-tuning form: queries = the 3 target rows, context = 4 source + 3 target, shift 4
  ctx_seg = np.ones((1, 7), np.int32)
  ft = np.asarray(cross_attention_mask(jnp.asarray(ctx_seg), q_segment_ids=jnp.ones((1, 3)),
                                       q_index=jnp.arange(3), shift=4))
  np.testing.assert_array_equal(ft[0, 0],
                                np_cross_mask(ctx_seg[0], None, np.ones(3), np.arange(3), 4))
  np.testing.assert_array_equal(ft[0, 0],
                                np.asarray(cross_attention_mask(jnp.asarray(ctx_seg)))[0, 0, 4:])
  # one shift per row: (B,)
  two = np.asarray(cross_attention_mask(jnp.ones((2, 7), jnp.int32), q_segment_ids=jnp.ones((2, 3)),
                                        shift=jnp.array([4, 2])))
  np.testing.assert_array_equal(two[0, 0], ft[0, 0])
  np.testing.assert_array_equal(two[1, 0],
                                np_cross_mask(ctx_seg[0], None, np.ones(3), np.arange(3), 2))


@pytest.mark.parametrize("scan", [True, False])
def test_reference_keys_shapes_init_and_round_trip(scan):
  cfg = _cfg(scan_layers=scan, num_layers=3, denoiser_num_layers=2)
  _, params, buffers = _init(cfg)
  state = naming.to_reference(params, buffers, cfg)
  expected = naming.reference_shapes(cfg)
  assert {k: v.shape for k, v in state.items()} == expected
  d, s = cfg.model_dim, cfg.sonar_embed_dim
  assert expected["denoiser.embed_time.fc1.weight"] == (d, cfg.timestep_embed_dim)
  assert expected["denoiser.layers.1.modulator.fc.weight"] == (9 * d, d)
  assert expected["denoiser.layers.1.modulator.fc.bias"] == (9 * d,)
  assert expected["denoiser.initial_proj.fc.weight"] == (d, s)
  assert expected["denoiser.final_proj.fc.weight"] == (s, d)
  assert "sonar_normalizer.center" in state
  assert "context_encoder.layers.2.ffn.gate_proj.bias" in state
  # init: zero modulators; DiT timestep MLP N(0, 0.02) with zero bias; reference q/k/v init
  for i in range(2):
    assert not state[f"denoiser.layers.{i}.modulator.fc.weight"].any()
    assert not state[f"denoiser.layers.{i}.modulator.fc.bias"].any()
  fc2 = state["denoiser.embed_time.fc2.weight"]
  assert 0.015 < fc2.std() < 0.025 and not state["denoiser.embed_time.fc1.bias"].any()
  qb = 2 ** -0.5 * np.sqrt(6 / (2 * d))
  for name in ("self_attn", "cross_attention"):
    q = state[f"denoiser.layers.0.{name}.q_proj.weight"]
    assert 0.9 * qb < np.abs(q).max() <= qb
    assert not state[f"denoiser.layers.0.{name}.k_proj.bias"].any()
  # logical axes: the scanned stack's params carry the 'layers' axis
  model = TwoTowerLCM(cfg)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2, s)),
                         jnp.ones((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32))
  names = jax.tree_util.tree_map(lambda b: b.names, boxed["params"],
                                 is_leaf=lambda b: isinstance(b, nn.Partitioned))
  lay = names["denoiser"]["layers" if scan else "layers_0"]
  pre = ("layers",) if scan else ()
  assert lay["modulator"]["fc"]["kernel"] == pre + ("embed", "mlp")
  assert lay["cross_attention"]["k_proj"]["kernel"] == pre + ("embed", "heads")
  # bit-exact round trip
  back_params, back_buffers = naming.from_reference(state, cfg)
  helpers.assert_trees_bitwise_equal(params, back_params)
  helpers.assert_trees_bitwise_equal(buffers, back_buffers)
  with pytest.raises(ValueError, match="missing"):
    naming.from_reference({k: v for k, v in state.items()
                           if k != "denoiser.layers.0.modulator.fc.bias"}, cfg)


def test_forward_matches_numpy_oracle():
  cfg = _cfg()
  model, params, _ = _init(cfg)
  params = _randomize(params)
  buffers = _buffers(cfg)
  emb, seg, pos, noisy, t = _inputs(cfg)
  drop = np.zeros(seg.shape, bool)
  drop[0, 3] = drop[1, 9] = True
  x0_hat, normalized = _forward(model, params, buffers, emb, seg, pos, noisy, t, drop)
  sd = _ref64(params, buffers, cfg)
  center, scale = sd["sonar_normalizer.center"], sd["sonar_normalizer.scale"]
  np.testing.assert_allclose(normalized, (emb - center) / scale, rtol=1e-6, atol=1e-6)

  variables = {"params": params, "buffers": buffers}
  context, _ = model.apply(variables, emb, seg, pos, method=TwoTowerLCM.contextualize)
  for b in range(2):
    ctx = np_contextualizer(sd, cfg, emb[b].astype(np.float64), seg[b], pos[b])
    valid = seg[b] > 0
    np.testing.assert_allclose(np.asarray(context)[b][valid], ctx[valid], rtol=1e-4, atol=1e-5)
    want = np_denoiser(sd, cfg, noisy[b].astype(np.float64), t[b], ctx,
                       np_cross_mask(seg[b], drop[b]))
    # every position, padding included (padding queries see only the zero slot)
    np.testing.assert_allclose(np.asarray(x0_hat)[b], want, rtol=1e-4, atol=1e-5)
  assert x0_hat.dtype == jnp.float32 and x0_hat.shape == noisy.shape

  # fewer positions than T: the per-position modulator path, same oracle
  k, v = model.apply(variables, context[:1], method=TwoTowerLCM.cross_kv)
  mask = cross_attention_mask(jnp.asarray(seg[:1]), jnp.asarray(drop[:1]))
  row = model.apply(variables, noisy[:1], t[:1], k, v, mask, method=TwoTowerLCM.denoise)
  assert seg[:1].size < cfg.num_diffusion_train_steps
  np.testing.assert_allclose(row[0], x0_hat[0], rtol=1e-5, atol=1e-6)


def test_cross_kv_zero_slot_is_the_bias():
  cfg = _cfg(denoiser_num_layers=3)
  model, params, buffers = _init(cfg)
  params = _randomize(params)
  variables = {"params": params, "buffers": buffers}
  ctx = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, cfg.model_dim)), jnp.float32)
  k, v = model.apply(variables, ctx, method=TwoTowerLCM.cross_kv)
  k0, v0 = model.apply(variables, ctx, prepend_zero=False, method=TwoTowerLCM.cross_kv)
  h, hd = cfg.num_heads, cfg.head_dim
  assert k.shape == v.shape == (3, 2, 6, h, hd) and k0.shape == (3, 2, 5, h, hd)
  np.testing.assert_allclose(k[:, :, 1:], k0, rtol=1e-6, atol=1e-6)
  sd = _ref64(params, buffers, cfg)
  for layer in range(3):
    for arr, name in ((k, "k_proj"), (v, "v_proj")):
      bias = sd[f"denoiser.layers.{layer}.cross_attention.{name}.bias"].reshape(h, hd)
      np.testing.assert_allclose(arr[layer, :, 0], np.broadcast_to(bias, (2, h, hd)), atol=1e-7)
      want = ctx[1, 2] @ sd[f"denoiser.layers.{layer}.cross_attention.{name}.weight"].T + \
          sd[f"denoiser.layers.{layer}.cross_attention.{name}.bias"]
      np.testing.assert_allclose(arr[layer, 1, 3].reshape(-1), want, rtol=1e-5, atol=1e-6)


def test_packed_documents_equal_documents_alone():
  cfg = _cfg()
  model, params, _ = _init(cfg)
  params, buffers = _randomize(params), _buffers(cfg)
  emb, seg, pos, noisy, t = _inputs(cfg)
  emb[0, 9:] = 123.0   # garbage in the padding must not leak anywhere
  x0_hat, _ = _forward(model, params, buffers, emb, seg, pos, noisy, t)
  for b, start, n in ((0, 0, 5), (0, 5, 4), (1, 7, 5)):  # two shapes: two compilations
    sl = slice(start, start + n)
    alone, _ = _forward(model, params, buffers, emb[b:b + 1, sl], np.ones((1, n), np.int32),
                        np.arange(n, dtype=np.int32)[None], noisy[b:b + 1, sl], t[b:b + 1, sl])
    np.testing.assert_allclose(x0_hat[b, sl], alone[0], rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(x0_hat)).all()


def test_dropped_conditioning_equals_empty_context():
  cfg = _cfg()
  model, params, _ = _init(cfg)
  params, buffers = _randomize(params), _buffers(cfg)
  emb, seg, pos, noisy, t = _inputs(cfg)
  drop = np.zeros(seg.shape, bool)
  drop[0, [2, 7]] = drop[1, [4, 11]] = True
  x0_hat, _ = _forward(model, params, buffers, emb, seg, pos, noisy, t, drop)
  variables = {"params": params, "buffers": buffers}
  context, _ = model.apply(variables, emb, seg, pos, method=TwoTowerLCM.contextualize)
  k, v = model.apply(variables, context[:, :0], method=TwoTowerLCM.cross_kv)  # zero slot only
  assert k.shape[2] == 1
  empty = model.apply(variables, noisy, t, k, v, None, method=TwoTowerLCM.denoise)
  np.testing.assert_allclose(np.asarray(x0_hat)[drop], np.asarray(empty)[drop], rtol=1e-5,
                             atol=1e-6)
  # the first concept of a document is unconditional anyway; later ones are not
  first = (pos == 0) & (seg > 0)
  np.testing.assert_allclose(np.asarray(x0_hat)[first], np.asarray(empty)[first], rtol=1e-5,
                             atol=1e-6)
  conditioned = (pos > 0) & ~drop
  assert np.abs(np.asarray(x0_hat)[conditioned] - np.asarray(empty)[conditioned]).max() > 1e-3


def test_shortcuts_equal_direct_outputs_and_grads():
  cfg = _cfg()
  fast, params, _ = _init(cfg)
  slow = TwoTowerLCM(cfg, direct=True)
  params, buffers = _randomize(params), _buffers(cfg)
  emb, seg, pos, noisy, t = _inputs(cfg)
  assert seg.size >= cfg.num_diffusion_train_steps  # the timestep-table path
  weights = jnp.asarray(np.random.default_rng(9).normal(size=noisy.shape), jnp.float32)

  def loss(model):
    def f(p):
      x0_hat, _ = model.apply({"params": p, "buffers": buffers}, emb, seg, pos, noisy=noisy,
                              timesteps=t)
      return jnp.sum(x0_hat * weights), x0_hat
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  (l_fast, out_fast), g_fast = loss(fast)
  (l_slow, out_slow), g_slow = loss(slow)
  np.testing.assert_allclose(out_fast, out_slow, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(l_fast, l_slow, rtol=1e-5)
  flat_slow = dict(jax.tree_util.tree_flatten_with_path(g_slow)[0])
  for path, a in jax.tree_util.tree_flatten_with_path(g_fast)[0]:
    b = flat_slow[path]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max())),
                               err_msg=jax.tree_util.keystr(path))
  for g in (g_fast, g_slow):
    sa = g["denoiser"]["layers"]["self_attn"]
    for name in ("q_proj", "k_proj"):
      for leaf in sa[name].values():
        np.testing.assert_array_equal(leaf, 0.0)
    assert np.abs(np.asarray(g["denoiser"]["layers"]["modulator"]["fc"]["kernel"])).max() > 0
    assert np.abs(np.asarray(g["denoiser"]["embed_time"]["fc1"]["kernel"])).max() > 0


def test_scanned_unscanned_and_remat_agree():
  cfg = _cfg(denoiser_num_layers=3)
  scanned, params, _ = _init(cfg.replace(scan_layers=True))
  params, buffers = _randomize(params), _buffers(cfg)
  state = naming.to_reference(params, buffers, cfg)
  u_params, u_buffers = naming.from_reference(state, cfg.replace(scan_layers=False))
  assert "layers_2" in u_params["denoiser"] and "layers" not in u_params["denoiser"]
  emb, seg, pos, noisy, t = _inputs(cfg)
  drop = np.zeros(seg.shape, bool)
  drop[1, 5] = True
  a, _ = _forward(scanned, params, buffers, emb, seg, pos, noisy, t, drop)
  b, _ = _forward(TwoTowerLCM(cfg.replace(scan_layers=False)), u_params, u_buffers, emb, seg,
                  pos, noisy, t, drop)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  c, _ = _forward(TwoTowerLCM(cfg.replace(remat_policy="full")), params, buffers, emb, seg, pos,
                  noisy, t, drop)
  np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)


def test_finetuning_shift_equals_full_sequence():
  """Denoiser over target rows only with shift = source length == full sequence with shift 0."""
  cfg = _cfg()
  model, params, _ = _init(cfg)
  params, buffers = _randomize(params), _buffers(cfg)
  variables = {"params": params, "buffers": buffers}
  rng = np.random.default_rng(11)
  src, tgt = 4, 5
  n = src + tgt
  emb = rng.normal(size=(2, n, cfg.sonar_embed_dim)).astype(np.float32)
  noisy = rng.normal(size=emb.shape).astype(np.float32)
  t = rng.integers(0, cfg.num_diffusion_train_steps, size=(2, n)).astype(np.int32)
  seg = np.ones((2, n), np.int32)
  pos = np.tile(np.arange(n, dtype=np.int32), (2, 1))
  full, _ = _forward(model, params, buffers, emb, seg, pos, noisy, t)
  context, _ = model.apply(variables, emb, seg, pos, method=TwoTowerLCM.contextualize)
  k, v = model.apply(variables, context, method=TwoTowerLCM.cross_kv)
  mask = cross_attention_mask(jnp.asarray(seg), q_segment_ids=jnp.ones((2, tgt), jnp.int32),
                              q_index=jnp.arange(tgt), shift=src)
  target_only = model.apply(variables, noisy[:, src:], t[:, src:], k, v, mask,
                            method=TwoTowerLCM.denoise)
  np.testing.assert_allclose(target_only, full[:, src:], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Loss and training

def _batch(seg, pos, emb):
  return {"embeddings": jnp.asarray(emb), "segment_ids": jnp.asarray(seg),
          "positions": jnp.asarray(pos),
          "target_mask": jnp.asarray(((seg > 0) & (pos > 0)).astype(np.float32))}


@pytest.mark.parametrize("weighting", ["none", "clamped_snr"])
def test_loss_matches_numpy_given_draws(weighting):
  cfg = _cfg(loss_weighting=weighting)
  model, params, _ = _init(cfg)
  params, buffers = _randomize(params), _buffers(cfg)
  variables = {"params": params, "buffers": buffers}
  emb, seg, pos, _, t = _inputs(cfg)
  t[0, 1] = cfg.num_diffusion_train_steps - 1   # alpha_bar = 0: pure noise
  eps = np.random.default_rng(5).normal(size=emb.shape).astype(np.float32)
  drop = np.zeros(seg.shape, bool)
  drop[1, 3] = True
  batch = _batch(seg, pos, emb)
  loss_sum, count, aux = jax.jit(
      lambda v, b, t, e, d: diffusion_loss_from_draws(model, v, b, t, e, d))(
          variables, batch, t, eps, drop)
  # NumPy: x0 = normalized inputs, x_t = sqrt(ab) x0 + sqrt(1 - ab) eps (float64)
  center = np.asarray(buffers["sonar_normalizer"]["center"], np.float64)
  scale = np.asarray(buffers["sonar_normalizer"]["scale"], np.float64)
  x0 = (emb.astype(np.float64) - center) / scale
  ab = diffusion.alpha_bar_from_config(cfg)[t][..., None]
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
  x0_hat, _ = _forward(model, params, buffers, emb, seg, pos, x_t.astype(np.float32), t, drop)
  err = ((np.asarray(x0_hat, np.float64) - x0) ** 2).sum(-1)
  w = diffusion.loss_weights_from_config(cfg)[t]
  scored = (seg > 0) & (pos > 0)
  np.testing.assert_allclose(float(loss_sum), (w * err)[scored].sum(), rtol=2e-5)
  np.testing.assert_allclose(float(aux["unweighted_loss"]), err[scored].sum(), rtol=2e-5)
  assert float(count) == scored.sum() == 2 * 12 - 3 - 4
  if weighting == "none":
    np.testing.assert_allclose(float(loss_sum), float(aux["unweighted_loss"]), rtol=1e-6)


def test_loss_randomness_and_eval_determinism():
  cfg = _cfg(cfg_dropout=0.5)
  model, params, buffers = _init(cfg)
  variables = {"params": _randomize(params), "buffers": buffers}
  emb, seg, pos, _, _ = _inputs(cfg)
  batch = _batch(seg, pos, emb)
  assert isinstance(families.get(FAMILY).build(cfg), TwoTowerLCM)
  run = jax.jit(lambda v, b, r: families.get(FAMILY).loss(model, v, b, rng=r, deterministic=True))
  ev = jax.jit(lambda v, b: diffusion_loss(model, v, b, rng=None, deterministic=True))
  a, b = run(variables, batch, jax.random.key(1)), run(variables, batch, jax.random.key(1))
  c = run(variables, batch, jax.random.key(2))
  assert float(a[0]) == float(b[0])                    # same rng, same draws
  assert float(a[0]) != float(c[0])                    # t / eps drawn although deterministic
  e1, e2 = ev(variables, batch), ev(variables, batch)
  assert float(e1[0]) == float(e2[0]) and np.isfinite(float(e1[0]))
  assert float(a[1]) == float(e1[1]) == 17.0


def _train_config(mesh=(1, 1, 1), dropout=0.0, batch=8):
  c = helpers.small_train_config(two_tower_1b6, mesh=mesh, dropout=dropout, batch=batch)
  c.model.ffn_inner_dim = 96
  c.model.ffn_multiple_of = 16
  return c


def _train_batch(c, seed=0):
  """Smooth documents (a random walk), so that the context helps."""
  return helpers.packed_batch(c, seed=seed, random_walk=True)


def test_training_reduces_the_eval_loss():
  c = _train_config()
  s = train.setup(c, devices=jax.devices()[:1])
  assert isinstance(s.model, TwoTowerLCM)
  state = train.init_state(s, helpers.random_normalizer(c.model.sonar_embed_dim))
  step, eval_step = train.make_train_step(s), evaluate.Evaluator(s, evaluate.settings_from_config(s.config))
  batch = sharding.global_batch_from_local(_train_batch(c), s.mesh)
  before = eval_step(state["params"], state["buffers"], batch)
  again = eval_step(state["params"], state["buffers"], batch)
  assert float(before["loss_sum"]) == float(again["loss_sum"])  # eval draws are fixed
  losses = []
  for _ in range(30):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  after = eval_step(state["params"], state["buffers"], batch)
  print("eval loss per target", float(before["loss_sum"] / before["count"]), "->",
        float(after["loss_sum"] / after["count"]), "train", losses[0], "->", losses[-1])
  assert np.isfinite(losses).all()
  assert float(after["loss_sum"]) < 0.7 * float(before["loss_sum"])
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
  assert "unweighted_loss_sum" in after


def test_sharded_step_equals_single_device():
  """(data, fsdp, tensor) = (2, 2, 2) vs one device, with dropout on: same loss and params."""
  single, l1 = helpers.run_steps(_train_config(mesh=(1, 1, 1), dropout=0.1), jax.devices()[:1],
                                 make_batch=_train_batch)
  sharded, l8 = helpers.run_steps(_train_config(mesh=(2, 2, 2), dropout=0.1), jax.devices(),
                                  make_batch=_train_batch)
  np.testing.assert_allclose(l1, l8, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(single["params"]), jax.tree.leaves(sharded["params"])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  moved = jax.tree.leaves(single["params"]["denoiser"]["layers"]["modulator"])
  assert all(np.abs(np.asarray(x)).max() > 0 for x in moved)  # zero-init modulators trained


# ---------------------------------------------------------------------------------------------
# Counts

def _spec_sum(cfg: ModelConfig) -> int:
  total = sum(int(np.prod(v)) for v in naming.reference_shapes(cfg).values())
  return total - 2 * cfg.sonar_embed_dim


@pytest.mark.parametrize("module,expected", [(two_tower_1b6, 1_645_538_304),
                                             (two_tower_7b, 6_930_781_696)])
def test_param_counts_equal_spec_sum(module, expected):
  cfg = ModelConfig.from_config(module.get_config().model)
  d, s, f = cfg.model_dim, cfg.sonar_embed_dim, cfg.swiglu_inner_dim
  # written out from the reference checkpoint format (torch Linear weight (out, in) + bias)
  attn = 4 * (d * d + d)
  ffn = 2 * (f * d + f) + (d * f + d)
  ctx = (d * s + d) + cfg.num_layers * (attn + ffn + 2 * d) + d
  den_layer = 2 * attn + ffn + 3 * d + (9 * d * d + 9 * d)
  den = (d * 256 + d) + (d * d + d) + (d * s + d) + cfg.denoiser_num_layers * den_layer + d + \
      (s * d + s)
  print(f"{module.__name__}: param_count {families.param_count(cfg):,}, spec sum {_spec_sum(cfg):,}")
  assert families.param_count(cfg) == _spec_sum(cfg) == ctx + den == expected


def test_train_flops_per_concept_two_tower():
  cfg = ModelConfig.from_config(two_tower_1b6.get_config("bench").model)
  d, s, f, nc, nd, length = 1024, 1024, 2816, 4, 8, 128
  assert (cfg.num_layers, cfg.denoiser_num_layers, cfg.swiglu_inner_dim) == (nc, nd, f)
  ctx_matmul = s * d + nc * (4 * d * d + 3 * d * f)
  den_matmul = 2 * s * d + nd * (2 * d * d + 4 * d * d + 3 * d * f)
  assert families.matmul_param_count(cfg) == ctx_matmul + den_matmul
  per_concept = (6 * (ctx_matmul + den_matmul) + 6 * nd * 2 * d * d / length
                 + 3 * 4 * d * (nc * length + nd * (length + 1)))
  assert families.train_flops_per_concept(cfg, length) == round(per_concept)
  table = 6 * 100 * (256 * d + d * d + nd * 9 * d * d) / (16 * length)
  assert families.train_flops_per_concept(cfg, length, rows_per_step=16) == round(per_concept + table)


def test_describe_two_tower():
  from lcm_jax import main  # pylint: disable=g-import-not-at-top
  out = main.describe(two_tower_1b6.get_config())
  assert "two_tower_diffusion_lcm" in out and "1,645,538,304" in out
