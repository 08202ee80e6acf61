"""Reliability of `python -m lcm_jax.main`: divergence, mistyped inputs, exit statuses.

Every case here failed on the stack before the non-finite guard and the user-error rework: a
diverging run saved NaN checkpoints and called them good, a mistyped dataset path trained on a
synthetic corpus generated there, a restart with another model printed Orbax internals, and bad
flags or config values exited 1 with a traceback. Real subprocesses, real shards and checkpoints.
"""

import json
import os
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mse_1b6
from lcm_jax import errors
from lcm_jax import sharding
from lcm_jax import train
from tests import helpers
from tests.helpers import checkpoint_steps, cli_env, main_cmd, make_corpus, run_cli

DIM = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return make_corpus(str(tmp_path_factory.mktemp("data") / "synthetic"), 300, DIM, 5)


_steps = checkpoint_steps


def _state(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (only these tests)
  with ocp.StandardCheckpointer() as ck:
    return ck.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def _non_finite_leaves(tree):
  return [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.isfinite(x).all()]


def _one_error_line(r, status=2):
  """The run exited with ``status`` and printed exactly one ``error:`` line and no traceback."""
  assert r.returncode == status, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, r.stderr[-3000:]
  return lines[0]


# ---------------------------------------------------------------------------------------------
# Divergence

DIVERGE = ["--config.optimizer.lr=1e6", "--config.train.log_every=20",
           "--config.train.eval_every=0", "--config.train.num_steps=40"]


def test_diverging_run_stops_with_one_line_and_leaves_only_finite_checkpoints(corpus, tmp_path):
  """lr=1e6 blows up within a few steps. Every checkpoint must be finite, the error must name the
  step and the last checkpoint truthfully, and the exit status is 3 (not a traceback)."""
  wd = str(tmp_path / "wd")
  r = run_cli(main_cmd(wd, corpus, *DIVERGE, "--config.train.checkpoint_every=1"))
  line = _one_error_line(r, status=errors.DIVERGED_EXIT)
  assert "training diverged: step" in line, line
  saved = _steps(wd)
  assert saved, "the first steps are finite and were checkpointed"
  for step in saved:
    assert not _non_finite_leaves(_state(wd, step)), f"checkpoint {step} holds NaN/inf"
  bad_step = int(line.split("step ")[1].split()[0])
  assert saved[-1] == bad_step - 1, (saved, line)
  assert os.path.join(wd, "checkpoints", str(saved[-1])) in line, line
  # A restart resumes from that finite checkpoint and diverges again the same way.
  r2 = run_cli(main_cmd(wd, corpus, *DIVERGE, "--config.train.checkpoint_every=1"))
  assert _one_error_line(r2, status=errors.DIVERGED_EXIT) == line


def test_divergence_between_log_steps_is_caught_before_the_next_checkpoint(corpus, tmp_path):
  """The issue's case: checkpoints every 4 steps, logs every 20. The bad step is found at the
  next checkpoint, which is not written."""
  wd = str(tmp_path / "wd")
  r = run_cli(main_cmd(wd, corpus, *DIVERGE, "--config.train.checkpoint_every=4",
                       "--config.optimizer.warmup_steps=8"))
  line = _one_error_line(r, status=errors.DIVERGED_EXIT)
  bad_step = int(line.split("step ")[1].split()[0])
  saved = _steps(wd)
  assert all(s < bad_step for s in saved), (saved, line)
  for step in saved:
    assert not _non_finite_leaves(_state(wd, step))


def test_bounded_skips_then_stop(corpus, tmp_path):
  """max_nonfinite_skips=3: three bad batches are skipped (logged, counted in the metrics), the
  fourth stops the run."""
  wd = str(tmp_path / "wd")
  r = run_cli(main_cmd(wd, corpus, *DIVERGE, "--config.train.checkpoint_every=2",
                       "--config.train.max_nonfinite_skips=3"))
  _one_error_line(r, status=errors.DIVERGED_EXIT)
  assert r.stderr.count("its update was skipped") == 3, r.stderr[-3000:]
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    skips = [m["train/nonfinite_skips"] for m in map(json.loads, f) if "train/nonfinite_skips" in m]
  assert skips == [1, 2, 3]
  for step in _steps(wd):
    assert not _non_finite_leaves(_state(wd, step))


def test_non_finite_step_applies_no_update():
  """In the jitted step: a batch with a NaN embedding leaves params and optimizer state bitwise
  unchanged and reports finite=False; the next finite batch trains as usual."""
  c = helpers.small_train_config(mse_1b6, dropout=0.0)
  s = train.setup(c, devices=jax.devices()[:8])
  state = train.init_state(s, helpers.random_normalizer(c.model.sonar_embed_dim))
  before = jax.device_get(state)
  step = train.make_train_step(s)
  bad = helpers.packed_batch(c, seed=0)
  bad["embeddings"][0, 3, 0] = np.nan
  state, m = step(state, sharding.global_batch_from_local(bad, s.mesh))
  after = jax.device_get(state)
  assert not bool(m["finite"])
  assert int(after["step"]) == int(before["step"]) + 1
  helpers.assert_trees_bitwise_equal(after["params"], before["params"])
  helpers.assert_trees_bitwise_equal(
      [x for x in jax.tree.leaves(after["opt_state"]) if x.dtype == np.float32],
      [x for x in jax.tree.leaves(before["opt_state"]) if x.dtype == np.float32])
  state, m = step(state, sharding.global_batch_from_local(helpers.packed_batch(c, seed=1), s.mesh))
  assert bool(m["finite"])
  after = jax.device_get(state["params"])
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after),
                                                      jax.tree.leaves(before["params"])))


