"""The train step on a device mesh: sharded == single device, accumulation, mesh errors, resharding.

Tolerances: float32 on CPU. Sharded and single-device steps differ only in the order of float
reductions (all-reduces over 8 devices), so params agree to ~1e-6 relative; we assert 2e-5.
"""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mse_1b6
from lcm_jax import checkpoint as ckpt_lib
from lcm_jax import errors
from lcm_jax import sharding
from lcm_jax import train
from tests import helpers


def _config(mesh=(8, 1, 1), dropout=0.1, accum=1, batch=8):
  return helpers.small_train_config(mse_1b6, mesh=mesh, dropout=dropout, accum=accum, batch=batch)


def test_sharded_step_equals_single_device():
  """(data, fsdp, tensor) = (2, 2, 2) vs one device, with dropout on: same loss and params."""
  single, l1 = helpers.run_steps(_config(mesh=(1, 1, 1)), jax.devices()[:1])
  sharded, l8 = helpers.run_steps(_config(mesh=(2, 2, 2)), jax.devices())
  np.testing.assert_allclose(l1, l8, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(single["params"]), jax.tree.leaves(sharded["params"])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  # The params really moved (not a no-op step) and were sharded over fsdp/tensor.
  s = train.setup(_config(mesh=(2, 2, 2)))
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(s.abstract_state["params"])}
  assert any("tensor" in sp for sp in specs) and any("fsdp" in sp for sp in specs), specs


def test_dropout_is_active_and_deterministic():
  a, la = helpers.run_steps(_config(mesh=(1, 1, 1)), jax.devices()[:1], num_steps=1)
  b, lb = helpers.run_steps(_config(mesh=(1, 1, 1)), jax.devices()[:1], num_steps=1)
  c, lc = helpers.run_steps(_config(mesh=(1, 1, 1), dropout=0.0), jax.devices()[:1], num_steps=1)
  assert la == lb
  assert la != lc  # dropout changes the loss


def test_grad_accumulation_matches_full_batch():
  """Loss weighted by target count: 4 microbatches of uneven target counts == one batch."""
  full, lf = helpers.run_steps(_config(dropout=0.0, accum=1, batch=16), jax.devices())
  acc, la = helpers.run_steps(_config(dropout=0.0, accum=2, batch=16), jax.devices())
  np.testing.assert_allclose(lf, la, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(acc["params"])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_loss_is_mean_over_targets():
  """The reported loss equals a float64 NumPy MSE (sum over dims, mean over targets) at init."""
  c = _config(mesh=(1, 1, 1), dropout=0.0)
  s = train.setup(c, devices=jax.devices()[:1])
  norm = helpers.random_normalizer(c.model.sonar_embed_dim)
  state = train.init_state(s, norm)
  batch = helpers.packed_batch(c)
  variables = {"params": state["params"], "buffers": state["buffers"]}
  preds, _ = s.model.apply(variables, batch["embeddings"], batch["segment_ids"], batch["positions"])
  x = (batch["embeddings"].astype(np.float64) - norm.center) / norm.scale
  err = ((np.asarray(preds, np.float64)[:, :-1] - x[:, 1:]) ** 2).sum(-1)
  m = batch["target_mask"][:, 1:]
  expected = (err * m).sum() / m.sum()
  _, metrics = train.make_train_step(s)(state, sharding.global_batch_from_local(batch, s.mesh))
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)


@pytest.mark.parametrize("mesh,batch,match", [
    ((3, -1, 1), 8, "does not divide the 8 available devices"),
    ((3, 1, 1), 8, "= 3 != 8 available devices"),
    ((2, 2, 3), 8, "!= 8 available devices"),
    ((-1, -1, 1), 8, "at most one axis"),
    ((4, 2, 1), 12, "not divisible by the mesh's data\\*fsdp = 8"),
])
def test_mesh_errors(mesh, batch, match):
  with pytest.raises(sharding.MeshError, match=match):
    train.setup(_config(mesh=mesh, batch=batch))


def test_restore_onto_different_mesh(tmp_path):
  """Save on (8,1,1), restore onto (2,2,2) and onto one device: identical values."""
  c8 = _config(mesh=(8, 1, 1))
  s8 = train.setup(c8)
  state = train.init_state(s8, helpers.random_normalizer(16))
  batch = sharding.global_batch_from_local(helpers.packed_batch(c8), s8.mesh)
  state, _ = train.make_train_step(s8)(state, batch)
  saved = jax.device_get(state)
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=True)
  ck.save(1, state, None, {"note": "test"})
  ck.close()
  for mesh, devices in (((2, 2, 2), jax.devices()), ((1, 1, 1), jax.devices()[:1])):
    s = train.setup(_config(mesh=mesh), devices=devices)
    ck = ckpt_lib.Checkpointer(str(tmp_path), create=False)
    restored, meta = ck.restore(None, s.abstract_state)
    ck.close()
    assert meta == {"note": "test"}
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
      np.testing.assert_array_equal(a, np.asarray(b))
    leaf = jax.tree.leaves(restored["params"])[0]
    assert leaf.sharding.mesh.shape == dict(zip(sharding.MESH_AXES, mesh))


