"""The family conformance suite: every registered model family passes the same checks.

A new family (one file in lcm_jax/families/, a recipe in configs/, a registry line) joins these
tests by itself: its recipe is found by scanning configs/ for a ``:tiny`` variant of that family.
Per-family oracle tests (NumPy references, the reference's key names, parameter counts) stay in
the family's own test file (tests/families/test_base_lcm.py, test_two_tower.py, test_one_tower.py).

Checked for each family, on a tiny model with non-trivial weights:
* build, and init directly sharded on a (data 2, fsdp 2, tensor 2) mesh: every leaf finite,
  the same values as on one device;
* the loss returns finite SUMS, and a document's loss and teacher-forced predictions do not
  depend on another document packed in the same row;
* teacher-forced predictions have the batch's shape and are causal: changing concepts >= j of a
  document leaves the predictions for positions <= j unchanged;
* generation: the concept the KV-cached decoder produces after feeding back k concepts equals the
  one a fresh decoder produces from the prompt extended by those k concepts (full recomputation),
  at every step, with the same random key;
* a training checkpoint saves and restores bitwise;
* ``--mode=describe``'s counts: the parameter count equals the params tree; FLOPs are positive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from lcm_jax import checkpoint as ckpt_lib
from lcm_jax import diffusion
from lcm_jax import families
from lcm_jax import sharding
from lcm_jax import train
from tests import helpers

SAMPLER = diffusion.SamplerConfig(num_steps=4, guidance_scale=2.0, guidance_rescale=0.5)


RECIPES = configs.tiny_recipes()
FAMILY_NAMES = sorted(families.REGISTRY)


def test_every_registered_family_has_a_tiny_recipe():
  assert set(FAMILY_NAMES) <= set(RECIPES), sorted(set(FAMILY_NAMES) - set(RECIPES))


def _config(name, mesh=(1, 1, 1)):
  c = helpers.small_train_config(RECIPES[name], mesh=mesh, dropout=0.0)
  if "num_diffusion_train_steps" in c.model:
    c.model.num_diffusion_train_steps = 20
  return c


@pytest.fixture(name="tiny", scope="module", params=FAMILY_NAMES)
def fixture_tiny(request):
  """(config, Setup, variables with perturbed params and a random normalizer) of one family."""
  c = _config(request.param)
  s = train.setup(c, devices=jax.devices()[:1])
  state = train.init_state(s, helpers.random_normalizer(c.model.sonar_embed_dim))
  variables = helpers.perturbed_variables({"params": state["params"],
                                           "buffers": state["buffers"]}, seed=7)
  return c, s, variables


def test_init_directly_sharded_equals_one_device(tiny):
  c, s1, _ = tiny
  c8 = _config(c.model.family, mesh=(2, 2, 2))
  s8 = train.setup(c8, devices=jax.devices()[:8])
  norm = helpers.random_normalizer(c.model.sonar_embed_dim)
  one = jax.device_get(train.init_state(s1, norm))
  eight = train.init_state(s8, norm)
  sharded = [x for x in jax.tree.leaves(eight["params"]) if len(x.sharding.device_set) == 8
             and not x.sharding.is_fully_replicated]
  assert sharded, "no parameter is sharded over the (2, 2, 2) mesh"
  for leaf in jax.tree.leaves(one):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
  for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(jax.device_get(eight["params"]))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _two_docs(c, other_scale=1.0, seed=0):
  """One row: document A (6 concepts) then document B (7), the rest padding; a second row with
  one document. ``other_scale`` scales document A's embeddings (B never changes)."""
  rng = np.random.default_rng(seed)
  s, l = c.model.sonar_embed_dim, c.data.seq_len
  emb = np.zeros((2, l, s), np.float32)
  seg = np.zeros((2, l), np.int32)
  pos = np.zeros((2, l), np.int32)
  doc_a = rng.standard_normal((6, s)).astype(np.float32)
  doc_b = np.cumsum(rng.standard_normal((7, s)), 0).astype(np.float32) * 0.3
  emb[0, :6], seg[0, :6], pos[0, :6] = other_scale * doc_a, 1, np.arange(6)
  emb[0, 6:13], seg[0, 6:13], pos[0, 6:13] = doc_b, 2, np.arange(7)
  emb[1, :9], seg[1, :9], pos[1, :9] = rng.standard_normal((9, s)), 1, np.arange(9)
  mask = ((seg > 0) & (pos > 0)).astype(np.float32)
  return {"embeddings": emb, "segment_ids": seg, "positions": pos, "target_mask": mask}


def _only(batch, row, segment):
  mask = np.where((np.arange(batch["segment_ids"].shape[0])[:, None] == row)
                  & (batch["segment_ids"] == segment), batch["target_mask"], 0.0)
  return dict(batch, target_mask=mask.astype(np.float32))


def test_loss_sums_are_finite_and_blind_to_other_documents(tiny):
  c, s, variables = tiny
  loss = jax.jit(lambda v, b: s.family.loss(s.model, v, b, rng=None, deterministic=True))
  base = _two_docs(c)
  total, count, extras = loss(variables, base)
  assert np.isfinite(float(total)) and float(count) == float(base["target_mask"].sum())
  assert all(np.isfinite(float(v)) for v in extras.values())
  doc_b = loss(variables, _only(base, 0, 2))
  doc_b_other = loss(variables, _only(_two_docs(c, other_scale=-3.0), 0, 2))
  assert float(doc_b[1]) == 6.0
  np.testing.assert_allclose(float(doc_b[0]), float(doc_b_other[0]), rtol=1e-5)
  # Scoring is additive over targets: the parts add up to the whole.
  parts = sum(float(loss(variables, _only(base, r, g))[0]) for r, g in ((0, 1), (0, 2), (1, 1)))
  np.testing.assert_allclose(parts, float(total), rtol=1e-5)


