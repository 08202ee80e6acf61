"""The shared transformer block against independent float64 NumPy oracles.

Tolerances: float32 JAX vs float64 NumPy, relative ~1e-5 (atol 1e-5 on O(1) values).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mse_1b6
from lcm_jax import layers
from lcm_jax.models.config import ModelConfig

RTOL, ATOL = 1e-5, 1e-5


def _cfg(**kw) -> ModelConfig:
  base = dict(model_dim=32, num_layers=2, num_heads=4, ffn_inner_dim=96, ffn_multiple_of=16,
              sonar_embed_dim=24, dropout=0.0, dtype="float32")
  base.update(kw)
  return ModelConfig(**base)


def _np_params(variables):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(variables))


# ---------------------------------------------------------------------------------------------
# NumPy oracles (float64), written from the spec, not from the JAX code.

def np_rmsnorm(x, w, eps=1e-5):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_rope_interleaved(x, positions, theta=10000.0):
  """x (B, L, H, D); rotates (x[2i], x[2i+1]) by positions * theta^(-2i/D)."""
  d = x.shape[-1]
  out = np.empty_like(x)
  for i in range(d // 2):
    ang = positions[:, :, None] * theta ** (-2.0 * i / d)
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[..., 2 * i], x[..., 2 * i + 1]
    out[..., 2 * i] = a * c - b * s
    out[..., 2 * i + 1] = a * s + b * c
  return out


def np_rope_rotate_half(x, positions, theta=10000.0):
  """The OTHER layout (GPT-NeoX / HF Llama): pairs (i, i + D/2). Must differ from ours."""
  d = x.shape[-1]
  out = np.empty_like(x)
  for i in range(d // 2):
    ang = positions[:, :, None] * theta ** (-2.0 * i / d)
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[..., i], x[..., i + d // 2]
    out[..., i] = a * c - b * s
    out[..., i + d // 2] = a * s + b * c
  return out


def np_linear(x, p):
  return x @ p["kernel"] + p["bias"]


def np_silu(x):
  return x / (1.0 + np.exp(-x))


def np_swiglu(x, p):
  return np_linear(np_silu(np_linear(x, p["gate_proj"])) * np_linear(x, p["inner_proj"]),
                   p["output_proj"])


def np_mask(segment_ids):
  seg = np.asarray(segment_ids)
  length = seg.shape[1]
  causal = np.arange(length)[:, None] >= np.arange(length)[None, :]
  same = seg[:, :, None] == seg[:, None, :]
  return causal[None] & same & (seg[:, :, None] > 0)  # (B, L, L)


def np_attention(x, p, num_heads, segment_ids, positions, theta=10000.0):
  b, length, d = x.shape
  hd = d // num_heads
  split = lambda t: t.reshape(b, length, num_heads, hd)
  q = np_rope_interleaved(split(np_linear(x, p["q_proj"])), positions, theta)
  k = np_rope_interleaved(split(np_linear(x, p["k_proj"])), positions, theta)
  v = split(np_linear(x, p["v_proj"]))
  mask = np_mask(segment_ids)
  out = np.zeros((b, length, num_heads, hd))
  for bi in range(b):
    for h in range(num_heads):
      scores = q[bi, :, h] @ k[bi, :, h].T / np.sqrt(hd)
      for i in range(length):
        allowed = mask[bi, i]
        if not allowed.any():
          continue  # padding row: output unspecified (only checked to be finite)
        s = scores[i, allowed]
        w = np.exp(s - s.max())
        out[bi, i, h] = (w / w.sum()) @ v[bi, allowed, h]
  return np_linear(out.reshape(b, length, d), p["output_proj"])


def np_decoder_layer(x, p, num_heads, segment_ids, positions, eps=1e-5):
  h = np_rmsnorm(x, p["self_attn_layer_norm"]["weight"], eps)
  x = x + np_attention(h, p["self_attn"], num_heads, segment_ids, positions)
  h = np_rmsnorm(x, p["ffn_layer_norm"]["weight"], eps)
  return x + np_swiglu(h, p["ffn"])


def _packed_inputs():
  """Two rows: [doc 5 | doc 3 | pad 2] and [doc 4 | doc 4 | doc 2]."""
  seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]], np.int32)
  pos = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 0, 0], [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]], np.int32)
  return seg, pos


# ---------------------------------------------------------------------------------------------

def test_rmsnorm_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 16)).astype(np.float32) * 3.0
  m = layers.RMSNorm(eps=1e-5)
  v = m.init(jax.random.key(0), x)
  assert set(nn.meta.unbox(v)["params"]) == {"weight"}
  w = rng.normal(size=16).astype(np.float32)
  y = m.apply({"params": {"weight": w}}, x)
  np.testing.assert_allclose(np.asarray(y), np_rmsnorm(x.astype(np.float64), w), RTOL, ATOL)
  # float32 maths even for bfloat16 input; output in the requested dtype
  y16 = layers.RMSNorm(dtype=jnp.bfloat16).apply({"params": {"weight": w}}, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16


def test_rope_is_interleaved_and_matches_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 7, 3, 16)).astype(np.float32)
  pos = np.array([[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 60]], np.int32)
  got = np.asarray(layers.apply_rope(jnp.asarray(x), layers.rope_tables(jnp.asarray(pos), 16)))
  want = np_rope_interleaved(x.astype(np.float64), pos.astype(np.float64))
  np.testing.assert_allclose(got, want, RTOL, ATOL)
  # the rotate_half layout gives different numbers: the test can tell the two apart
  other = np_rope_rotate_half(x.astype(np.float64), pos.astype(np.float64))
  assert np.abs(other - got).max() > 0.1
  # position 0 is the identity; tables follow the per-document positions, not the row index
  np.testing.assert_allclose(got[0, 4], x[0, 4], atol=1e-7)
  cos, sin = layers.rope_tables(jnp.asarray(pos), 16)
  np.testing.assert_array_equal(cos[0, 5], cos[0, 1])
  np.testing.assert_array_equal(sin[0, 6], sin[1, 2])
  # frequencies are theta^(-2i/head_dim) in float32
  freqs = np.asarray(layers.rope_frequencies(16))
  assert freqs.dtype == np.float32
  np.testing.assert_allclose(freqs, 10000.0 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)


def test_rope_scores_depend_on_relative_position_only():
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)).astype(np.float32))
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)).astype(np.float32))
  def score(m, n):
    rq = layers.apply_rope(q, layers.rope_tables(jnp.array([[m]]), 8))
    rk = layers.apply_rope(k, layers.rope_tables(jnp.array([[n]]), 8))
    return float(jnp.sum(rq * rk))
  assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)


@pytest.mark.parametrize("ffn,inner", [(8192, 5632), (16384, 11008), (4096, 2816)])
def test_swiglu_sizing(ffn, inner):
  assert ModelConfig(ffn_inner_dim=ffn).swiglu_inner_dim == inner


def test_model_config_validation():
  for variant in ("", "tiny", "bench"):
    cfg = ModelConfig.from_config(mse_1b6.get_config(variant).model)
    assert hash(cfg) == hash(ModelConfig.from_config(mse_1b6.get_config(variant).model))
  assert ModelConfig().head_dim == 128
  with pytest.raises(ValueError, match="unknown field.*bogus"):
    ModelConfig.from_config({"model_dim": 64, "bogus": 1})
  with pytest.raises(ValueError, match="not divisible"):
    ModelConfig(model_dim=100, num_heads=16)
  with pytest.raises(ValueError, match="even"):
    ModelConfig(model_dim=48, num_heads=16)
  with pytest.raises(ValueError, match="remat_policy"):
    ModelConfig(remat_policy="sometimes")
  assert ModelConfig(dtype="auto").compute_dtype() == jnp.float32  # CPU in tests
  assert ModelConfig(dtype="bfloat16").compute_dtype() == jnp.bfloat16


def test_swiglu_forward_matches_numpy():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 6, 32)).astype(np.float32)
  m = layers.SwiGLUFFN(model_dim=32, inner_dim=64)
  v = m.init(jax.random.key(1), x)
  p = _np_params(v)["params"]
  assert set(p) == {"gate_proj", "inner_proj", "output_proj"}
  assert p["gate_proj"]["kernel"].shape == (32, 64) and p["output_proj"]["kernel"].shape == (64, 32)
  np.testing.assert_allclose(np.asarray(m.apply(v, x)), np_swiglu(x.astype(np.float64), p),
                             RTOL, ATOL)


def test_masked_attention_matches_numpy_and_padding_is_finite():
  cfg = _cfg()
  rng = np.random.default_rng(4)
  seg, pos = _packed_inputs()
  x = rng.normal(size=(2, 10, 32)).astype(np.float32)
  m = layers.Attention(cfg.model_dim, cfg.num_heads, cfg.head_dim)
  mask = layers.causal_segment_mask(jnp.asarray(seg))
  rope = layers.rope_tables(jnp.asarray(pos), cfg.head_dim)
  v = m.init(jax.random.key(2), x, mask=mask, rope=rope)
  # non-zero biases so that the test sees them (the reference initialises them to zero)
  v = jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(9), a.shape),
                             nn.meta.unbox(v))
  p = _np_params(v)["params"]
  y = np.asarray(m.apply(v, x, mask=mask, rope=rope))
  want = np_attention(x.astype(np.float64), p, cfg.num_heads, seg, pos.astype(np.float64))
  valid = seg > 0
  np.testing.assert_allclose(y[valid], want[valid], RTOL, ATOL)
  assert np.isfinite(y).all()
  # gradients are finite too, although padding rows are fully masked
  grads = jax.jit(jax.grad(lambda v, x: jnp.sum(m.apply(v, x, mask=mask, rope=rope) ** 2),
                           argnums=(0, 1)))(v, jnp.asarray(x))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
  # a document never sees another one: perturbing doc 2 leaves doc 1 unchanged
  x2 = x.copy()
  x2[0, 5:] += 1.0
  y2 = np.asarray(m.apply(v, x2, mask=mask, rope=rope))
  np.testing.assert_array_equal(y2[0, :5], y[0, :5])


def test_mask_builder():
  seg, _ = _packed_inputs()
  got = np.asarray(layers.causal_segment_mask(jnp.asarray(seg)))[:, 0]
  np.testing.assert_array_equal(got, np_mask(seg))
  assert not got[0, 8:].any()  # padding rows see nothing


def test_decoder_layer_matches_numpy():
  cfg = _cfg()
  rng = np.random.default_rng(5)
  seg, pos = _packed_inputs()
  x = rng.normal(size=(2, 10, 32)).astype(np.float32)
  mask = layers.causal_segment_mask(jnp.asarray(seg))
  rope = layers.rope_tables(jnp.asarray(pos), cfg.head_dim)
  m = layers.DecoderLayer(cfg, deterministic=True)
  v = nn.meta.unbox(m.init(jax.random.key(3), x, mask, rope))
  v = jax.tree_util.tree_map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(7), a.shape), v)
  p = _np_params(v)["params"]
  assert set(p) == {"self_attn_layer_norm", "self_attn", "ffn_layer_norm", "ffn"}
  assert set(p["self_attn"]) == {"q_proj", "k_proj", "v_proj", "output_proj"}
  y = np.asarray(m.apply(v, x, mask, rope))
  want = np_decoder_layer(x.astype(np.float64), p, cfg.num_heads, seg, pos.astype(np.float64))
  valid = seg > 0
  np.testing.assert_allclose(y[valid], want[valid], RTOL, ATOL)
  assert np.isfinite(y).all()


def test_dropout_only_when_not_deterministic():
  cfg = _cfg(dropout=0.5)
  seg, pos = _packed_inputs()
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 10, 32)).astype(np.float32))
  m = layers.TransformerStack(cfg)
  v = jax.jit(m.init)(jax.random.key(0), x, seg, pos)
  run = jax.jit(lambda v, rng, det: m.apply(v, x, seg, pos, deterministic=det,
                                            rngs={"dropout": rng}), static_argnums=2)
  a = run(v, jax.random.key(1), True)
  np.testing.assert_array_equal(a, run(v, jax.random.key(2), True))
  c = run(v, jax.random.key(1), False)
  d = run(v, jax.random.key(2), False)
  assert not np.allclose(a, c) and not np.allclose(c, d)
  no_drop = layers.TransformerStack(cfg.replace(dropout=0.0))
  e = jax.jit(lambda v: no_drop.apply(v, x, seg, pos, deterministic=False))(v)
  np.testing.assert_allclose(e, a, atol=1e-6)


@pytest.mark.parametrize("scan,policies", [
    (True, ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")),
    (False, ("none", "dots_saveable"))])
def test_remat_policies_do_not_change_values_or_grads(scan, policies):
  seg, pos = _packed_inputs()
  x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 10, 32)).astype(np.float32))
  results = []
  for policy in policies:
    m = layers.TransformerStack(_cfg(scan_layers=scan, remat_policy=policy))
    v = jax.jit(m.init)(jax.random.key(0), x, seg, pos)
    loss = lambda v: jnp.sum(m.apply(v, x, seg, pos) ** 2)
    results.append(jax.jit(jax.value_and_grad(loss))(v))
  for val, grad in results[1:]:
    np.testing.assert_allclose(val, results[0][0], rtol=1e-6)
    for g, g0 in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(results[0][1])):
      np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-6)


def test_matmul_custom_vjp_equals_autodiff():
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(3, 5, 8)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(8, 6)).astype(np.float32))
  f1 = lambda x, w: jnp.sum(jnp.sin(layers.matmul(x, w)))
  f2 = lambda x, w: jnp.sum(jnp.sin(x @ w))
  for a, b in zip(jax.grad(f1, (0, 1))(x, w), jax.grad(f2, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_param_names_logical_axes_and_init():
  cfg = _cfg(model_dim=64, num_heads=4, ffn_inner_dim=256, ffn_multiple_of=64)
  seg, pos = _packed_inputs()
  x = jnp.zeros((2, 10, 64))
  for scan in (True, False):
    v = jax.jit(layers.TransformerStack(cfg.replace(scan_layers=scan)).init)(
        jax.random.key(0), x, seg, pos)
    names = jax.tree_util.tree_map(lambda b: b.names, v["params"],
                                   is_leaf=lambda b: isinstance(b, nn.Partitioned))
    lay = names["layers"] if scan else names["layers_1"]
    pre = ("layers",) if scan else ()
    assert names["layer_norm"]["weight"] == ("norm",)
    assert lay["self_attn"]["q_proj"]["kernel"] == pre + ("embed", "heads")
    assert lay["self_attn"]["output_proj"]["kernel"] == pre + ("heads", "embed")
    assert lay["ffn"]["gate_proj"]["kernel"] == pre + ("embed", "mlp")
    assert lay["ffn"]["output_proj"]["bias"] == pre + ("embed",)
    assert lay["ffn_layer_norm"]["weight"] == pre + ("norm",)
    if not scan:
      assert "layers_0" in names and "layers" not in names
  p = nn.meta.unbox(v["params"])["layers_0"]
  d, f = 64, cfg.swiglu_inner_dim
  qb = 2 ** -0.5 * np.sqrt(6 / (d + d))                       # xavier, gain 2^-0.5
  q = np.asarray(p["self_attn"]["q_proj"]["kernel"])
  assert np.abs(q).max() <= qb and np.abs(q).max() > 0.9 * qb
  o = np.asarray(p["self_attn"]["output_proj"]["kernel"])     # xavier, gain 1
  assert np.abs(o).max() <= np.sqrt(6 / (d + d)) and np.abs(o).max() > 0.9 * np.sqrt(6 / (d + d))
  for name in ("q_proj", "k_proj", "v_proj", "output_proj"):
    assert not np.asarray(p["self_attn"][name]["bias"]).any()   # zeros, as the reference
  g = p["ffn"]["gate_proj"]                                     # torch default: U(+-1/sqrt(fan_in))
  for arr, bound in ((g["kernel"], 1 / np.sqrt(d)), (g["bias"], 1 / np.sqrt(d)),
                     (p["ffn"]["output_proj"]["kernel"], 1 / np.sqrt(f))):
    arr = np.asarray(arr)
    assert np.abs(arr).max() <= bound and np.abs(arr).max() > 0.8 * bound
  np.testing.assert_array_equal(p["ffn_layer_norm"]["weight"], np.ones(d))
