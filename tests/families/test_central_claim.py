"""The paper's comparison of the families, measured on the synthetic branching corpus.

MSE regression (Base-LCM) predicts the probability-weighted MEAN of the possible next concepts, so
it wins raw L2 but, at a branch point, lands between the successors, near none of them. The
diffusion families (Two-Tower, One-Tower) sample ONE plausible successor. Every family of
``lcm_jax.families.REGISTRY`` trains its recipe's tiny variant (``benchmarks/families.py``
:func:`recipe`: its ``RECIPES`` table, else the first ``configs/*.py`` whose tiny variant is of the
family, so a newly registered family joins by itself) for 300 steps on the same corpus
(``lcm_jax.synthetic``: a Markov chain over prototypes with 2-3 successors at branch points), then
predicts every held-out concept teacher-forced and is scored by ``lcm_jax.evaluate.Evaluator``
(diffusion with the paper's sampler: 40 steps, guidance 3, rescale 0.7), next to the
previous-concept and mean-concept baselines. The code is ``benchmarks/families.py``'s
:func:`compare` (``python benchmarks/families.py`` prints the same table and draws
docs/families.png). Compared:

* hit rate at the 1194 held-out targets whose previous concept is a branch point: the
  prediction's nearest prototype (cosine, end-of-text included) is a true successor AND its
  cosine is >= 0.9;
* L2 to the true next concept (at those branch points, and over all 2071 targets), contrastive
  accuracy (candidates: the whole eval batch) and paraphrasing, in raw SONAR space.

Measured when this test was written (training seed 0, 8 fake CPU devices; seed 1 in brackets):

  family      hit rate       branch L2        L2               contrastive accuracy
  Base-LCM    0.060 (0.059)  0.2015 (0.2016)  0.1552 (0.1552)  0.949 (0.949)
  Two-Tower   0.883 (0.882)  0.2455 (0.2344)  0.1879 (0.1817)  0.741 (0.756)
  One-Tower   0.603 (0.604)  0.2813 (0.2758)  0.2182 (0.2156)  0.708 (0.724)
  prev. concept  0.000       0.3675           0.3661           0.494
  mean concept   0.000       0.2559           0.2551           0.501

Paraphrasing is not asserted: it is a mean of ratios over cos(pred, truth), which nears 0 on this
corpus (not one positive cone), so it swings from -15 to +4 between seeds. NOT reproduced here:
the paper's Table 3 has the diffusion families ABOVE Base-LCM in contrastive accuracy; on this
corpus Base-LCM is far above (0.95 vs 0.71-0.76): its mean of the successors is nearer the true
successor than almost every other concept of the batch, while a sample of the wrong successor
(about half of them at a 2-way branch) ranks the truth among the other prototypes. The test
asserts what the paper and this corpus agree on. About 5 minutes on 2 CPU cores (One-Tower
training ~2 of them).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import families as bench
from lcm_jax import families
from lcm_jax import predict

STEPS = 300


@pytest.fixture(name="comparison", scope="module")
def fixture_comparison(tmp_path_factory):
  root = tmp_path_factory.mktemp("claim")
  corpus = bench.make_corpus(str(root / "data"))
  result = bench.compare(corpus, list(families.REGISTRY), str(root / "work"), STEPS)
  print("\n" + bench.summary(result) + "\n" + bench.markdown_table(result))
  return result


def _families(comparison):
  """(regression rows, diffusion rows)."""
  rows = comparison.families
  return [r for r in rows if not r.samples], [r for r in rows if r.samples]


def test_every_registered_family_is_trained_and_scored(comparison):
  assert [r.name for r in comparison.families] == list(families.REGISTRY)
  assert [r.name for r in comparison.baselines] == list(bench.BASELINES)
  for r in comparison.rows.values():
    assert r.branch_targets > 300 and r.targets > 1000, r
    for key in ("hit_rate", "branch_l2", "l2", "contrastive_accuracy", "paraphrasing"):
      assert math.isfinite(getattr(r, key)), (r.name, key)
  regression, diffusion = _families(comparison)
  assert regression and diffusion


def test_diffusion_samples_a_successor_where_regression_predicts_the_mean(comparison):
  # Measured: hit rates 0.88 / 0.60 (diffusion) vs 0.06; L2 ratios regression / diffusion 0.72-0.86
  # (branch points) and 0.71-0.85 (all targets).
  regression, diffusion = _families(comparison)
  for d in diffusion:
    for r in regression:
      assert d.hit_rate > 0.45 and r.hit_rate < 0.3 and d.hit_rate - r.hit_rate > 0.35, (d, r)
      assert r.branch_l2 < 0.95 * d.branch_l2, (d, r)      # regression: lowest L2
      assert r.l2 < 0.92 * d.l2, (d, r)


def test_every_family_beats_the_baselines(comparison):
  # Measured: contrastive accuracy >= 0.708 vs <= 0.501; L2 <= 0.218 vs 0.255 (mean concept) and
  # 0.366 (previous concept); the baselines never hit (0.000).
  base = {r.name: r for r in comparison.baselines}
  assert max(r.hit_rate for r in base.values()) < 0.05
  for r in comparison.families:
    assert r.contrastive_accuracy > max(b.contrastive_accuracy for b in base.values()) + 0.15, r
    assert r.l2 < 0.95 * base["mean_concept"].l2, r
    assert r.l2 < 0.7 * base["previous_concept"].l2, r


def test_one_tower_close_to_two_tower(comparison):
  # Paper Table 3: the two diffusion families are close. Measured: contrastive accuracy 0.708 vs
  # 0.741 (seed 1: 0.724 vs 0.756), L2 ratio 1.16 (1.19). Their hit rates are NOT close after 300
  # steps (0.60 vs 0.88, both seeds): the One-Tower learns the branch points more slowly (after
  # 600 steps: hit rate 0.858, L2 0.190, contrastive accuracy 0.755).
  rows = comparison.rows
  one, two = rows["one_tower_diffusion_lcm"], rows["two_tower_diffusion_lcm"]
  assert abs(one.contrastive_accuracy - two.contrastive_accuracy) < 0.1, (one, two)
  assert 0.8 < one.l2 / two.l2 < 1.3, (one, two)


def test_nearest_prototype_hits_oracle():
  protos = np.eye(4)
  preds = np.array([[1.0, 0.1, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0]])
  hits = predict.nearest_prototype_hits(preds, protos, [np.array([0, 1]), np.array([0, 1]),
                                                        np.array([0, 1])], 0.9)
  np.testing.assert_array_equal(hits, [1.0, 0.0, 0.0])   # hit; too far (cos .71); wrong proto
