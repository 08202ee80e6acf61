"""lcm_jax.evaluate: the metrics against float64 NumPy oracles, trained tiny models against the
previous-concept and mean-concept baselines, the CLI end to end, and bad input.

The oracles are written independently (Python loops over targets and candidates, float64), not as
a copy of the vectorised JAX code. The trained models are the tiny recipes on the synthetic
branching corpus (as tests/families/test_central_claim.py), trained in-process once per module; the
in-training eval (lcm_jax.train) and the CLI share one Evaluator, which one test checks.
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mse_1b6
from configs import two_tower_1b6
from lcm_jax import data as data_lib
from lcm_jax import evaluate as ev
from lcm_jax import schema
from lcm_jax import synthetic
from lcm_jax import train
from tests import helpers
from tests.helpers import run_cli

DIM = 32
BASE_STEPS = 150
TWO_TOWER_STEPS = 200


# ---------------------------------------------------------------------------------------------
# float64 oracle

def _oracle(pred, x, seg, mask, rows=0):
  """Means of the metrics by loops, float64 (definitions: lcm_jax/evaluate.py docstring)."""
  pred, x = np.asarray(pred, np.float64), np.asarray(x, np.float64)
  b, l, _ = x.shape
  rows = b if rows <= 0 else rows
  targets = [(r, j) for r in range(b) for j in range(1, l)
             if mask[r, j] > 0 and seg[r, j] > 0 and seg[r, j - 1] == seg[r, j]]
  cos = lambda u, v: float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
  l2, par, ctx_cos, true_cos, fracs = [], [], [], [], []
  for r, j in targets:
    p = pred[r, j]
    l2.append(float(np.linalg.norm(p - x[r, j])))
    context = [cos(p, x[r, k]) for k in range(j) if seg[r, k] == seg[r, j]]
    ctx_cos.append(max(context))
    true_cos.append(cos(p, x[r, j]))
    par.append(max(context) / cos(p, x[r, j]))
    d_true = np.linalg.norm(p - x[r, j])
    group = range((r // rows) * rows, (r // rows + 1) * rows)
    beaten = total = 0
    for r2 in group:
      for k in range(l):
        if seg[r2, k] == 0 or (r2, k) == (r, j):
          continue
        if r2 == r and seg[r2, k] == seg[r, j] and abs(k - j) == 1:
          continue  # the ground truth's neighbours in its document
        total += 1
        beaten += int(np.linalg.norm(p - x[r2, k]) > d_true)
    if total:
      fracs.append(beaten / total)
  return {"count": len(targets), "l2": np.mean(l2), "paraphrasing": np.mean(par),
          "context_cosine": np.mean(ctx_cos), "target_cosine": np.mean(true_cos),
          "contrastive_accuracy": np.mean(fracs), "contrastive_targets": len(fracs)}


def _jax_metrics(pred, x, seg, mask, rows=0):
  fn = jax.jit(lambda p, e, s, m: ev.metric_sums(p, e, s, m, contrastive_rows=rows))
  sums = {k: float(v) for k, v in fn(jnp.asarray(pred, jnp.float32), jnp.asarray(x, jnp.float32),
                                     jnp.asarray(seg), jnp.asarray(mask)).items()}
  return ev.finalize(sums) | {"count": sums["count"]}


def _random_case(seed):
  """4 rows x 7 concepts: several documents per row, padding, a padding row, and a fine-tuning
  style row whose first concepts are not targets."""
  rng = np.random.default_rng(seed)
  seg = np.array([[1, 1, 1, 2, 2, 0, 0],
                  [1, 1, 1, 1, 1, 1, 1],
                  [1, 2, 2, 2, 3, 3, 0],
                  [0, 0, 0, 0, 0, 0, 0]], np.int32)
  pos = np.zeros_like(seg)
  for r in range(4):
    for j in range(1, 7):
      pos[r, j] = pos[r, j - 1] + 1 if seg[r, j] == seg[r, j - 1] else 0
  mask = ((seg > 0) & (pos > 0)).astype(np.float32)
  mask[1, :4] = 0.0                                   # source concepts of a fine-tuning pair
  x = rng.normal(size=(4, 7, 5)) + 0.5                # not centred: cosines mostly positive
  pred = x + 0.8 * rng.normal(size=x.shape)
  x[3] = 0.0                                          # padding rows are zeros in the pipeline
  return pred, x, seg, mask


@pytest.mark.parametrize("rows", [0, 1, 2])
def test_metrics_match_float64_oracle(rows):
  for seed in range(3):
    pred, x, seg, mask = _random_case(seed)
    ours, want = _jax_metrics(pred, x, seg, mask, rows), _oracle(pred, x, seg, mask, rows)
    assert ours["count"] == want["count"] == 9   # 3 + 3 (the pair's targets) + 3; padding row 0
    assert ours["contrastive_targets"] == want["contrastive_targets"]
    for k in ("l2", "paraphrasing", "context_cosine", "target_cosine", "contrastive_accuracy"):
      np.testing.assert_allclose(ours[k], want[k], rtol=2e-5, err_msg=f"{k} rows={rows}")


def test_contrastive_accuracy_by_hand():
  """One document of 4 concepts on a line (+ padding) and a second row; values worked by hand.

  Row 0: x = (0,1) (1,1) (2,1) (3,1), padding; row 1: (1.8,1.05) (5,5), padding.
  * target (0,1), pred (1.8,1): truth at 0.8; its neighbours x0 (1.8) and x2 (0.2, CLOSER) are
    excluded; x3 at 1.2 is farther. The padding slot holds pred itself (distance 0) and must not
    count. Within its row: 1/1. Whole batch: + (1.8,1.05) at 0.05 (closer) and (5,5) (farther): 2/3.
  * target (0,2), pred (0.5,1): truth at 1.5; neighbours x1, x3 excluded; x0 at 0.5 is closer: 0/1.
    Whole batch: + (1.8,1.05) at 1.3 closer, (5,5) farther: 1/3.
  * target (0,3), pred = truth (3,1): x2 excluded; x0, x1 farther: 2/2. Whole batch: 4/4.
  * target (1,1), pred = truth (5,5): its only row-mate is its neighbour: no candidate within the
    row (skipped); whole batch: the 4 concepts of row 0, all farther: 4/4.
  """
  x = np.zeros((2, 5, 2))
  x[0, :4] = [(0, 1), (1, 1), (2, 1), (3, 1)]
  x[1, :2] = [(1.8, 1.05), (5, 5)]
  pred = np.zeros_like(x)
  pred[0, 1], pred[0, 2], pred[0, 3], pred[0, 4] = (1.8, 1), (0.5, 1), (3, 1), (1.8, 1)
  pred[1, 1] = (5, 5)
  seg = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], np.int32)
  x[0, 4] = (1.8, 1)                                  # a padding slot right at a prediction
  mask = (seg > 0).astype(np.float32)
  mask[:, 0] = 0
  per_row = _jax_metrics(pred, x, seg, mask, rows=1)
  assert per_row["contrastive_targets"] == 3
  np.testing.assert_allclose(per_row["contrastive_accuracy"], (1 + 0 + 1) / 3, rtol=1e-6)
  whole = _jax_metrics(pred, x, seg, mask, rows=0)
  assert whole["contrastive_targets"] == 4
  np.testing.assert_allclose(whole["contrastive_accuracy"], (2 / 3 + 1 / 3 + 1 + 1) / 4, rtol=1e-6)
  np.testing.assert_allclose(whole["l2"], (0.8 + 1.5 + 0 + 0) / 4, rtol=1e-6)


def test_paraphrasing_by_hand():
  """x = (1,0) (0,1) (1,1); pred_2 = (1,0.5): max context cosine 1/sqrt(1.25) (to x0), cosine to
  the truth 1.5/(sqrt(1.25) sqrt(2)); pred_1 = (0,1) = truth: context cosine 0, ratio 0."""
  x = np.array([[(1, 0), (0, 1), (1, 1)]], np.float64)
  pred = np.array([[(0, 0), (0, 1), (1, 0.5)]], np.float64)
  seg = np.ones((1, 3), np.int32)
  mask = np.array([[0, 1, 1]], np.float32)
  got = _jax_metrics(pred, x, seg, mask)
  ratio2 = (1 / math.sqrt(1.25)) / (1.5 / (math.sqrt(1.25) * math.sqrt(2)))
  np.testing.assert_allclose(got["paraphrasing"], (0.0 + ratio2) / 2, rtol=1e-6)
  np.testing.assert_allclose(got["target_cosine"], (1 + 1.5 / math.sqrt(2.5)) / 2, rtol=1e-6)


def test_target_positions():
  seg = np.array([[1, 1, 2, 2, 2, 0], [0, 0, 0, 0, 0, 0]], np.int32)
  mask = np.array([[0, 1, 0, 1, 0, 0], [0] * 6], np.float32)
  got = np.asarray(ev.target_positions(jnp.asarray(seg), jnp.asarray(mask)))
  np.testing.assert_array_equal(got, [[0, 1, 0, 1, 0, 0], [0] * 6])
  # A mask that claims a document's first concept or padding does not make it a target.
  got = np.asarray(ev.target_positions(jnp.asarray(seg), jnp.ones((2, 6), jnp.float32)))
  np.testing.assert_array_equal(got, [[0, 1, 0, 1, 1, 0], [0] * 6])


# ---------------------------------------------------------------------------------------------
# Trained tiny models on the synthetic branching corpus

@pytest.fixture(name="corpus", scope="module")
def fixture_corpus(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("eval") / "data")
  synthetic.ensure_corpus(path, dim=DIM, seed=0, num_docs=3000)
  return path


def _train(recipe, corpus, workdir, steps):
  c = helpers.corpus_train_config(recipe, corpus, steps)
  c.train.async_checkpoint = False
  return c, train.train_and_evaluate(c, workdir, ev.periodic)


@pytest.fixture(name="base_run", scope="module")
def fixture_base_run(corpus, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("eval") / "base")
  c, metrics = _train(mse_1b6, corpus, workdir, BASE_STEPS)
  return workdir, c, metrics


def _baselines(config):
  """Previous-concept and mean-concept baselines over the run's eval set, computed here on the
  host arrays (one device, no mesh): an independent check of the CLI's baseline columns."""
  batches = list(data_lib.make_eval_iterator(config, process_index=0, process_count=1))
  tgt = [np.asarray(ev.target_positions(jnp.asarray(b["segment_ids"]),
                                        jnp.asarray(b["target_mask"]))) for b in batches]
  mean = (sum(b["embeddings"][t].astype(np.float64).sum(0) for b, t in zip(batches, tgt))
          / sum(t.sum() for t in tgt))
  out = {}
  for name, make in (("previous_concept", lambda e: np.asarray(
      ev.previous_concept_predictions(jnp.asarray(e)))),
                     ("mean_concept", lambda e: np.broadcast_to(mean, e.shape))):
    totals = {}
    for b in batches:
      sums = ev.metric_sums(jnp.asarray(make(b["embeddings"]), jnp.float32),
                            jnp.asarray(b["embeddings"]), jnp.asarray(b["segment_ids"]),
                            jnp.asarray(b["target_mask"]), contrastive_rows=0)
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    out[name] = ev.finalize(totals)
  return out