def test_teacher_forced_shape_alignment_and_causality(tiny):
  c, s, variables = tiny
  tf = jax.jit(lambda v, b, r: s.family.teacher_forced(s.model, v, b, sampler=SAMPLER, rng=r))
  key = jax.random.key(3)
  base = _two_docs(c)
  preds, normalized = tf(variables, base, key)
  assert preds.shape == normalized.shape == base["embeddings"].shape
  assert preds.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(preds)))
  # Changing concepts >= 3 of document B (row 0, positions 6 + 3 ...) keeps predictions <= 3.
  changed = {k: v.copy() for k, v in base.items()}
  changed["embeddings"][0, 9:13] += 5.0
  preds2, _ = tf(variables, changed, key)
  np.testing.assert_allclose(np.asarray(preds2)[0, 6:10], np.asarray(preds)[0, 6:10], atol=1e-5)
  assert np.abs(np.asarray(preds2)[0, 10:13] - np.asarray(preds)[0, 10:13]).max() > 1e-3
  # Another document in the row does not change document B's predictions (column 0 of a
  # document has no context: undefined for Base-LCM, so positions 1.. are compared).
  preds3, _ = tf(variables, _two_docs(c, other_scale=-3.0), key)
  np.testing.assert_allclose(np.asarray(preds3)[0, 7:13], np.asarray(preds)[0, 7:13], atol=1e-5)


def test_cached_generation_equals_full_recomputation_at_every_step(tiny):
  c, s, variables = tiny
  gen_noise = 0.5 if not s.family.samples else 0.0   # Base-LCM: exercise the latent noise too
  decoder = s.family.decoder(s.model, gen_noise, SAMPLER)
  rng = np.random.default_rng(1)
  dim, steps = c.model.sonar_embed_dim, 4
  lengths = np.array([3, 1, 5], np.int32)
  prompts = np.zeros((3, 5, dim), np.float32)
  for b, n in enumerate(lengths):
    prompts[b, :n] = rng.standard_normal((n, dim))
  total = int(lengths.max()) + steps + 1
  start = jax.jit(decoder.start, static_argnums=(3,))
  advance = jax.jit(decoder.advance)
  keys = [jax.random.fold_in(jax.random.key(11), k) for k in range(steps)]
  state, concept = start(variables, jnp.asarray(prompts), jnp.asarray(lengths), total, keys[0])
  generated = [np.asarray(concept)]
  for k in range(1, steps):
    state, concept = advance(variables, state, jnp.asarray(generated[-1]),
                             jnp.asarray(lengths + k - 1), keys[k])
    generated.append(np.asarray(concept))
  for k in range(1, steps):  # a fresh prefill of prompt + the first k generated concepts
    longer = np.zeros((3, 5 + k, dim), np.float32)
    for b, n in enumerate(lengths):
      longer[b, :n] = prompts[b, :n]
      longer[b, n:n + k] = np.stack([g[b] for g in generated[:k]])
    _, again = start(variables, jnp.asarray(longer), jnp.asarray(lengths + k), total, keys[k])
    np.testing.assert_allclose(np.asarray(again), generated[k], rtol=2e-4, atol=2e-4,
                               err_msg=f"step {k}")


def test_checkpoint_save_restore_is_bitwise(tiny, tmp_path):
  c, s, _ = tiny
  state = train.init_state(s, helpers.random_normalizer(c.model.sonar_embed_dim))
  step = train.make_train_step(s)
  state, _ = step(state, sharding.global_batch_from_local(helpers.packed_batch(c), s.mesh))
  before = jax.device_get(state)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, state, None, {"config": c.to_json()}, force=True)
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), create=False, async_save=False)
  restored, _ = ckpt.restore(1, s.abstract_state)
  ckpt.close()
  helpers.assert_trees_bitwise_equal(jax.device_get(restored["params"]), before["params"])
  helpers.assert_trees_bitwise_equal(jax.device_get(restored["buffers"]), before["buffers"])
  assert int(restored["step"]) == 1


def test_describe_counts(tiny):
  c, s, variables = tiny
  cfg = s.model_cfg
  assert families.param_count(cfg) == sum(int(np.prod(x.shape))
                                          for x in jax.tree.leaves(variables["params"]))
  # A concept passes each weight at most twice (the One-Tower: its clean and its noisy copy).
  assert 0 < s.family.matmul_param_count(cfg) <= 2 * families.param_count(cfg)
  assert s.family.train_flops_per_concept(cfg, c.data.seq_len) >= 6 * s.family.matmul_param_count(cfg)
  assert s.family.generation_flops(cfg, 2, 3, 4, 5, 2) > 0
  assert s.family.describe_layers(cfg)


def test_a_foreign_config_field_is_refused():
  """A config of one family with a field only another family reads: one clear error."""
  for name in FAMILY_NAMES:
    c = RECIPES[name].get_config("tiny")
    foreign = sorted(set().union(*(f.fields for f in families.REGISTRY.values()))
                     - families.get(name).fields)
    for field in foreign[:2]:
      values = dict(c.model.to_dict(), **{field: 3})
      with pytest.raises(families.ConfigError, match=f"config.model.{field}: not a field of the "
                                                     f"{name} family"):
        families.model_config(values)
