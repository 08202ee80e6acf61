"""The benchmark scripts: device_check.sh's tiny mode end to end, train_step.py's padding
comparison on tiny shapes, its batching helpers, and the scripts' ``--help``.

Only the config's default attention implementation is used here (device_check.sh sets
``model.attention_impl`` only where the config has that field).
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs the scripts
  env.update(extra)
  return env


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("script", ["train_step.py", "generate.py"])
def test_help_exits_0(script):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--help"],
                       capture_output=True, text=True, timeout=60, env=_env(), check=False)
  assert out.returncode == 0, out.stderr
  assert "--json" in out.stdout
  if script == "train_step.py":
    for flag in ("--compare_padding", "--peak_tflops", "--doc_median", "--pool"):
      assert flag in out.stdout


def test_device_check_tiny_mode(tmp_path):
  report = tmp_path / "check.txt"
  out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_check.sh")],
                       capture_output=True, text=True, timeout=400, cwd=ROOT,
                       env=_env(DEVICE_CHECK_TINY="1", DEVICE_CHECK_REPORT=str(report),
                                DEVICE_CHECK_BUDGET_S="300",  # a loaded CI machine: no skips
                                PYTHON=sys.executable),
                       check=False)
  assert out.returncode == 0, out.stdout + out.stderr
  text = report.read_text()
  assert text in out.stdout  # the report is printed as written
  result = json.loads((tmp_path / "check.json").read_text())
  assert (tmp_path / "check.log").is_file()
  assert result["device"]["backend"] == "cpu" and result["device"]["jax_version"]
  entries = {e["name"]: e for e in result["entries"]}
  assert set(entries) == {"device", "train_base_lcm_xla", "train_base_lcm_cudnn",
                          "train_two_tower_xla", "train_two_tower_cudnn", "generate_base_lcm",
                          "generate_two_tower"}
  assert entries["device"]["status"] == "ok"
  families = {"base_lcm": "base_lcm", "two_tower": "two_tower_diffusion_lcm"}
  for short, family in families.items():
    train = entries[f"train_{short}_xla"]
    assert train["status"] == "ok", train
    f = train["figures"]
    assert f["family"] == family and f["config"].endswith(":tiny")
    assert (f["batch"], f["seq_len"], f["dropout"]) == (4, 32, 0.1)
    for key in ("step_time_s", "concepts_per_s", "real_concepts_per_s", "model_flops_per_s",
                "matmul_flops_per_s", "ratio", "compile_s"):
      assert _positive(f[key]), (short, key, f[key])
    assert f["mfu"] is None and "no peak" in f["peak_source"]  # CPU: no known peak
    cudnn = entries[f"train_{short}_cudnn"]
    assert cudnn["status"] == "skipped" and "GPU" in cudnn["reason"]
    gen = entries[f"generate_{short}"]
    assert gen["status"] == "ok", gen
    g = gen["figures"]
    assert g["family"] == family
    for key in ("concepts_per_s", "ms_per_step", "model_flops_per_s", "matmul_flops_per_s",
                "ratio"):
      assert _positive(g[key]), (short, key, g[key])
  assert _positive(entries["generate_two_tower"]["figures"]["denoiser_evals_per_s"])
  assert "skipped  cudnn needs a GPU" in text
  assert result["wall_s"] <= result["budget_s"] + 15


def test_compare_padding_tiny(tmp_path, capsys):
  # Six documents of 5 concepts: packed two per row of 12 (3 rows, one batch, 1/6 padding);
  # padded, batches of 4 + 2 rows of length 5 (one shape, no padding). Two compiled shapes.
  path = tmp_path / "padding.json"
  result = train_step.main([
      "--compare_padding", "--config=configs/mse_1b6.py:tiny", "--docs=6", "--doc_median=5",
      "--doc_sigma=0", "--rounds=2", "--iters=1", f"--json={path}",
      "--set", "data.global_batch_size=4", "--set", "data.seq_len=12",
      "--set", "data.max_doc_len=12"])
  assert json.loads(path.read_text()) == json.loads(json.dumps(result))
  printed = capsys.readouterr().out
  assert "packed (ours)" in printed and "padded (reference)" in printed
  assert "ratio packed/padded" in printed
  assert (result["concepts"], result["pieces"], result["rows"]) == (30, 6, 4)
  packed, padded = result["packed"], result["padded"]
  assert (packed["batches"], packed["shapes"], packed["lengths"]) == (1, 1, [12])
  assert (padded["batches"], padded["shapes"], padded["lengths"]) == (2, 1, [5])
  assert math.isclose(packed["steps_charged"], 0.75) and math.isclose(padded["steps_charged"], 1.5)
  assert math.isclose(packed["padding_fraction"], 1 / 6) and padded["padding_fraction"] == 0.0
  for r in (packed, padded):
    assert _positive(r["real_concepts_per_s"]) and len(r["sample_times_s"]) == 2
    assert r["real_concepts_per_s_min"] <= r["real_concepts_per_s"] <= r["real_concepts_per_s_max"]
  assert _positive(result["ratio_packed_over_padded"])


def test_batching_strategies_keep_every_concept():
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  config = common.load_config("configs/mse_1b6.py:tiny", ["data.seq_len=16", "data.max_doc_len=16"])
  rng = np.random.default_rng(0)
  lengths = train_step.document_lengths("lognormal", 50, rng, median=6, sigma=1.0, min_len=2,
                                        max_len=100)
  assert lengths.min() >= 2 and lengths.max() <= 100
  synthetic = train_step.document_lengths("synthetic", 50, rng)
  assert synthetic.min() >= 4 and synthetic.max() <= 40
  pieces = train_step.wrap_lengths(lengths, 16)
  assert sum(pieces) == lengths.sum() and max(pieces) <= 16
  assert train_step.wrap_lengths([33, 16, 5], 16) == [16, 16, 1, 16, 5]

  packed = train_step.packed_batches(lengths, config, rows=4)
  padded = train_step.padded_batches(pieces, rows=4)
  for batches in (packed, padded):
    assert sum(b.real for b in batches) == lengths.sum()
    assert all(b.segment_ids.shape[0] == 4 for b in batches)
    for b in batches:  # positions restart per piece; the first concept of a piece is no target
      real = b.segment_ids > 0
      np.testing.assert_array_equal(b.target_mask > 0, real & (b.positions > 0))
  assert all(b.length == 16 for b in packed)
  # Padded: one piece per row, each batch as long as its longest piece, sorted over the sample.
  assert sum(b.rows_used for b in padded) == len(pieces)
  longest = [int((b.segment_ids > 0).sum(axis=1).max()) for b in padded]
  assert longest == [b.length for b in padded] == sorted(longest)
  # Pools: sorted within each pool only.
  pooled = train_step.padded_batches(pieces, rows=4, pool=8)
  assert sum(b.real for b in pooled) == lengths.sum()
  assert len(pooled) == sum(-(-len(pieces[i:i + 8]) // 4) for i in range(0, len(pieces), 8))

  for batches in (packed, padded):
    assert 0.0 <= train_step.padding_fraction(batches, 4) < 1.0
  # Sorted [1, 2, 3, 5] -> (2 rows x 2) + (2 rows x 5) computed for 11 real concepts.
  small = train_step.padded_batches([3, 1, 2, 5], rows=2)
  assert [b.length for b in small] == [2, 5]
  assert math.isclose(train_step.padding_fraction(small, 2), 3 / 14)
  # A partial batch is charged (and counted) by its rows.
  partial = train_step.padded_batches([3, 1, 2], rows=2)
  assert math.isclose(train_step.padding_fraction(partial, 2), 1 / 7)
  assert math.isclose(sum(w for _, w in train_step.timing_plan(partial, 2, False)), 1.5)
  for every in (False, True):
    plan = train_step.timing_plan(padded, 4, every)
    assert math.isclose(sum(w for _, w in plan), sum(b.rows_used / 4 for b in padded))
    assert len(plan) == (len(padded) if every else len({b.length for b in padded}))


def test_profile_reader_finds_and_categorizes_the_ops(tmp_path):
  """profile_step.py's XSpace reader and categories on a real trace of a small jitted function:
  the matmul and the softmax's ops are found by their HLO names and land in their categories."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import profile_step  # pylint: disable=g-import-not-at-top

  def f(x, w):
    with jax.named_scope("dot_product_attention"):
      return jax.nn.softmax(jnp.tanh(x @ w), axis=-1).sum()

  fn = jax.jit(f)
  x = jnp.ones((256, 256), jnp.float32)
  instrs = profile_step.hlo_instructions(fn.lower(x, x).compile().as_text())
  jax.block_until_ready(fn(x, x))
  jax.profiler.start_trace(str(tmp_path))
  for _ in range(3):
    jax.block_until_ready(fn(x, x))
  jax.profiler.stop_trace()
  [path] = [os.path.join(d, n) for d, _, files in os.walk(tmp_path) for n in files
            if n.endswith(".xplane.pb")]
  seen = {}
  for plane in profile_step.read_xspace(path):
    for name, _, duration in plane["events"]:
      if name in instrs:
        seen[name] = seen.get(name, 0) + duration
  categories = {profile_step.categorize(instrs[n], n) for n in seen}
  assert seen and all(d > 0 for d in seen.values())
  assert "matmul" in categories, (seen, categories)
  assert "attention softmax/mask" in categories, (seen, categories)


def test_device_check_refuses_a_python_without_the_data_stack(tmp_path):
  """The preflight names a package the interpreter cannot import, exits 2 and runs nothing."""
  blocker = tmp_path / "block"
  blocker.mkdir()
  (blocker / "grain.py").write_text("raise ImportError('grain is not installed here')\n")
  report = tmp_path / "out" / "device_check.txt"
  r = subprocess.run(["bash", "benchmarks/device_check.sh"], capture_output=True, text=True,
                     timeout=120, cwd=ROOT,
                     env=_env(PYTHON=sys.executable, PYTHONPATH=str(blocker),
                              DEVICE_CHECK_TINY="1", DEVICE_CHECK_REPORT=str(report)))
  assert r.returncode == 2, r.stdout + r.stderr
  assert "cannot import: grain" in r.stderr and "device_wheels.sh" in r.stderr
  assert not report.parent.exists()