def _eval_cmd(workdir, out, *extra):
  return [sys.executable, "-m", "lcm_jax.evaluate", f"--workdir={workdir}", f"--out={out}", *extra]


def test_base_lcm_beats_baselines_in_training_eval_and_cli(base_run, tmp_path):
  workdir, c, trained = base_run
  # In-training eval: the metric writer got the same numbers train_and_evaluate returned.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [m for m in map(json.loads, f) if "eval/l2" in m]
  assert evals and evals[-1]["step"] == BASE_STEPS
  for k in ("loss", "l2", "contrastive_accuracy", "paraphrasing", "prev_concept_loss"):
    np.testing.assert_allclose(evals[-1][f"eval/{k}"], trained[k], rtol=1e-6)

  out, preds_path = str(tmp_path / "eval.json"), str(tmp_path / "preds.npz")
  r = run_cli(_eval_cmd(workdir, out, f"--save_predictions={preds_path}"))
  assert r.returncode == 0, r.stderr
  print(r.stdout)
  for name in ("model", "previous_concept", "mean_concept", "contrastive_accuracy"):
    assert name in r.stdout
  with open(out) as f:
    rep = json.load(f)
  st = rep["settings"]
  assert (st["family"], st["step"], st["sampler"]) == ("base_lcm", BASE_STEPS, None)
  assert st["global_batch_size"] == 16 and st["contrastive_rows"] == 16
  assert rep["num_targets"] == trained["num_targets"] > 500
  model, prev, mean = (rep["metrics"][k] for k in ("model", "previous_concept", "mean_concept"))
  # Same Evaluator as training's eval (eval_batches covers the whole held-out set here).
  for k in ("l2", "contrastive_accuracy", "paraphrasing", "loss"):
    np.testing.assert_allclose(model[k], trained[k], rtol=1e-6)
  # Baselines against an independent host-side computation.
  want = _baselines(c)
  for name in ("previous_concept", "mean_concept"):
    for k in ("l2", "contrastive_accuracy", "paraphrasing"):
      np.testing.assert_allclose(rep["metrics"][name][k], want[name][k], rtol=1e-4)
  # Measured (seed 0): l2 0.156 vs 0.366 (previous) / 0.255 (mean); contrastive accuracy 0.949
  # vs 0.494 / 0.501.
  assert model["l2"] < 0.8 * min(prev["l2"], mean["l2"]), rep["metrics"]
  assert model["contrastive_accuracy"] > max(prev["contrastive_accuracy"],
                                             mean["contrastive_accuracy"]) + 0.3, rep["metrics"]

  # --save_predictions: one row per target, the reported L2 and mean baseline recomputed.
  with np.load(preds_path) as d:
    p, t, doc, pos = d["predictions"], d["targets"], d["doc_index"], d["position"]
  assert p.shape == t.shape == (rep["num_targets"], DIM) and p.dtype == np.float32
  assert doc.shape == pos.shape == (rep["num_targets"],) and pos.min() >= 1
  np.testing.assert_allclose(np.linalg.norm(p.astype(np.float64) - t, axis=1).mean(), model["l2"],
                             rtol=1e-5)
  m = t.astype(np.float64).mean(0)
  np.testing.assert_allclose(np.linalg.norm(t - m, axis=1).mean(), mean["l2"], rtol=1e-5)
  for d_ in np.unique(doc)[:50]:       # positions 1..n-1 of each document piece, in order
    np.testing.assert_array_equal(pos[doc == d_], np.arange(1, (doc == d_).sum() + 1))