def test_state_with_a_nan_is_never_saved(tmp_path):
  """The check before every save names the non-finite leaf and refuses."""
  c = helpers.small_train_config(mse_1b6, dropout=0.0)
  s = train.setup(c, devices=jax.devices()[:8])
  state = train.init_state(s, helpers.random_normalizer(c.model.sonar_embed_dim))

  class _NoCheckpoints:
    directory = str(tmp_path)

    def wait(self):
      pass

    def latest_step(self):
      return None

  guard = train._NonFiniteGuard(s, _NoCheckpoints(), None, skipped=0)  # pylint: disable=protected-access
  guard.check_state(1, state)  # finite: no error
  leaf_path, leaf = jax.tree_util.tree_flatten_with_path(state["params"])[0][0]
  state["params"] = jax.tree_util.tree_map_with_path(
      lambda p, x: x.at[(0,) * x.ndim].set(jnp.inf) if p == leaf_path else x, state["params"])
  with pytest.raises(train.TrainingDiverged, match="non-finite values in") as e:
    guard.check_state(2, state)
  assert jax.tree_util.keystr(leaf_path) in str(e.value)
  assert "no checkpoint was saved" in str(e.value)
  del leaf


# ---------------------------------------------------------------------------------------------
# Data paths: synthetic data only for the default job

def _tiny(*overrides, workdir):
  return [sys.executable, "-m", "lcm_jax.main", "--config=configs/mse_1b6.py:tiny",
          f"--workdir={workdir}", *overrides]


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "bad_weight"])
def test_a_named_dataset_path_is_never_generated(kind, tmp_path):
  wd = str(tmp_path / "wd")
  if kind == "missing":
    path, spec, named = str(tmp_path / "typo" / "wiki"), str(tmp_path / "typo" / "wiki"), "wiki"
  elif kind == "empty_dir":
    path = str(tmp_path / "empty")
    os.makedirs(path)
    spec, named = path, "empty"
  else:
    path, spec, named = str(tmp_path / "wiki"), str(tmp_path / "wiki") + ":abc", "abc"
  before = sorted(os.listdir(tmp_path))
  r = run_cli(_tiny(f"--config.data.train={spec}", workdir=wd))
  line = _one_error_line(r)
  assert named in line and "config.data.train" in line or "weight" in line, line
  assert sorted(os.listdir(tmp_path)) == before, "nothing may be created"
  if kind == "empty_dir":
    assert os.listdir(path) == []


# ---------------------------------------------------------------------------------------------
# Restarting a workdir with another model

@pytest.fixture(scope="module")
def trained_workdir(corpus, tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("restart") / "wd")
  r = run_cli(main_cmd(wd, corpus, "--config.train.num_steps=2", "--config.train.eval_every=0",
                       "--config.train.checkpoint_every=2", "--config.train.log_every=2"))
  assert r.returncode == 0, r.stderr[-3000:]
  return wd


@pytest.mark.parametrize("overrides,config,expected", [
    (["--config.model.model_dim=128"], "configs/mse_1b6.py:tiny", "model_dim=64 (the config has 128)"),
    (["--config.model.num_layers=3"], "configs/mse_1b6.py:tiny", "num_layers=2 (the config has 3)"),
    ([], "configs/two_tower_1b6.py:tiny", "family='base_lcm' (the config has "
                                          "'two_tower_diffusion_lcm')"),
])
def test_restart_with_another_model_names_the_difference(trained_workdir, corpus, overrides,
                                                         config, expected):
  steps = _steps(trained_workdir)
  r = run_cli(main_cmd(trained_workdir, corpus, "--config.train.num_steps=4", *overrides,
                       config=config))
  line = _one_error_line(r)
  assert expected in line, line
  assert os.path.join(trained_workdir, "checkpoints", "2") in line and "--workdir" in line, line
  assert "Event loop is closed" not in r.stderr and "strict" not in r.stderr
  assert _steps(trained_workdir) == steps