def test_lr_schedule_matches_recipe():
  c = mse_1b6.get_config()
  sched = train.lr_schedule(c.optimizer)
  assert np.isclose(sched(0), 1e-7)
  assert np.isclose(sched(5_000), 1e-7 + 0.5 * (4e-4 - 1e-7), rtol=1e-5)
  assert np.isclose(sched(10_000), 4e-4, rtol=1e-6)
  mid = 10_000 + (250_000 - 10_000) // 2
  assert np.isclose(sched(mid), 1e-5 + 0.5 * (4e-4 - 1e-5), rtol=1e-4)
  assert np.isclose(sched(250_000), 1e-5, rtol=1e-5)
  assert np.isclose(sched(300_000), 1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [
    {"remat_policy": "full"}, {"remat_policy": "dots_saveable"}, {"scan_layers": False},
    {"scan_layers": False, "remat_policy": "dots_with_no_batch_dims_saveable"},
])
def test_remat_and_scan_options_do_not_change_the_step(overrides):
  """Remat policies and unrolled layers compute the same step as the scanned, non-remat default
  (same init seed: unrolled layers are initialised per layer, so compare via reference keys)."""
  from lcm_interop import naming  # pylint: disable=g-import-not-at-top
  base_c = _config(mesh=(1, 1, 1), dropout=0.0)
  c = _config(mesh=(1, 1, 1), dropout=0.0)
  for k, v in overrides.items():
    setattr(c.model, k, v)
  s0, s1 = train.setup(base_c, devices=jax.devices()[:1]), train.setup(c, devices=jax.devices()[:1])
  st0 = train.init_state(s0, helpers.random_normalizer(16))
  st1 = train.init_state(s1, helpers.random_normalizer(16))
  # Same weights in both layouts.
  ref = naming.to_reference(jax.device_get(st0["params"]), jax.device_get(st0["buffers"]), s0.model_cfg)
  p1, _ = naming.from_reference(ref, s1.model_cfg)
  st1["params"] = jax.device_put(p1, s1.state_shardings["params"])
  st1["opt_state"] = s1.tx.init(st1["params"])
  batch = helpers.packed_batch(c)
  n0, m0 = train.make_train_step(s0)(st0, sharding.global_batch_from_local(batch, s0.mesh))
  n1, m1 = train.make_train_step(s1)(st1, sharding.global_batch_from_local(batch, s1.mesh))
  np.testing.assert_allclose(float(m0["loss"]), float(m1["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(m0["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
  r0 = naming.to_reference(jax.device_get(n0["params"]), jax.device_get(n0["buffers"]), s0.model_cfg)
  r1 = naming.to_reference(jax.device_get(n1["params"]), jax.device_get(n1["buffers"]), s1.model_cfg)
  for k in r0:
    np.testing.assert_allclose(r0[k], r1[k], rtol=1e-5, atol=1e-6, err_msg=k)



# ---------------------------------------------------------------------------------------------
# The profiler window (config.train.profile_start_step / profile_num_steps)

_ProfileWindow = train._ProfileWindow  # pylint: disable=protected-access


def _trace_events(xplane_path):
  """(name, {stat: value}) of every event of an exported trace, read back with jax.profiler."""
  data = jax.profiler.ProfileData.from_file(xplane_path)
  return [(e.name, dict(e.stats)) for p in data.planes for line in p.lines for e in line.events]


def _profile_files(profile_dir):
  return glob.glob(os.path.join(profile_dir, "plugins", "profile", "*", "*.xplane.pb"))


def test_profile_window_traces_the_train_steps(tmp_path, caplog):
  """Steps 2-3 of a 5-step run: one xplane.pb in the profile plugin's layout, holding the step
  annotations 2 and 3 (no other step) and the jitted train step's device work (module jit_step)."""
  from lcm_jax import synthetic  # pylint: disable=g-import-not-at-top
  corpus = str(tmp_path / "data")
  synthetic.ensure_corpus(corpus, dim=16, seed=0, num_docs=100)
  c = _config(dropout=0.0)
  c.data.train, c.data.synthetic_corpus, c.data.max_doc_len = corpus, "", 16
  c.train.num_steps = c.train.log_every = c.train.checkpoint_every = 5
  c.train.eval_every = 0
  c.train.async_checkpoint = False
  c.train.profile_start_step, c.train.profile_num_steps = 2, 2
  workdir = str(tmp_path / "wd")
  # absl's logger may have been set above INFO by an earlier test's flag parsing: set it here too.
  with caplog.at_level("INFO"), caplog.at_level("INFO", logger="absl"):
    train.train_and_evaluate(c, workdir)
  profile_dir = os.path.join(workdir, "profile")
  found = _profile_files(profile_dir)
  assert len(found) == 1 and os.path.getsize(found[0]) > 0, found
  assert os.path.basename(os.path.dirname(found[0])).endswith("_step2")
  assert os.listdir(profile_dir) == ["plugins"]  # the staging directory is gone
  events = _trace_events(found[0])
  assert sorted(s["step_num"] for n, s in events if n == "train") == [2, 3]
  assert any(s.get("hlo_module") == "jit_step" for _, s in events)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Profil")]
  assert len(lines) == 2 and all(profile_dir in m for m in lines), lines


def test_profile_window_stops_on_error_and_names_each_process(tmp_path, monkeypatch):
  """An exception inside the window still stops the trace and exports it; with several processes
  every process's file carries its index, in the run directory named with process 0's clock."""
  step = jax.jit(lambda x: jnp.sin(x) @ x)
  x = jnp.ones((8, 8))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(train.multihost_utils, "broadcast_one_to_all", np.asarray)
  for index in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    monkeypatch.setattr(train.time, "time", lambda: 1.7e9 + 0.5)
    with pytest.raises(RuntimeError, match="boom"):
      with _ProfileWindow(str(tmp_path), 4, 3, start=0, total=100) as window:
        window.begin(3)  # not the window's first step: nothing starts
        window.begin(4)
        step(x).block_until_ready()
        raise RuntimeError("boom")
  found = sorted(_profile_files(str(tmp_path)))
  assert [os.path.basename(os.path.dirname(f)) for f in found] == ["2023_11_14_22_13_20_step4"] * 2
  assert [os.path.basename(f).rsplit("_", 1)[1] for f in found] == ["process0.xplane.pb",
                                                                   "process1.xplane.pb"]
  assert all("_process" in name for name in os.listdir(os.path.dirname(found[0])))
  assert os.listdir(tmp_path) == ["plugins"]  # the staging directories are gone
  jax.profiler.start_trace(str(tmp_path / "again"))  # raises if a trace were still running
  jax.profiler.stop_trace()


def test_profile_window_past_the_end_stops_with_the_run(tmp_path):
  x = jnp.ones((4, 4))
  with _ProfileWindow(str(tmp_path), 8, 5, start=0, total=10) as window:
    assert window.last == 9
    window.begin(8)
    window.end(9, x)   # step 8 done: still tracing
    assert not _profile_files(str(tmp_path))
    window.end(10, x)  # the run's last step done: stopped and written
    assert len(_profile_files(str(tmp_path))) == 1


@pytest.mark.parametrize("first,start,total,words", [
    (2, 3, 10, "before the resume step 3"), (10, 0, 10, "at or after config.train.num_steps=10")])
def test_profile_window_outside_the_run_warns(first, start, total, words, tmp_path, caplog):
  window = _ProfileWindow(str(tmp_path), first, 2, start=start, total=total)
  assert not window.enabled
  assert any(words in r.getMessage() and "nothing is traced" in r.getMessage()
             for r in caplog.records if r.levelname == "WARNING")
  window.begin(first)
  assert not os.listdir(tmp_path)


def test_bad_profile_settings_exit_with_a_config_error(tmp_path):
  """The CLI exits 2 with one error line and creates nothing; check_config names each bad field."""
  r = helpers.run_cli(helpers.main_cmd(str(tmp_path / "wd"), str(tmp_path / "data"),
                                       "--config.train.profile_start_step=3",
                                       "--config.train.profile_num_steps=0"))
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
      "error: config.train.profile_num_steps: must be >= 1, got 0")
  assert not os.path.exists(tmp_path / "wd")
  for start, num, match in ((-2, 5, "profile_start_step: must be >= -1, got -2"),
                            (0, -1, "profile_num_steps: must be >= 1, got -1")):
    c = _config()
    c.train.profile_start_step, c.train.profile_num_steps = start, num
    with pytest.raises(errors.ConfigError, match=match):
      train.check_config(c)
  c = _config()
  c.train.profile_num_steps = 0  # checked only when the window is on
  train.check_config(c)