def test_two_tower_sampled_metrics_beat_baselines(corpus, tmp_path):
  workdir = str(tmp_path / "tt")
  c, trained = _train(two_tower_1b6, corpus, workdir, TWO_TOWER_STEPS)
  base = _baselines(c)
  print("two-tower in-training eval (10 DDIM steps):", trained, "baselines:", base)
  for k in ("loss", "unweighted_loss", "l2", "contrastive_accuracy", "paraphrasing"):
    assert np.isfinite(trained[k]), trained
  best_l2 = min(base["previous_concept"]["l2"], base["mean_concept"]["l2"])
  best_ca = max(base["previous_concept"]["contrastive_accuracy"],
                base["mean_concept"]["contrastive_accuracy"])
  assert trained["l2"] < 0.9 * best_l2 and trained["contrastive_accuracy"] > best_ca + 0.15

  # The CLI with the paper's sampler (one batch): the settings are stated in the JSON.
  out = str(tmp_path / "tt.json")
  r = run_cli(_eval_cmd(workdir, out, "--batches=1", "--seed=3"))
  assert r.returncode == 0, r.stderr
  assert "sampler: 40 steps (trailing_reference), guidance 3.0, rescale 0.7" in r.stdout
  with open(out) as f:
    rep = json.load(f)
  assert rep["settings"]["sampler"] == {
      "num_steps": 40, "guidance_scale": 3.0, "guidance_rescale": 0.7, "initial_noise_scale": 0.6,
      "epsilon_scaling": 1.00045, "eta": 0.0, "timestep_spacing": "trailing_reference",
      "clip_noise": 100.0, "clip_sample": False, "clip_sample_range": 1.0,
      "thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 6.0}
  assert rep["settings"]["seed"] == 3 and rep["num_batches"] == 1
  model, mean = rep["metrics"]["model"], rep["metrics"]["mean_concept"]
  assert model["l2"] < 0.9 * mean["l2"], rep["metrics"]
  assert model["contrastive_accuracy"] > mean["contrastive_accuracy"] + 0.15, rep["metrics"]


def _write_docs(path, lengths, dim):
  rng = np.random.default_rng(0)
  docs = [schema.Document(id=f"d{i}", embeddings=rng.normal(size=(n, dim)).astype(np.float32))
          for i, n in enumerate(lengths)]
  entry = schema.write_shard(os.path.join(path, schema.shard_name(0, 1)), docs, dtype="float32")
  schema.write_manifest(path, schema.make_manifest(dim=dim, dtype="float32", shards=[entry],
                                                   producer={"test": True}))
  return path


@pytest.mark.parametrize("kind", ["other_dim", "no_targets", "no_checkpoint"])
def test_cli_bad_input_exits_2(base_run, tmp_path, kind):
  workdir = base_run[0]
  data = str(tmp_path / "data")
  os.makedirs(data)
  extra = []
  if kind == "other_dim":
    _write_docs(data, [3, 4], DIM // 2)
    expected = [os.path.join(data, "manifest.json"), "field 'dim'", f"({DIM})"]
  elif kind == "no_targets":
    _write_docs(data, [1, 1, 1], DIM)
    expected = ["empty eval set", data]
  else:
    _write_docs(data, [3, 4], DIM)
    workdir = str(tmp_path / "nowhere")
    expected = ["--workdir", "no checkpoints"]
  out = tmp_path / "out.json"
  r = run_cli(_eval_cmd(workdir, str(out), f"--data={data}", *extra))
  assert r.returncode == 2, (r.stdout, r.stderr)
  err = r.stderr.strip().splitlines()[-1]
  assert err.startswith("error: ")
  for e in expected:
    assert e in err, err
  assert not out.exists()


def test_cli_bad_output_paths_exit_2_before_any_work(base_run, tmp_path):
  """An --out that is a directory (or under a file), a --save_predictions that is a directory or
  --out itself: one error line and exit 2 before the checkpoint is even read; nothing written.
  (The old tool evaluated everything, then died with a traceback in the write.)"""
  workdir = base_run[0]
  adir, afile, out = tmp_path / "adir", tmp_path / "file", str(tmp_path / "e.json")
  adir.mkdir()
  afile.write_text("x")
  cases = [
      ([f"--out={adir}"], ["--out", str(adir), "is a directory"]),
      ([f"--out={afile / 'eval.json'}"], ["--out", str(afile)]),
      ([f"--out={afile / 'sub' / 'eval.json'}"], ["--out", str(afile), "not a directory"]),
      ([f"--out={out}", f"--save_predictions={adir}"],
       ["--save_predictions", str(adir), "is a directory"]),
      ([f"--out={out}", f"--save_predictions={out}"], ["--save_predictions", "same file"]),
  ]
  for args, expected in cases:
    r = run_cli([sys.executable, "-m", "lcm_jax.evaluate", f"--workdir={workdir}", *args])
    assert r.returncode == 2, (args, r.stdout, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == r.stderr.strip().splitlines()[-1], r.stderr
    for e in expected:
      assert e in errors[0], (args, errors[0])
  assert sorted(os.listdir(tmp_path)) == ["adir", "file"] and not os.listdir(adir)