def test_restart_may_change_dropout(trained_workdir, corpus):
  r = run_cli(main_cmd(trained_workdir, corpus, "--config.train.num_steps=3",
                       "--config.train.eval_every=0", "--config.train.checkpoint_every=3",
                       "--config.train.log_every=3", "--config.model.dropout=0.2"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert _steps(trained_workdir)[-1] == 3


# ---------------------------------------------------------------------------------------------
# Flags, config values and the workdir: one line, exit 2

def _readonly_dir(tmp_path):
  """A directory this process cannot write in: root ignores mode bits, so use /proc then."""
  if os.geteuid() == 0:
    return "/proc/self/fdinfo"
  d = tmp_path / "ro"
  d.mkdir()
  d.chmod(stat.S_IRUSR | stat.S_IXUSR)
  return str(d)


@pytest.mark.parametrize("case", ["lr_abc", "unknown_field", "missing_config", "unknown_variant",
                                  "positional", "workdir_is_file", "readonly_workdir",
                                  "negative_steps", "zero_log_every", "bad_b2", "unknown_flag"])
def test_bad_flags_and_config_values(case, corpus, tmp_path):
  wd = str(tmp_path / "wd")
  args = {
      "lr_abc": (["--config.optimizer.lr=abc"], "--config.optimizer.lr=abc"),
      "unknown_field": (["--config.optimizer.lr_peak=1e-3"], "no field 'lr_peak'"),
      "missing_config": (["--config=configs/nope.py"], "configs/nope.py"),
      "unknown_variant": (["--config=configs/mse_1b6.py:huge"], "unknown variant 'huge'"),
      "positional": (["train"], "unexpected arguments ['train']"),
      "workdir_is_file": ([], "is a file"),
      "readonly_workdir": ([], "cannot write in"),
      "negative_steps": (["--config.train.num_steps=-5"], "config.train.num_steps: must be >= 1"),
      "zero_log_every": (["--config.train.log_every=0"], "config.train.log_every"),
      "bad_b2": (["--config.optimizer.b2=1.5"], "config.optimizer.b2"),
      "unknown_flag": (["--num_steps=5"], "num_steps"),
  }[case]
  overrides, expected = args
  if case == "workdir_is_file":
    wd = str(tmp_path / "afile")
    open(wd, "w").close()
  elif case == "readonly_workdir":
    wd = os.path.join(_readonly_dir(tmp_path), "run")
  cmd = [sys.executable, "-m", "lcm_jax.main", "--config=configs/mse_1b6.py:tiny",
         f"--workdir={wd}", f"--config.data.train={corpus}", *overrides]
  before = sorted(os.listdir(tmp_path))
  r = run_cli(cmd)
  line = _one_error_line(r)
  assert expected in line, line
  assert sorted(os.listdir(tmp_path)) == before, "nothing may be created"


@pytest.mark.parametrize("module", ["lcm_jax.main", "lcm_jax.evaluate", "lcm_jax.generate"])
def test_help_exits_zero(module):
  r = run_cli([sys.executable, "-m", module, "--help"])
  assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
  assert "--" in r.stdout + r.stderr


def test_a_bug_keeps_its_traceback():
  """Only the project's own error types become one line; a ValueError from anywhere else is a bug
  and propagates (with its traceback) instead of reading like bad input."""
  def bug(flags):  # pylint: disable=unused-argument
    raise ValueError("an internal invariant broke")

  def bad_input(flags):  # pylint: disable=unused-argument
    raise errors.UserError("--out: /x is a directory")

  assert errors.absl_main(bad_input)(["tool"]) == 2
  with pytest.raises(ValueError, match="internal invariant"):
    errors.absl_main(bug)(["tool"])
  assert not issubclass(FileNotFoundError, errors.USER_ERRORS)


def test_bug_in_a_config_file_keeps_its_traceback(tmp_path):
  cfg = tmp_path / "broken.py"
  cfg.write_text("def get_config():\n  return undefined_name\n")
  r = run_cli([sys.executable, "-m", "lcm_jax.main", f"--config={cfg}", "--mode=describe"])
  assert r.returncode == 1
  assert "Traceback" in r.stderr and "NameError" in r.stderr


def test_default_job_still_generates_its_corpus(tmp_path):
  """The embedded default creates its corpus at the recipe's own path, relative to the cwd."""
  r = subprocess.run([sys.executable, "-m", "lcm_jax.main", "--config.train.num_steps=2",
                      "--config.train.eval_every=0", "--config.train.log_every=2",
                      "--config.train.checkpoint_every=2", "--workdir=wd"],
                     cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.isfile(tmp_path / "data" / "synthetic" / "manifest.json")
  assert _steps(str(tmp_path / "wd")) == [2]


@pytest.mark.parametrize("config,field", [("configs/mse_1b6.py:tiny", "denoiser_num_layers"),
                                          ("configs/one_tower_1b6.py:tiny", "denoiser_num_layers"),
                                          ("configs/mse_1b6.py:tiny", "cfg_dropout")])
def test_a_field_of_another_family_is_one_line(config, field, tmp_path):
  r = run_cli([sys.executable, "-m", "lcm_jax.main", f"--config={config}",
               f"--workdir={tmp_path / 'wd'}", f"--config.model.{field}=3"])
  assert f"no field '{field}'" in _one_error_line(r)
  assert not os.path.exists(tmp_path / "wd")
