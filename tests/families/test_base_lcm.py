"""Base-LCM: packing invariance, scan/unscan equivalence, reference naming, counts, loss, normalizer.

Tolerances: float32 on CPU; packed vs alone ~1e-5 relative (different reduction orders only).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mse_1b6
from lcm_jax import families
from lcm_interop import naming
from lcm_jax.models.base_lcm import BaseLCM, mse_loss, target_mask_from_segments
from lcm_jax.models.config import ModelConfig
from tests import helpers

TINY = ModelConfig.from_config(mse_1b6.get_config("tiny").model)  # d 64, 2 layers, sonar 32


def _init(cfg: ModelConfig, length: int = 8, seed: int = 0):
  model = BaseLCM(cfg)
  emb = jnp.zeros((1, length, cfg.sonar_embed_dim))
  ids = jnp.zeros((1, length), jnp.int32)
  variables = model.init(jax.random.key(seed), emb, ids, ids)
  return model, nn.meta.unbox(variables["params"]), variables["buffers"]


def _random_buffers(cfg: ModelConfig, seed: int = 1):
  rng = np.random.default_rng(seed)
  return {"frontend": {"sonar_normalizer": {
      "center": jnp.asarray(rng.normal(size=cfg.sonar_embed_dim).astype(np.float32) * 0.1),
      "scale": jnp.asarray(rng.uniform(0.5, 2.0, size=cfg.sonar_embed_dim).astype(np.float32))}}}


def _apply(model, params, buffers, emb, seg, pos):
  return jax.jit(model.apply)({"params": params, "buffers": buffers}, jnp.asarray(emb),
                              jnp.asarray(seg), jnp.asarray(pos))


def test_packed_row_equals_documents_alone():
  model, params, _ = _init(TINY)
  buffers = _random_buffers(TINY)
  rng = np.random.default_rng(0)
  lengths = [5, 3, 4]
  docs = [rng.normal(size=(n, TINY.sonar_embed_dim)).astype(np.float32) for n in lengths]
  row_len = 14  # 12 concepts + 2 padding
  emb = np.zeros((1, row_len, TINY.sonar_embed_dim), np.float32)
  seg = np.zeros((1, row_len), np.int32)
  pos = np.zeros((1, row_len), np.int32)
  start = 0
  for i, doc in enumerate(docs):
    emb[0, start:start + len(doc)] = doc
    seg[0, start:start + len(doc)] = i + 1
    pos[0, start:start + len(doc)] = np.arange(len(doc))
    start += len(doc)
  emb[0, start:] = 123.0  # garbage in the padding must not leak anywhere
  pred, norm = _apply(model, params, buffers, emb, seg, pos)
  tmask = target_mask_from_segments(jnp.asarray(seg), jnp.asarray(pos))

  start = 0
  total_loss, total_count = 0.0, 0.0
  for i, doc in enumerate(docs):
    n = len(doc)
    a_pred, a_norm = _apply(model, params, buffers, doc[None], np.ones((1, n), np.int32),
                            np.arange(n, dtype=np.int32)[None])
    np.testing.assert_allclose(pred[0, start:start + n], a_pred[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm[0, start:start + n], a_norm[0], rtol=1e-6, atol=1e-6)
    doc_mask = tmask * (jnp.asarray(seg) == i + 1)
    packed_loss, packed_count = mse_loss(pred, norm, doc_mask)
    alone_loss, alone_count = mse_loss(a_pred, a_norm,
                                       target_mask_from_segments(jnp.ones((1, n)),
                                                                 jnp.arange(n)[None]))
    assert float(packed_count) == float(alone_count) == n - 1
    np.testing.assert_allclose(packed_loss, alone_loss, rtol=1e-5)
    total_loss += float(alone_loss)
    total_count += float(alone_count)
    start += n
  # the whole row: the sum over documents, the first concepts and the padding never scored
  row_loss, row_count = mse_loss(pred, norm, tmask)
  assert float(row_count) == total_count == sum(lengths) - len(lengths)
  np.testing.assert_allclose(row_loss, total_loss, rtol=1e-5)
  assert np.isfinite(np.asarray(pred)).all()


def test_scanned_and_unscanned_give_identical_outputs():
  cfg = TINY.replace(num_layers=3)
  scanned, s_params, s_buffers = _init(cfg.replace(scan_layers=True))
  unscanned = BaseLCM(cfg.replace(scan_layers=False))
  state = naming.to_reference(s_params, s_buffers, cfg)
  u_params, u_buffers = naming.from_reference(state, cfg.replace(scan_layers=False))
  assert "layers_2" in u_params["lcm"] and "layers" not in u_params["lcm"]
  rng = np.random.default_rng(3)
  emb = rng.normal(size=(2, 9, cfg.sonar_embed_dim)).astype(np.float32)
  seg = np.array([[1] * 4 + [2] * 5, [1] * 7 + [0] * 2], np.int32)
  pos = np.array([list(range(4)) + list(range(5)), list(range(7)) + [0, 0]], np.int32)
  a = _apply(scanned, s_params, s_buffers, emb, seg, pos)[0]
  b = _apply(unscanned, u_params, u_buffers, emb, seg, pos)[0]
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_layers", [2, 3])
@pytest.mark.parametrize("scan", [True, False])
def test_reference_keys_shapes_and_round_trip(num_layers, scan):
  cfg = TINY.replace(num_layers=num_layers, scan_layers=scan)
  _, params, buffers = _init(cfg)
  state = naming.to_reference(params, buffers, cfg)
  expected = naming.reference_shapes(cfg)
  assert {k: v.shape for k, v in state.items()} == expected
  assert state["lcm.layers.0.self_attn.q_proj.weight"].shape == (cfg.model_dim, cfg.model_dim)
  assert state["lcm.layers.0.ffn.gate_proj.weight"].shape == (cfg.swiglu_inner_dim, cfg.model_dim)
  assert state["frontend.pre_linear.weight"].shape == (cfg.model_dim, cfg.sonar_embed_dim)
  # Linear weights are the transposed kernels
  layer = params["lcm"]["layers"] if scan else params["lcm"]["layers_1"]
  kernel = np.asarray(layer["ffn"]["output_proj"]["kernel"])
  np.testing.assert_array_equal(state["lcm.layers.1.ffn.output_proj.weight"],
                                (kernel[1] if scan else kernel).T)
  back_params, back_buffers = naming.from_reference(state, cfg)
  helpers.assert_trees_bitwise_equal(params, back_params)
  helpers.assert_trees_bitwise_equal(buffers, back_buffers)
  with pytest.raises(ValueError, match="missing"):
    naming.from_reference({k: v for k, v in state.items() if k != "lcm.layer_norm.weight"}, cfg)


def test_param_count_1b6_equals_spec_sum():
  cfg = ModelConfig.from_config(mse_1b6.get_config().model)
  assert (cfg.model_dim, cfg.num_layers, cfg.num_heads, cfg.ffn_inner_dim) == (2048, 32, 16, 8192)
  d, s, f, n = 2048, 1024, 5632, 32
  # written out from the reference checkpoint format (torch Linear weight (out, in) + bias)
  pre = d * s + d
  attn = 4 * (d * d + d)                 # q, k, v, output_proj
  ffn = 2 * (f * d + f) + (d * f + d)    # gate, inner; output
  norms = 2 * d                          # self_attn_layer_norm, ffn_layer_norm
  post = s * d + s
  expected = pre + n * (attn + ffn + norms) + d + post   # + final layer_norm
  print(f"base_lcm_1_6B trainable parameters: {expected:,}")
  assert expected == sum(int(np.prod(v)) for v in naming.reference_shapes(cfg).values()) - 2 * s
  assert families.param_count(cfg) == expected == 1_649_185_792


def test_train_flops_per_concept_convention():
  cfg = ModelConfig.from_config(mse_1b6.get_config("bench").model)
  d, s, f, n, length = 1024, 1024, 2816, 8, 128
  matmul_params = 2 * s * d + n * (4 * d * d + 3 * d * f)
  assert families.matmul_param_count(cfg) == matmul_params
  assert families.train_flops_per_concept(cfg, length) == 6 * matmul_params + 3 * n * 4 * length * d


def test_mse_loss_matches_numpy():
  rng = np.random.default_rng(4)
  pred = rng.normal(size=(2, 6, 5)).astype(np.float32)
  norm = rng.normal(size=(2, 6, 5)).astype(np.float32)
  tmask = np.array([[0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 0]], np.float32)  # col 0 ignored
  want_sum, want_n = 0.0, 0
  for b in range(2):
    for j in range(1, 6):
      if tmask[b, j]:
        want_sum += np.sum((pred[b, j - 1].astype(np.float64) - norm[b, j]) ** 2)
        want_n += 1
  got_sum, got_n = mse_loss(jnp.asarray(pred), jnp.asarray(norm), jnp.asarray(tmask))
  assert got_sum.dtype == jnp.float32
  np.testing.assert_allclose(float(got_sum), want_sum, rtol=1e-6)
  assert float(got_n) == want_n == 6
  # positions that are not scored may hold anything, even inf, without touching the result
  pred_bad = pred.copy()
  pred_bad[0, 2] = np.inf   # would predict position 3, which is not a target
  pred_bad[:, 5] = np.nan   # the last position predicts nothing
  got_sum2, _ = mse_loss(jnp.asarray(pred_bad), jnp.asarray(norm), jnp.asarray(tmask))
  np.testing.assert_allclose(float(got_sum2), want_sum, rtol=1e-6)


def test_normalizer_is_a_frozen_buffer_and_predictions_live_in_normalized_space():
  model, params, buffers = _init(TINY)
  assert "sonar_normalizer" not in params["frontend"]
  assert set(params) == {"frontend", "lcm", "postnet"}
  assert set(params["frontend"]) == {"pre_linear"} and set(params["postnet"]) == {"fc"}
  np.testing.assert_array_equal(buffers["frontend"]["sonar_normalizer"]["center"], 0.0)
  np.testing.assert_array_equal(buffers["frontend"]["sonar_normalizer"]["scale"], 1.0)
  rng = np.random.default_rng(5)
  raw = rng.normal(size=(1, 6, TINY.sonar_embed_dim)).astype(np.float32)
  seg = np.ones((1, 6), np.int32)
  pos = np.arange(6, dtype=np.int32)[None]
  fitted = _random_buffers(TINY)
  center = np.asarray(fitted["frontend"]["sonar_normalizer"]["center"])
  scale = np.asarray(fitted["frontend"]["sonar_normalizer"]["scale"])
  pred, norm = _apply(model, params, fitted, raw, seg, pos)
  np.testing.assert_allclose(norm, (raw - center) / scale, rtol=1e-6, atol=1e-6)
  # same model on pre-normalized inputs with the identity normalizer: identical predictions,
  # i.e. the predictions are in normalized space (never denormalized inside the model)
  pred_id, norm_id = _apply(model, params, buffers, (raw - center) / scale, seg, pos)
  np.testing.assert_allclose(pred, pred_id, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(norm, norm_id, rtol=1e-6, atol=1e-6)
  # and the normalizer does change the outputs for the same raw input
  pred_raw, _ = _apply(model, params, buffers, raw, seg, pos)
  assert np.abs(np.asarray(pred_raw) - np.asarray(pred)).max() > 1e-3
  # buffers get no gradient: they are not an argument of the loss w.r.t. params
  grads = jax.grad(lambda p: mse_loss(*_apply(model, p, fitted, raw, seg, pos),
                                      target_mask_from_segments(jnp.asarray(seg),
                                                                jnp.asarray(pos)))[0])(params)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
  assert pred.dtype == jnp.float32 and pred.shape == raw.shape
