"""The counter-based dropout mask (lcm_jax.layers.dropout_keep_mask / Dropout).

Oracles: a NumPy uint32 implementation of the documented formula (bit-for-bit), and statistical
bounds (binomial, correlation, chi-square) that a biased or correlated mask would fail.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm_jax import layers


def _numpy_mask(seeds: np.ndarray, size: int, rate: float) -> np.ndarray:
  """The formula of dropout_keep_mask's docstring, in NumPy uint32 arithmetic."""
  def mix(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0x846CA68B)
    return h ^ (h >> np.uint32(16))
  with np.errstate(over="ignore"):
    i = np.arange(size, dtype=np.uint32)
    h = mix(i * np.uint32(0x9E3779B9) + seeds[0])
    h = mix(h ^ seeds[1])
  return h >= np.uint32(round(rate * 2.0 ** 32))


def test_mask_matches_numpy_formula():
  rng = jax.random.PRNGKey(3)
  mask = np.asarray(layers.dropout_keep_mask(rng, (7, 33, 64), 0.1)).reshape(-1)
  seeds = np.asarray(jax.random.bits(rng, (2,), jnp.uint32))
  np.testing.assert_array_equal(mask, _numpy_mask(seeds, mask.size, 0.1))


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5])
def test_keep_rate_and_independence(rate):
  n_rows, n_cols = 512, 1024
  n = n_rows * n_cols
  a = np.asarray(layers.dropout_keep_mask(jax.random.PRNGKey(0), (n_rows, n_cols), rate), np.float64)
  b = np.asarray(layers.dropout_keep_mask(jax.random.PRNGKey(1), (n_rows, n_cols), rate), np.float64)
  p = 1.0 - rate
  sigma = np.sqrt(p * (1 - p) / n)
  for m in (a, b):
    assert abs(m.mean() - p) < 5 * sigma
    # Columns and rows keep at the same rate (chi-square with 1023 / 511 dof, ~6 sigma bound).
    for axis, k in ((0, n_cols), (1, n_rows)):
      counts = m.sum(axis=axis)
      trials = m.shape[axis]
      chi2 = np.sum((counts - trials * p) ** 2 / (trials * p * (1 - p)))
      assert chi2 < k + 6 * np.sqrt(2 * k), (axis, chi2, k)
  flat_a, flat_b = a.reshape(-1), b.reshape(-1)
  corr_bound = 5 / np.sqrt(n)
  assert abs(np.corrcoef(flat_a, flat_b)[0, 1]) < corr_bound        # different keys
  for lag in (1, 2, n_cols):                                          # neighbours, next row
    assert abs(np.corrcoef(flat_a[:-lag], flat_a[lag:])[0, 1]) < corr_bound


def test_dropout_module_scales_and_respects_deterministic():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 128, 64)), jnp.float32)
  module = layers.Dropout(0.25)
  rngs = {"dropout": jax.random.PRNGKey(5)}
  y = module.apply({}, x, False, rngs=rngs)
  ones = np.asarray(module.apply({}, jnp.ones_like(x), False, rngs=rngs))
  keep = ones > 0
  np.testing.assert_allclose(ones[keep], 1 / 0.75, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(y), np.where(keep, np.asarray(x) / 0.75, 0.0), rtol=1e-6)
  assert 0.7 < keep.mean() < 0.8
  np.testing.assert_array_equal(np.asarray(module.apply({}, x, True, rngs=rngs)), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(layers.Dropout(0.0).apply({}, x, False, rngs=rngs)),
                                np.asarray(x))
  # Same key, same mask; another key, another mask.
  np.testing.assert_array_equal(np.asarray(module.apply({}, x, False, rngs=rngs)), np.asarray(y))
  other = module.apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(6)})
  assert not np.array_equal(np.asarray(other), np.asarray(y))
