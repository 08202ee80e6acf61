"""The attention implementations (lcm_jax.attention) against the xla path and a NumPy oracle.

cuDNN and TPUs are not available on CPU, so: the cuDNN argument translation is run through
``jax.nn.dot_product_attention(implementation="xla")`` (the same arguments, JAX's own maths),
splash runs in Pallas interpret mode, and the platform is monkeypatched for the resolver and the
fallbacks. Tolerances: float32, relative ~1e-5.
"""

import functools
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm_jax import attention
from lcm_jax import layers
from lcm_jax.errors import ConfigError
from lcm_jax.models import two_tower
from lcm_jax.models.config import ModelConfig

RTOL, ATOL = 1e-5, 1e-5


def _qkv(seed, batch, q_len, kv_len, heads=2, head_dim=8, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, q_len, heads, head_dim))
  k = rng.normal(size=(batch, kv_len, heads, head_dim))
  v = rng.normal(size=(batch, kv_len, heads, head_dim))
  return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def np_attention(q, k, v, mask):
  """float64 oracle from the definition: softmax(q k^T / sqrt(D)) v over the allowed keys; a row
  with no allowed key is uniform over all keys."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  batch, q_len, heads, head_dim = q.shape
  mask = np.broadcast_to(np.asarray(mask, bool), (batch, heads, q_len, k.shape[1]))
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(heads):
      for i in range(q_len):
        allowed = mask[b, h, i]
        if not allowed.any():  # every logit is the same finite minimum
          out[b, i, h] = v[b, :, h].mean(axis=0)
          continue
        s = k[b, allowed, h] @ q[b, i, h] / np.sqrt(head_dim)
        p = np.exp(s - s.max())
        out[b, i, h] = (p / p.sum()) @ v[b, allowed, h]
  return out


def _value_and_grads(f, weights):
  """jit of ``(q, k, v) -> (f(q, k, v), d sum(f * weights) / d(q, k, v))`` (one compile)."""
  @jax.jit
  def run(q, k, v):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(weights.astype(out.dtype))
  return run


def _packed_segments():
  """Two packed rows: documents of 3, 2, 1 concepts and 2 padding; one full document."""
  return jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)


# ----------------------------------------------------------------------------------------------
# Mask kinds: (name, q_len, kv_len, mask, is_causal, rows compared exactly)

def _mask_cases():
  seg = _packed_segments()
  cases = []
  causal_seg = layers.causal_segment_mask(seg)                                   # (2, 1, 8, 8)
  cases.append(("packed_causal", 8, 8, causal_seg, True, None))
  cases.append(("packed_no_causal_flag", 8, 8, causal_seg, False, None))
  drop = jnp.asarray([[False, False, True, False, False, False, False, False],
                      [False] * 7 + [True]])
  cross = two_tower.cross_attention_mask(seg, drop)                              # (2, 1, 8, 9)
  cases.append(("two_tower_cross", 8, 9, cross, True, None))
  # generation: the denoised rows come after a 5-concept source (shifted: not top-left causal)
  cross_shift = two_tower.cross_attention_mask(jnp.ones((2, 8), jnp.int32),
                                               q_segment_ids=jnp.ones((2, 3), jnp.int32),
                                               shift=jnp.asarray([5, 2]))        # (2, 1, 3, 9)
  cases.append(("two_tower_cross_shifted", 3, 9, cross_shift, False, None))
  cache = layers.cache_mask(jnp.asarray([0, 3]), 2, 7)                           # (2, 1, 2, 7)
  cases.append(("kv_cache_prefill_and_decode", 2, 7, cache, False, None))
  rng = np.random.default_rng(5)
  arbitrary = rng.random((2, 1, 5, 6)) < 0.5
  arbitrary[0, 0, 1] = False                                                      # a padding row
  cases.append(("arbitrary_odd_q", 5, 6, jnp.asarray(arbitrary), False, None))
  arbitrary = rng.random((1, 2, 4, 7)) < 0.5                                      # per-head mask
  arbitrary[0, 1, 2] = False
  valid = arbitrary.any(-1).all(0).all(0)  # padding rows differ (an extra key slot): not compared
  cases.append(("arbitrary_odd_kv", 4, 7, jnp.asarray(arbitrary), False, valid))
  cases.append(("two_tower_no_mask_broadcast", 4, 9, jnp.ones((1, 1, 1, 9), bool), False, None))
  cases.append(("none", 4, 6, None, False, None))
  return cases


CASES = _mask_cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cudnn_arguments_compute_our_attention(case):
  """The arguments handed to cuDNN, run by jax.nn.dot_product_attention's xla implementation,
  equal our xla path: values and gradients, padding rows included (except where noted)."""
  _, q_len, kv_len, mask, is_causal, rows = case
  q, k, v = _qkv(1, 2, q_len, kv_len)
  weights = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
  if rows is not None:
    weights = weights * jnp.asarray(rows, jnp.float32)[None, :, None, None]

  def ours(q, k, v):
    return attention.xla_attention(q, k, v, mask, dtype=jnp.float32)

  def translated(q, k, v):
    call = attention.cudnn_arguments(q, k, v, mask, is_causal=is_causal)
    assert call.kwargs["is_causal"] is is_causal
    if mask is not None:
      assert call.key.shape[1] % 2 == 0 and call.query.shape[1] % 2 == 0
    return call.run("xla")

  (got, g_got), (want, g_want) = (_value_and_grads(f, weights)(q, k, v)
                                  for f in (translated, ours))
  assert got.shape == want.shape and np.isfinite(np.asarray(got)).all()
  sel = slice(None) if rows is None else np.asarray(rows)
  np.testing.assert_allclose(np.asarray(got)[:, sel], np.asarray(want)[:, sel], rtol=RTOL,
                             atol=ATOL)
  for a, b in zip(g_got, g_want):
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)


def test_numpy_oracle_agrees_with_xla_and_cudnn_arguments():
  """An independent float64 oracle for the packed-row mask (padding rows included)."""
  seg = _packed_segments()
  mask = layers.causal_segment_mask(seg)
  q, k, v = _qkv(3, 2, 8, 8)
  want = np_attention(q, k, v, mask)
  ours = jax.jit(lambda q, k, v: attention.xla_attention(q, k, v, mask, dtype=jnp.float32))(
      q, k, v)
  translated = jax.jit(lambda q, k, v: attention.cudnn_arguments(
      q, k, v, mask, is_causal=True).run("xla"))(q, k, v)
  np.testing.assert_allclose(np.asarray(ours), want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.asarray(translated), want, rtol=RTOL, atol=ATOL)


def _pre_refactor_attention(q, k, v, mask, *, dtype):
  """lcm_jax.layers.dot_product_attention as it was before lcm_jax.attention existed (verbatim)."""
  q = q * jnp.asarray(q.shape[-1] ** -0.5, dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dtype), k.astype(dtype),
                      preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, float(jnp.finfo(jnp.float32).min))
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(dtype))


def _pre_refactor_attention_of(mask, dtype):
  return lambda q, k, v: _pre_refactor_attention(q, k, v, mask, dtype=dtype)


def test_layers_dot_product_attention_unchanged():
  """layers.dot_product_attention (default implementation), attention's ``xla`` and ``auto`` on
  CPU are bitwise the pre-refactor function, values and gradients, float32 and bfloat16."""
  mask = layers.causal_segment_mask(_packed_segments())
  fns = [
      lambda q, k, v, dtype: layers.dot_product_attention(q, k, v, mask, dtype=dtype),
      lambda q, k, v, dtype: attention.dot_product_attention(q, k, v, mask, dtype=dtype,
                                                             implementation="auto"),
  ]
  for dtype in (jnp.float32, jnp.bfloat16):
    q, k, v = _qkv(4, 2, 8, 8, dtype=dtype)
    weights = jnp.asarray(np.random.default_rng(5).normal(size=q.shape), dtype)

    @jax.jit
    def run(q, k, v):
      results = []
      for fn in [_pre_refactor_attention_of(mask, dtype)] + [
          functools.partial(f, dtype=dtype) for f in fns]:
        out, vjp = jax.vjp(fn, q, k, v)
        results.append((out, *vjp(weights)))
      return results

    want, *gots = run(q, k, v)
    assert want[0].dtype == dtype
    for got in gots:
      for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  q, k, v = _qkv(4, 2, 8, 8)
  np.testing.assert_allclose(np.asarray(layers.dot_product_attention(q, k, v, mask,
                                                                     dtype=jnp.float32)),
                             np_attention(q, k, v, mask), rtol=RTOL, atol=ATOL)
  assert layers.Attention(8, 2, 4).implementation == "xla"


# ----------------------------------------------------------------------------------------------
# Resolver and config

@pytest.mark.parametrize("platform,auto", [("cpu", "xla"), ("gpu", "cudnn"), ("tpu", "xla")])
def test_resolver_per_platform(monkeypatch, platform, auto):
  monkeypatch.setattr(attention, "_platform", lambda: platform)
  assert attention.resolve_implementation("auto") == auto
  assert attention.resolve_implementation("xla") == "xla"
  for name, home in (("cudnn", "gpu"), ("splash", "tpu")):
    if platform == home:
      assert attention.resolve_implementation(name) == name
    else:
      with pytest.raises(ConfigError, match=rf"'{name}' needs a .*{platform!r}.*'auto'"):
        attention.resolve_implementation(name)
  with pytest.raises(ConfigError, match="not in"):
    attention.resolve_implementation("flash")


def test_explicit_cudnn_on_cpu_is_a_config_error():
  q, k, v = _qkv(0, 1, 4, 4)
  with pytest.raises(ConfigError, match=r"'cudnn' needs a GPU.*'cpu'"):
    attention.dot_product_attention(q, k, v, None, dtype=jnp.float32, implementation="cudnn")


def test_config_field_validated_and_resumable():
  assert ModelConfig().attention_impl == "auto"
  assert ModelConfig(attention_impl="cudnn").attention_impl == "cudnn"
  with pytest.raises(ConfigError, match="attention_impl: 'flash' not in"):
    ModelConfig(attention_impl="flash")
  from lcm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from lcm_jax.families import family  # pylint: disable=g-import-not-at-top
  assert "attention_impl" in family.COMMON_FIELDS
  assert "attention_impl" in checkpoint.RESUMABLE_MODEL_FIELDS


# ----------------------------------------------------------------------------------------------
# Fallbacks

@pytest.fixture
def fresh_log():
  attention._reset_logged_fallbacks()  # pylint: disable=protected-access
  yield
  attention._reset_logged_fallbacks()  # pylint: disable=protected-access


def _warnings(caplog, name):
  return [r for r in caplog.records
          if r.levelno == logging.WARNING and f"attention: {name} cannot run" in r.getMessage()]


def test_cudnn_fallback_logged_once_per_reason(monkeypatch, caplog, fresh_log):
  monkeypatch.setattr(attention, "_platform", lambda: "gpu")
  mask = layers.causal_segment_mask(_packed_segments())
  q, k, v = _qkv(6, 2, 8, 8)
  want = attention.xla_attention(q, k, v, mask, dtype=jnp.float32)
  with caplog.at_level(logging.WARNING):
    for _ in range(2):  # float32: no cuDNN flash attention
      got = attention.dot_product_attention(q, k, v, mask, dtype=jnp.float32,
                                            implementation="cudnn", is_causal=True)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    logged = _warnings(caplog, "cudnn")
    assert len(logged) == 1 and "bfloat16 or float16" in logged[0].getMessage()
    qb, kb, vb = _qkv(6, 2, 8, 8, head_dim=12, dtype=jnp.bfloat16)  # head_dim not % 8
    attention.dot_product_attention(qb, kb, vb, mask, dtype=jnp.bfloat16, implementation="auto")
    qb, kb, vb = _qkv(6, 2, 8, 8, dtype=jnp.bfloat16)  # supported, but no cuDNN in this build
    got = attention.dot_product_attention(qb, kb, vb, mask, dtype=jnp.bfloat16,
                                          implementation="cudnn")
    np.testing.assert_array_equal(
        np.asarray(got, np.float32),
        np.asarray(attention.xla_attention(qb, kb, vb, mask, dtype=jnp.bfloat16), np.float32))
    messages = [r.getMessage() for r in _warnings(caplog, "cudnn")]
  assert len(messages) == 3, messages
  assert "head_dim a multiple of 8" in messages[1] and "got 12" in messages[1]
  assert "cuDNN refused the call" in messages[2]


def test_splash_fallback_without_segment_ids(monkeypatch, caplog, fresh_log):
  monkeypatch.setattr(attention, "_platform", lambda: "tpu")
  mask = layers.causal_segment_mask(_packed_segments())
  q, k, v = _qkv(7, 2, 8, 8)
  with caplog.at_level(logging.WARNING):
    got = attention.dot_product_attention(q, k, v, mask, dtype=jnp.float32,
                                          implementation="splash")
    attention.dot_product_attention(q, k, v, mask, dtype=jnp.float32, implementation="splash",
                                    is_causal=True, segment_ids=_packed_segments())
    messages = [r.getMessage() for r in _warnings(caplog, "splash")]
  np.testing.assert_array_equal(
      np.asarray(got), np.asarray(attention.xla_attention(q, k, v, mask, dtype=jnp.float32)))
  assert len(messages) == 2, messages
  assert "segment ids" in messages[0] and "multiple of 128, got 8" in messages[1]


# ----------------------------------------------------------------------------------------------
# Splash in Pallas interpret mode

def test_splash_matches_xla_in_interpret_mode(monkeypatch, caplog, fresh_log):
  """Packed rows of 128 (documents of 50, 40 and 30 concepts, 8 padding; one full row):
  values and gradients equal xla on every non-padding query; padding rows are finite."""
  seg = np.zeros((2, 128), np.int32)
  seg[0, :50], seg[0, 50:90], seg[0, 90:120] = 1, 2, 3
  seg[1] = 1
  seg = jnp.asarray(seg)
  valid = (seg > 0)[:, :, None, None]
  mask = layers.causal_segment_mask(seg)
  q, k, v = _qkv(8, 2, 128, 128)
  weights = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32) * valid

  monkeypatch.setattr(attention, "_platform", lambda: "tpu")

  def splash(q, k, v):
    return attention.dot_product_attention(q, k, v, mask, dtype=jnp.float32,
                                           implementation="splash", is_causal=True,
                                           segment_ids=seg)

  def xla(q, k, v):
    return attention.xla_attention(q, k, v, mask, dtype=jnp.float32)

  with caplog.at_level(logging.WARNING):
    got, g_got = _value_and_grads(splash, weights)(q, k, v)
  assert not _warnings(caplog, "splash")  # the kernel ran: no fallback
  assert np.isfinite(np.asarray(got)).all()
  want, g_want = _value_and_grads(xla, weights)(q, k, v)
  np.testing.assert_allclose(np.asarray(jnp.where(valid, got, 0)),
                             np.asarray(jnp.where(valid, want, 0)), rtol=RTOL, atol=ATOL)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# Threading through the families

def test_every_family_attention_uses_the_configured_implementation(monkeypatch, caplog,
                                                                   fresh_log):
  """``attention_impl`` reaches every attention call of every family (Base-LCM stack, Two-Tower
  contextualizer and denoiser cross-attention, One-Tower), and changes no parameter."""
  import configs  # pylint: disable=g-import-not-at-top
  from lcm_jax import families  # pylint: disable=g-import-not-at-top
  recipes = configs.tiny_recipes()
  calls = []
  original = attention.dot_product_attention

  def spy(*args, implementation="xla", **kwargs):
    # the module that called layers.dot_product_attention: layers (Attention), two_tower, ...
    site = os.path.basename(sys._getframe(2).f_code.co_filename)  # pylint: disable=protected-access
    calls.append((attention.resolve_implementation(implementation), site))
    return original(*args, implementation=implementation, **kwargs)

  monkeypatch.setattr(attention, "dot_product_attention", spy)
  monkeypatch.setattr(attention, "_platform", lambda: "gpu")
  sites = {"base_lcm": {"layers.py"}, "two_tower_diffusion_lcm": {"layers.py", "two_tower.py"},
           "one_tower_diffusion_lcm": {"one_tower.py"}}
  for name in sorted(families.REGISTRY):
    cfg = families.model_config(recipes[name].get_config("tiny").model)
    cfg = cfg.replace(num_layers=1, denoiser_num_layers=1)
    shapes = {}
    for impl in ("xla", "auto"):  # auto = cudnn on (a patched) GPU; float32 falls back to xla
      calls.clear()
      variables = families.abstract_variables(cfg.replace(attention_impl=impl))
      shapes[impl] = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), variables)
      want = "xla" if impl == "xla" else "cudnn"
      assert set(calls) == {(want, site) for site in sites[name]}, (name, impl, calls)
    assert shapes["xla"] == shapes["auto"], name
  assert "bfloat16 or float16" in " ".join(r.getMessage() for r in _warnings(caplog, "cudnn"))
