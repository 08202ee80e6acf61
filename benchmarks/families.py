r"""The paper's comparison of the model families (its Table 3), measured on the synthetic corpus.

  .venv/bin/python benchmarks/families.py                  # every registered family, 300 steps
  .venv/bin/python benchmarks/families.py --steps=600 --out_png=/tmp/families.png
  .venv/bin/python benchmarks/families.py --families=base_lcm,one_tower_diffusion_lcm \
      --data=data/synthetic_4000

Every family of ``lcm_jax.families.REGISTRY`` (or ``--families``) trains its recipe's ``tiny``
variant (:func:`configs.tiny_recipes`) for ``--steps`` steps on the SAME
synthetic branching corpus (``lcm_jax.synthetic``: a Markov chain over prototypes, 2-3 successors
at branch points; generated into a temporary directory, or ``--data``, created there if missing),
then predicts every held-out concept teacher-forced and is scored by
``lcm_jax.evaluate.Evaluator`` (diffusion families with the paper's sampler: 40 DDIM steps,
guidance 3, rescale 0.7; batch ``i`` seeded ``fold_in(PRNGKey(--seed), i)``):

* hit rate: at the targets whose previous concept is a branch point (and whose true next concept
  is one of its successors), the fraction of predictions whose nearest prototype (cosine,
  end-of-text included) is a true successor with cosine >= 0.9 (a noisy emission of a prototype
  has cosine ~0.97 to it; the mean of two far-apart successors ~0.7);
* branch L2: mean L2 to the true next concept at those branch-point targets;
* L2, contrastive accuracy (candidates: the whole eval batch), paraphrasing: the paper's
  teacher-forced metrics over every target, in raw SONAR space (``lcm_jax.evaluate``).

The two baselines go through the same code: ``previous concept`` (predicts ``x_{j-1}``) and
``mean concept`` (predicts the mean of the evaluated targets). Printed: progress lines, then a
Markdown table (one row per family and baseline, with train steps and seconds); written: a PNG
figure (``--out_png``): L2 (x) vs contrastive accuracy (y) per family and baseline, and the
branch-point hit rates as bars. ``tests/families/test_central_claim.py`` runs the same code
(:func:`compare`) and asserts the paper's orderings on it.

A newly registered family joins by itself: its recipe is the first ``configs/*.py`` whose ``tiny``
variant is of that family. Single process (CPU, or one accelerator host).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Family name -> its recipe module in configs/ (the ``tiny`` variant is trained); a family not
# listed uses the first configs/*.py whose tiny variant is of that family (:func:`recipe`).
BASELINES = {"previous_concept": "previous concept", "mean_concept": "mean concept"}
CORPUS = dict(dim=32, seed=0, num_docs=4000)
"""The synthetic corpus compared on (``lcm_jax.synthetic.generate``'s arguments)."""
HIT_COSINE = 0.9
"""A branch-point prediction hits if its nearest prototype is a true successor at >= this cosine."""
DEFAULT_STEPS = 300


@dataclasses.dataclass
class Row:
  """One family's (or baseline's) scores on the held-out part of the corpus."""

  name: str
  """Family name (``base_lcm``, ...) or baseline name (``previous_concept``, ``mean_concept``)."""
  title: str
  samples: bool
  """A diffusion family (predicts with the sampler)."""
  hit_rate: float
  branch_l2: float
  l2: float
  contrastive_accuracy: float
  paraphrasing: float
  context_cosine: float
  target_cosine: float
  branch_targets: int
  targets: int
  steps: int = 0
  train_seconds: float = 0.0
  score_seconds: float = 0.0

  @property
  def is_baseline(self) -> bool:
    return self.name in BASELINES


@dataclasses.dataclass
class Comparison:
  """:func:`compare`'s result: ``rows`` by name, families first (in order), then the baselines."""

  rows: dict[str, Row]
  steps: int
  corpus: str
  sampler: Any

  @property
  def families(self) -> list[Row]:
    return [r for r in self.rows.values() if not r.is_baseline]

  @property
  def baselines(self) -> list[Row]:
    return [r for r in self.rows.values() if r.is_baseline]


def recipe(family: str) -> Any:
  """The ``configs`` module of ``family``'s recipe (:func:`configs.tiny_recipes`)."""
  from configs import tiny_recipes  # pylint: disable=g-import-not-at-top
  try:
    return tiny_recipes()[family]
  except KeyError:
    raise KeyError(f"family {family!r}: no configs/*.py recipe with a 'tiny' variant of that "
                   "family") from None


def make_corpus(path: str) -> str:
  """Generates the compared corpus (:data:`CORPUS`) at ``path`` unless it is there; returns it."""
  from lcm_jax import synthetic  # pylint: disable=g-import-not-at-top
  synthetic.ensure_corpus(path, **CORPUS)
  return path


def tiny_config(family: str, corpus: str, steps: int, train_seed: Optional[int] = None) -> Any:
  """``family``'s recipe, ``tiny`` variant, on ``corpus`` for ``steps`` steps (cosine decay over
  them, one checkpoint at the end, no periodic eval: :func:`score_family` evaluates);
  ``train_seed``: ``config.seed`` (initialisation, training noise), default the recipe's."""
  c = recipe(family).get_config("tiny")
  if train_seed is not None:
    c.seed = int(train_seed)
  c.data.train = corpus
  c.data.synthetic_corpus = ""
  c.train.num_steps = steps
  c.optimizer.decay_steps = steps
  c.optimizer.warmup_steps = min(int(c.optimizer.warmup_steps), max(steps // 6, 1))
  c.train.eval_every = 0
  c.train.checkpoint_every = steps
  c.train.log_every = steps
  return c


def train_family(config: Any, workdir: str) -> tuple[Any, dict[str, Any]]:
  """Trains ``config`` in ``workdir`` (resuming a finished run is a no-op); returns the
  :class:`lcm_jax.train.Setup` and the final ``{"params", "buffers"}``."""
  from lcm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from lcm_jax import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(config, workdir, None)
  s = train.setup(config)
  ckpt = ckpt_lib.Checkpointer(workdir, create=False, async_save=False)
  try:
    weights = ckpt.restore_weights(None, {"params": s.abstract_state["params"],
                                          "buffers": s.abstract_state["buffers"]})
  finally:
    ckpt.close()
  return s, weights


class _BranchPoints:
  """``Evaluator.run``'s ``on_predictions``: keeps the branch-point targets of every batch."""

  def __init__(self, process: Any):
    self.process = process
    self.preds, self.truths, self.prevs, self.successors = [], [], [], []

  def __call__(self, batch: dict[str, Any], preds: Any) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from lcm_jax import evaluate  # pylint: disable=g-import-not-at-top
    get = lambda x: np.asarray(jax.device_get(x))
    emb, seg, mask, p = (get(batch["embeddings"]).astype(np.float32), get(batch["segment_ids"]),
                         get(batch["target_mask"]), get(preds).astype(np.float32))
    rows, cols = np.nonzero(np.asarray(evaluate.target_positions(seg, mask)))
    prev_id = self.process.nearest(emb[rows, cols - 1])
    next_id = self.process.nearest(emb[rows, cols])
    for k, (r, c) in enumerate(zip(rows, cols)):
      if prev_id[k] >= self.process.num_prototypes:          # end-of-text has no successor
        continue
      ids, _ = self.process.successors_of(int(prev_id[k]))
      if len(ids) < 2 or next_id[k] not in ids:              # branch points, a true successor next
        continue
      self.preds.append(p[r, c])
      self.truths.append(emb[r, c])
      self.prevs.append(emb[r, c - 1])
      self.successors.append(ids)

  def scores(self, predictions: Any) -> tuple[float, float]:
    """``(hit rate, mean L2 to the truth)`` of ``predictions`` (N, S) at the kept targets."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from lcm_jax import predict  # pylint: disable=g-import-not-at-top
    if not self.truths:
      return math.nan, math.nan
    predictions = np.broadcast_to(np.asarray(predictions, np.float32), (len(self.truths),
                                                                        self.process.dim))
    table = np.concatenate([self.process.prototypes, self.process.eot[None]])
    hits = predict.nearest_prototype_hits(predictions, table, self.successors, HIT_COSINE)
    return (float(hits.mean()),
            float(np.linalg.norm(predictions - np.asarray(self.truths), axis=-1).mean()))


def score_family(s: Any, weights: dict[str, Any], corpus: str, sampler: Any,
                 seed: int = 0, batches: int = 0) -> dict[str, Row]:
  """Scores a trained model on the held-out documents of its config's corpus with
  :class:`lcm_jax.evaluate.Evaluator` (baselines included); returns rows by name: the family's
  and the two baselines'."""
  from lcm_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from lcm_jax import evaluate  # pylint: disable=g-import-not-at-top
  from lcm_jax import synthetic  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  config, family = s.config, s.family
  settings = evaluate.EvalSettings(metrics=True, sampler=sampler if family.samples else None,
                                   baselines=True, contrastive_rows=0, seed=seed,
                                   return_predictions=True)
  evaluator = evaluate.Evaluator(s, settings)
  mean, _ = evaluator.target_mean(data_lib.make_eval_iterator(config), batches)
  branch = _BranchPoints(synthetic.load_process(corpus))
  result = evaluator.run(weights["params"], weights["buffers"],
                         data_lib.make_eval_iterator(config), batches, mean=mean,
                         on_predictions=branch)
  candidates = {family.name: (family.title, family.samples, np.asarray(branch.preds)),
                "previous_concept": (BASELINES["previous_concept"], False,
                                     np.asarray(branch.prevs)),
                "mean_concept": (BASELINES["mean_concept"], False, mean[None])}
  rows = {}
  for name, (title, samples, preds) in candidates.items():
    m = result["model" if name == family.name else name]
    hit, branch_l2 = branch.scores(preds)
    rows[name] = Row(name=name, title=title, samples=samples, hit_rate=hit, branch_l2=branch_l2,
                     l2=m["l2"], contrastive_accuracy=m["contrastive_accuracy"],
                     paraphrasing=m["paraphrasing"], context_cosine=m["context_cosine"],
                     target_cosine=m["target_cosine"], branch_targets=len(branch.truths),
                     targets=int(result["num_targets"]))
  return rows


def compare(corpus: str, family_names: Sequence[str], workdir: str, steps: int = DEFAULT_STEPS,
            sampler: Any = None, seed: int = 0, batches: int = 0,
            train_seed: Optional[int] = None,
            log: Optional[Callable[[str], None]] = print) -> Comparison:
  """Trains every family in ``family_names`` on ``corpus`` (its recipe's ``tiny`` variant,
  ``steps`` steps, in ``workdir/<family>``) and scores it (:func:`score_family`; ``sampler``:
  ``lcm_jax.diffusion.SamplerConfig``, default the paper's). The baselines are the first
  family's (every family sees the same held-out batches, so they are the same for all)."""
  from lcm_jax import diffusion  # pylint: disable=g-import-not-at-top
  log = log or (lambda _: None)
  sampler = sampler or diffusion.SamplerConfig()
  rows: dict[str, Row] = {}
  baselines: dict[str, Row] = {}
  for name in family_names:
    config = tiny_config(name, corpus, steps, train_seed)
    log(f"[families] {name}: training {recipe(name).__name__}:tiny for {steps} steps ...")
    t0 = time.perf_counter()
    s, weights = train_family(config, os.path.join(workdir, name))
    t1 = time.perf_counter()
    log(f"[families] {name}: trained in {t1 - t0:.1f} s; scoring ...")
    scored = score_family(s, weights, corpus, sampler, seed, batches)
    t2 = time.perf_counter()
    row = scored[name]
    row.steps, row.train_seconds, row.score_seconds = steps, t1 - t0, t2 - t1
    rows[name] = row
    log(f"[families] {name}: scored {row.targets} targets ({row.branch_targets} at branch points) "
        f"in {t2 - t1:.1f} s: hit rate {row.hit_rate:.3f}, L2 {row.l2:.4f}, contrastive accuracy "
        f"{row.contrastive_accuracy:.4f}")
    for b in BASELINES:
      baselines.setdefault(b, scored[b])
  rows.update(baselines)
  return Comparison(rows=rows, steps=steps, corpus=corpus, sampler=sampler)


def markdown_table(comparison: Comparison) -> str:
  """One row per family, then the baselines; best model value of each metric in bold."""
  head = ("| | hit rate (branch points) | L2 (branch points) | L2 | contrastive accuracy "
          "| paraphrasing | train steps | seconds (train + score) |")
  lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  fams = comparison.families
  best = {}
  for key, better in (("hit_rate", max), ("branch_l2", min), ("l2", min),
                      ("contrastive_accuracy", max)):
    values = [getattr(r, key) for r in fams if math.isfinite(getattr(r, key))]
    best[key] = better(values) if values else None
  for r in comparison.rows.values():
    cells = []
    for key, fmt in (("hit_rate", ".3f"), ("branch_l2", ".4f"), ("l2", ".4f"),
                     ("contrastive_accuracy", ".4f"), ("paraphrasing", ".3f")):
      v = getattr(r, key)
      text = format(v, fmt)
      cells.append(f"**{text}**" if not r.is_baseline and best.get(key) == v else text)
    kind = "baseline" if r.is_baseline else ("diffusion" if r.samples else "regression")
    steps = str(r.steps) if not r.is_baseline else "-"
    secs = (f"{r.train_seconds:.0f} + {r.score_seconds:.0f}" if not r.is_baseline else "-")
    lines.append(f"| {r.title} ({kind}) | " + " | ".join(cells) + f" | {steps} | {secs} |")
  return "\n".join(lines)


def summary(comparison: Comparison) -> str:
  """A line on what was measured (targets, corpus, sampler)."""
  rows = list(comparison.rows.values())
  sm = comparison.sampler
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(comparison.corpus, "manifest.json"), encoding="utf-8") as f:
    manifest = json.load(f)
  return (f"{rows[0].targets} held-out targets ({rows[0].branch_targets} at branch points) of "
          f"the synthetic corpus ({manifest['num_documents']} documents, dim {manifest['dim']}); "
          f"diffusion sampler: {sm.num_steps} DDIM steps, guidance "
          f"{sm.guidance_scale}, rescale {sm.guidance_rescale}")


def plot(comparison: Comparison, path: str) -> str:
  """Writes the figure (PNG): L2 vs contrastive accuracy (left), branch-point hit rate (right)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = list(comparison.rows.values())
  palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
  colors, k = {}, 0
  for r in rows:
    if r.is_baseline:
      colors[r.name] = "#7f7f7f"
    else:
      colors[r.name], k = palette[k % len(palette)], k + 1
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(12.5, 5.0), gridspec_kw={"width_ratios": [1.25, 1]})
  for r in rows:
    marker = ("s" if r.name == "mean_concept" else "^") if r.is_baseline else "o"
    ax.scatter(r.l2, r.contrastive_accuracy, s=110, marker=marker, color=colors[r.name],
               edgecolor="black", linewidth=0.6, zorder=3)
    ax.annotate(r.title, (r.l2, r.contrastive_accuracy), xytext=(8, 6),
                textcoords="offset points", fontsize=10)
  ax.set_xlabel("L2 to the true next concept (lower is better)")
  ax.set_ylabel("contrastive accuracy (higher is better)")
  ax.set_title("Teacher-forced next-concept metrics, all targets")
  ax.grid(alpha=0.3)
  xs = [r.l2 for r in rows]
  span = max(xs) - min(xs) or 1.0
  ax.set_xlim(min(xs) - 0.08 * span, max(xs) + 0.45 * span)
  ys = [r.contrastive_accuracy for r in rows]
  yspan = max(ys) - min(ys) or 1.0
  ax.set_ylim(min(ys) - 0.1 * yspan, max(ys) + 0.15 * yspan)
  names = [r.title for r in rows]
  hits = [r.hit_rate for r in rows]
  bars = bx.barh(range(len(rows)), hits, color=[colors[r.name] for r in rows], edgecolor="black",
                 linewidth=0.6)
  for bar, h in zip(bars, hits):
    bx.text(min(h, 1.0) + 0.01, bar.get_y() + bar.get_height() / 2, f"{h:.2f}", va="center",
            fontsize=10)
  bx.set_yticks(range(len(rows)), names, fontsize=10)
  bx.invert_yaxis()
  bx.set_xlim(0, 1.1)
  bx.set_xlabel(f"hit rate: nearest prototype is a true successor (cos >= {HIT_COSINE})")
  bx.set_title(f"Branch points ({rows[0].branch_targets} targets)")
  bx.grid(axis="x", alpha=0.3)
  fig.suptitle(f"Tiny LCMs, {comparison.steps} training steps each, on the synthetic branching "
               f"corpus", fontsize=12)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--families", default="",
                      help="comma-separated family names (default: every registered family)")
  parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                      help="training steps per family (default %(default)s)")
  parser.add_argument("--data", default="",
                      help="the synthetic corpus directory (generated there if missing; default: "
                      "a temporary directory)")
  parser.add_argument("--workdir", default="",
                      help="training workdirs go to WORKDIR/<family>; a finished run there is "
                      "reused (default: a temporary directory)")
  parser.add_argument("--batches", type=int, default=0,
                      help="held-out batches scored (0 = all, default %(default)s)")
  parser.add_argument("--num_steps", type=int, default=40,
                      help="diffusion families: requested DDIM steps (default %(default)s)")
  parser.add_argument("--guidance_scale", type=float, default=3.0,
                      help="diffusion families: classifier-free guidance (default %(default)s)")
  parser.add_argument("--seed", type=int, default=0,
                      help="sampler seed: batch i uses fold_in(seed, i) (default %(default)s)")
  parser.add_argument("--train_seed", type=int, default=None,
                      help="config.seed of every family's training (initialisation and the "
                      "training noise draws; default: the recipe's)")
  parser.add_argument("--out_png", default="docs/families.png",
                      help="the figure (default %(default)s, relative to the current directory)")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps: expected >= 1, got {args.steps}")
  if args.batches < 0:
    parser.error(f"--batches: expected >= 0, got {args.batches}")

  from lcm_jax import diffusion, families  # pylint: disable=g-import-not-at-top
  names = [n.strip() for n in args.families.split(",") if n.strip()] or list(families.REGISTRY)
  for n in names:
    if n not in families.REGISTRY:
      parser.error(f"--families: unknown family {n!r} (registered: "
                   f"{', '.join(families.REGISTRY)})")
    try:
      recipe(n)
    except KeyError as e:
      parser.error(f"--families: {e.args[0]}")
  sampler = diffusion.SamplerConfig(num_steps=args.num_steps, guidance_scale=args.guidance_scale)
  with tempfile.TemporaryDirectory(prefix="lcm_families_") as tmp:
    corpus = make_corpus(args.data or os.path.join(tmp, "data"))
    t0 = time.perf_counter()
    result = compare(corpus, names, args.workdir or os.path.join(tmp, "work"), args.steps,
                     sampler, args.seed, args.batches, args.train_seed)
    seconds = time.perf_counter() - t0
  print(f"\n{summary(result)}; {seconds:.0f} s in all\n")
  print(markdown_table(result))
  print(f"\n-> {plot(result, args.out_png)}")


if __name__ == "__main__":
  main()
