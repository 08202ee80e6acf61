r"""Teacher-forced next-concept evaluation, for every model family.

  python -m lcm_jax.evaluate --workdir=W [--step=S] [--data=DIR[:W],...] --out=FILE.json \
      [--batches=N] [--save_predictions=FILE.npz] [Two-Tower sampler flags] [--seed=0]
  python -m lcm_jax.evaluate --help

For every target concept ``j`` (a concept with a predecessor ``j-1`` in its document piece and
``target_mask`` 1: so the first concept of a document is never a target, the final "End of text."
concept is one, and fine-tuning documents score their target concepts only, exactly as the
training loss) the model predicts concept ``j`` from the true concepts ``0..j-1``
(:func:`lcm_jax.predict.teacher_forced`; the Two-Tower samples with DDIM + guidance, settings in
the output). Predictions are denormalized, and every metric is computed in raw SONAR space:

* ``l2``: ``||pred_j - x_j||`` (Euclidean, not squared), the mean over targets;
* ``contrastive_accuracy``: for target ``j`` the CANDIDATES are the concepts of its contrastive
  group (the whole global eval batch, or groups of ``contrastive_rows`` consecutive rows of it)
  other than ``x_j`` itself and its two neighbours in its document (``x_{j-1}`` and ``x_{j+1}``
  where they exist); padding is never a candidate. The score of ``j`` is the FRACTION of
  candidates strictly farther (L2) from ``pred_j`` than ``x_j`` is, and the metric is its mean
  over targets (targets without any candidate are skipped; ``contrastive_targets`` counts the
  rest). This is the paper's "ratio of embeddings in a batch that are further away from the
  prediction than the ground truth", not the stricter "nearer than every candidate" hit rate:
  the ratio degrades gracefully with batch size and duplicate concepts, and is what makes the
  paper's 72-81% figures possible on batches of thousands of concepts.
* ``paraphrasing``: ``max_{k<j} cos(pred_j, x_k) / cos(pred_j, x_j)`` over the context ``x_0..
  x_{j-1}`` of the same document piece, the mean over targets. Near or above 1: the prediction
  is closer in direction to something already said than to the truth (copying the context).
  A mean of ratios, as the paper's definition: heavy-tailed where ``cos(pred_j, x_j)`` nears 0
  (and negative below), which happens in spaces that are not one positive cone (the synthetic
  corpus), rarely in SONAR space. So the two means it is made of are reported too:
  ``context_cosine`` (of the numerator) and ``target_cosine`` (of the denominator).
* ``loss``: the family's own training loss in normalized space (Base-LCM: MSE summed over dims;
  Two-Tower: the diffusion x0 loss with the fixed eval draws), mean over targets.

Two baselines go through the same functions: ``previous_concept`` predicts ``x_{j-1}`` (its
paraphrasing score is ``1 / cos(x_{j-1}, x_j)``: the context holds the prediction itself), and
``mean_concept`` predicts the mean of all evaluated TARGET concepts (a first pass over the same
batches; the best constant predictor for squared L2, so a strong "knows nothing about context"
reference. It uses the eval set itself, which only flatters the baseline).

Metrics reduce as sums and counts over batches; one jitted function computes them on the GLOBAL
batch (sharded over the mesh), so contrastive candidates span every process's rows and all
processes get the same numbers. Training's periodic eval (``lcm_jax.train``) uses the same
:class:`Evaluator` with ``config.train.eval_*`` settings; this CLI adds the baselines, the JSON
and the table.

Output (``--out``, JSON, written atomically): ``{"tool", "settings", "num_targets",
"num_batches", "metrics": {"model": {...}, "previous_concept": {...}, "mean_concept": {...}}}``;
``settings`` holds the workdir, step, family, data, batch shape, contrastive grouping, seed and
the sampler (Two-Tower). A table goes to stdout. ``--save_predictions`` (``.npz``, atomic):
``predictions`` (N, S) float32 denormalized predictions, ``targets`` (N, S) float32 true
concepts, ``doc_index`` (N,) int64 (document pieces numbered in the order the eval pipeline yields
them: global batch, row, segment; a document of <= ``max_doc_len`` concepts is one piece) and
``position`` (N,) int64 (the target's index in its piece), the input of ``python -m
data_prep.eval_text roundtrip``.

User errors (:class:`lcm_jax.errors.UserError`: no checkpoint, a dataset whose manifest ``dim`` is
not the model's ``sonar_embed_dim``, an empty eval set, an ``--out`` or ``--save_predictions``
that is a directory or cannot be written, bad flags) print one ``error: ...`` line and exit 2;
the output paths are checked before anything is read, so a bad one costs no evaluation and
writes nothing. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Iterable, Optional

from absl import flags
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from lcm_jax import checkpoint as ckpt_lib
from lcm_jax import data as data_lib
from lcm_jax import diffusion
from lcm_jax import errors
from lcm_jax import fileio
from lcm_jax import generate
from lcm_jax import normalizer as normalizer_lib
from lcm_jax import schema
from lcm_jax import sharding
from lcm_jax import train
from lcm_jax.decoding import normalizer_buffers

Array = jax.Array

TOOL = "lcm_jax.evaluate"
METRICS = ("l2", "contrastive_accuracy", "paraphrasing")
BASELINES = ("previous_concept", "mean_concept")
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Metric functions (pure, jittable, on global arrays)

def target_positions(segment_ids: Array, target_mask: Array) -> Array:
  """(B, L) bool: concept ``j`` is a target iff ``target_mask > 0``, it is not padding, and the
  concept before it in the row belongs to the same document piece (so ``j >= 1`` in its piece)."""
  seg = segment_ids
  prev_same = jnp.concatenate([jnp.zeros_like(seg[:, :1], bool), seg[:, 1:] == seg[:, :-1]], 1)
  return (target_mask > 0) & (seg > 0) & prev_same


def _unit(x: Array) -> Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def metric_sums(predictions: Array, concepts: Array, segment_ids: Array, target_mask: Array, *,
                contrastive_rows: int = 0) -> dict[str, Array]:
  """Sums and counts of the three metrics over one (global) batch, float32.

  Args:
    predictions: (B, L, S) TARGET-ALIGNED predictions (``predictions[:, j]`` predicts concept
      ``j``) in raw SONAR space; entries at non-targets are ignored.
    concepts: (B, L, S) the true concepts (raw SONAR space), as the batch's ``embeddings``.
    segment_ids: (B, L) int, 1, 2, ... per document piece in a row, 0 = padding.
    target_mask: (B, L), > 0 where the concept may be scored (see :func:`target_positions`).
    contrastive_rows: contrastive candidates come from groups of this many consecutive rows
      (0: the whole batch); must divide B.

  Returns:
    ``count`` (targets), ``l2_sum``, ``paraphrasing_sum``, ``context_cosine_sum`` (of
    ``max_{k<j} cos(pred_j, x_k)``), ``target_cosine_sum`` (of ``cos(pred_j, x_j)``),
    ``contrastive_sum`` (sum of candidate fractions) and ``contrastive_count`` (targets with at
    least one candidate). Definitions in the module docstring.
  """
  pred = predictions.astype(jnp.float32)
  x = concepts.astype(jnp.float32)
  seg = segment_ids
  b, l, s = x.shape
  tgt = target_positions(seg, target_mask)
  real = seg > 0

  l2 = jnp.sqrt(jnp.sum(jnp.square(pred - x), axis=-1))
  l2_sum = jnp.sum(jnp.where(tgt, l2, 0.0))

  # Paraphrasing: cos(pred_j, x_k) for every pair of one row; context = same piece, k < j.
  cos = jnp.einsum("bjs,bks->bjk", _unit(pred), _unit(x), precision=_HIGHEST)
  col = jnp.arange(l)
  ctx = ((seg[:, :, None] == seg[:, None, :]) & real[:, None, :]
         & (col[None, None, :] < col[None, :, None]))
  max_ctx = jnp.max(jnp.where(ctx, cos, -jnp.inf), axis=-1)
  cos_true = jnp.diagonal(cos, axis1=1, axis2=2)
  par = max_ctx / cos_true
  par_sum = jnp.sum(jnp.where(tgt, par, 0.0))
  ctx_cos_sum = jnp.sum(jnp.where(tgt, max_ctx, 0.0))
  true_cos_sum = jnp.sum(jnp.where(tgt, cos_true, 0.0))

  # Contrastive accuracy over groups of rows: squared distances from every prediction to every
  # concept of its group; the truth of prediction i is concept i (target-aligned).
  rows = b if contrastive_rows <= 0 else int(contrastive_rows)
  if b % rows:
    raise ValueError(f"contrastive_rows={rows} does not divide the eval batch of {b} rows")
  g, n = b // rows, rows * l
  pg, xg = pred.reshape(g, n, s), x.reshape(g, n, s)
  d2 = (jnp.sum(pg * pg, -1)[:, :, None] + jnp.sum(xg * xg, -1)[:, None, :]
        - 2.0 * jnp.einsum("gis,gks->gik", pg, xg, precision=_HIGHEST))
  d_true = jnp.diagonal(d2, axis1=1, axis2=2)
  # A document piece is (row, segment); neighbours are adjacent columns of the same piece.
  row_in_group = jnp.broadcast_to((jnp.arange(b) % rows)[:, None], (b, l)).reshape(g, n)
  piece = row_in_group * (l + 1) + seg.reshape(g, n)
  column = jnp.broadcast_to(col[None], (b, l)).reshape(g, n)
  same_piece = piece[:, :, None] == piece[:, None, :]
  neighbour = same_piece & (jnp.abs(column[:, :, None] - column[:, None, :]) == 1)
  idx = jnp.arange(n)
  cand = real.reshape(g, 1, n) & ~neighbour & (idx[None, :, None] != idx[None, None, :])
  n_cand = jnp.sum(cand, axis=-1)
  farther = jnp.sum(cand & (d2 > d_true[:, :, None]), axis=-1)
  valid = tgt.reshape(g, n) & (n_cand > 0)
  frac = farther.astype(jnp.float32) / jnp.maximum(n_cand, 1).astype(jnp.float32)
  return {"count": jnp.sum(tgt.astype(jnp.float32)), "l2_sum": l2_sum, "paraphrasing_sum": par_sum,
          "context_cosine_sum": ctx_cos_sum, "target_cosine_sum": true_cos_sum,
          "contrastive_sum": jnp.sum(jnp.where(valid, frac, 0.0)),
          "contrastive_count": jnp.sum(valid.astype(jnp.float32))}


def finalize(sums: dict[str, float]) -> dict[str, float]:
  """Metric sums (of :func:`metric_sums`, added over batches) -> means."""
  count = sums.get("count", 0.0)
  ca = sums.get("contrastive_count", 0.0)
  nan = float("nan")
  return {"l2": sums["l2_sum"] / count if count else nan,
          "contrastive_accuracy": sums["contrastive_sum"] / ca if ca else nan,
          "paraphrasing": sums["paraphrasing_sum"] / count if count else nan,
          "context_cosine": sums["context_cosine_sum"] / count if count else nan,
          "target_cosine": sums["target_cosine_sum"] / count if count else nan,
          "contrastive_targets": ca}


def previous_concept_predictions(concepts: Array) -> Array:
  """Target-aligned "previous concept" baseline: ``out[:, j] = concepts[:, j-1]``."""
  return jnp.concatenate([jnp.zeros_like(concepts[:, :1]), concepts[:, :-1]], axis=1)


# ----------------------------------------------------------------------------------------------
# The evaluator shared by training's periodic eval and the CLI

@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """What an :class:`Evaluator` computes."""

  metrics: bool = True
  """l2 / contrastive accuracy / paraphrasing (Two-Tower: only with a ``sampler``)."""
  sampler: Optional[diffusion.SamplerConfig] = dataclasses.field(
      default_factory=diffusion.SamplerConfig)
  """Two-Tower DDIM settings for the predictions; None: loss only."""
  baselines: bool = False
  """Also the previous-concept and mean-concept baselines (the CLI)."""
  contrastive_rows: int = 0
  """Contrastive candidates from groups of this many rows of the global batch (0 = all)."""
  seed: int = 0
  """Batch ``i`` samples with ``fold_in(PRNGKey(seed), i)`` (Two-Tower)."""
  return_predictions: bool = False
  """Also return the denormalized predictions (B, L, S), batch-sharded."""


def settings_from_config(config: Any) -> EvalSettings:
  """Training's periodic-eval settings from ``config.train.eval_*`` (absent fields: defaults)."""
  t = config.train
  steps = int(t.get("eval_sampler_steps", 10))
  return EvalSettings(
      metrics=bool(t.get("eval_metrics", True)),
      sampler=diffusion.SamplerConfig(num_steps=steps) if steps > 0 else None,
      contrastive_rows=contrastive_rows_for(config, int(t.get("eval_contrastive_rows", 16))),
      seed=int(config.get("seed", 0)))


def contrastive_rows_for(config: Any, rows: int) -> int:
  """``rows`` if it divides the global batch, 0 (the whole batch) if it is 0 or >= the batch."""
  batch = int(config.data.global_batch_size)
  if rows <= 0 or rows >= batch:
    return 0
  if batch % rows:
    raise errors.UserError(f"contrastive rows ({rows}, config.train.eval_contrastive_rows or "
                           f"--contrastive_rows) must divide config.data.global_batch_size "
                           f"({batch})")
  return rows


class Evaluator:
  """One jitted eval function over global batches, built from a :class:`lcm_jax.train.Setup`.

  ``evaluator(params, buffers, batch, index=0)`` returns the SUMS of one global batch (a dict of
  replicated scalars): ``loss_sum``, ``count`` and the loss's extra ``*_sum`` values (as the
  training loss returns them), and with metrics the :func:`metric_sums` keys prefixed by
  ``model/`` (and ``previous_concept/`` / ``mean_concept/`` with baselines). :meth:`run` iterates
  an eval iterator and returns means.
  """

  def __init__(self, s: Any, settings: EvalSettings = EvalSettings()):
    self.setup, self.settings = s, settings
    cfg = s.model_cfg
    samples = s.family.samples
    sampler = settings.sampler if samples else None
    if samples and sampler is not None:
      sampler.validate(cfg.num_diffusion_train_steps)
    self.sampler = sampler
    self.metrics = settings.metrics and (not samples or sampler is not None)
    loss_fn = s.family.loss
    teacher_forced = s.family.teacher_forced
    rows = settings.contrastive_rows
    baselines = settings.baselines and self.metrics
    with_preds = settings.return_predictions and self.metrics

    def step(params, buffers, batch, rng, mean):
      variables = {"params": params, "buffers": buffers}
      loss_sum, count, aux = loss_fn(s.model, variables, batch, rng=None, deterministic=True)
      out = {"loss_sum": loss_sum, "count": count, **{f"{k}_sum": v for k, v in aux.items()}}
      raw = None
      if self.metrics:
        preds, _ = teacher_forced(s.model, variables, batch, sampler=sampler, rng=rng)
        center, scale = normalizer_buffers(buffers)
        raw = preds * scale + center
        emb, seg, mask = batch["embeddings"], batch["segment_ids"], batch["target_mask"]
        candidates = {"model": raw}
        if baselines:
          candidates["previous_concept"] = previous_concept_predictions(emb)
          candidates["mean_concept"] = jnp.broadcast_to(mean.astype(jnp.float32), emb.shape)
        for name, p in candidates.items():
          sums = metric_sums(p, emb, seg, mask, contrastive_rows=rows)
          out.update({f"{name}/{k}": v for k, v in sums.items()})
      if with_preds:
        return out, raw
      return out

    batch_shardings = sharding.batch_shardings(s.mesh)
    rep = sharding.replicated(s.mesh)
    out_shardings = (rep, sharding.batch_sharding(s.mesh, 3)) if with_preds else rep
    self._step = sharding.jit_under_mesh(
        step, s.mesh, in_shardings=(s.state_shardings["params"], s.state_shardings["buffers"],
                                    batch_shardings, rep, rep), out_shardings=out_shardings)
    self._with_preds = with_preds
    self._dim = cfg.sonar_embed_dim
    self._sharding = sharding

    def target_sum(batch):
      tgt = target_positions(batch["segment_ids"], batch["target_mask"])
      return (jnp.sum(jnp.where(tgt[..., None], batch["embeddings"].astype(jnp.float32), 0.0),
                      axis=(0, 1)), jnp.sum(tgt.astype(jnp.float32)))
    self._target_sum = sharding.jit_under_mesh(target_sum, s.mesh, in_shardings=(batch_shardings,),
                                               out_shardings=rep)

  def _rng(self, index: int) -> Array:
    return jax.random.fold_in(jax.random.PRNGKey(self.settings.seed), index)

  def __call__(self, params: Any, buffers: Any, batch: dict[str, Array], index: int = 0,
               mean: Optional[np.ndarray] = None) -> Any:
    """Sums of one global batch (see the class docstring); ``mean`` is the mean-concept baseline."""
    mean = np.zeros(self._dim, np.float32) if mean is None else np.asarray(mean, np.float32)
    return self._step(params, buffers, batch, self._rng(index), mean)

  def global_batches(self, batches: Iterable[dict[str, np.ndarray]], num_batches: int):
    """Each process's local batches -> global arrays, at most ``num_batches`` (all if <= 0)."""
    for i, batch in enumerate(batches):
      if 0 < num_batches <= i:
        return
      yield i, self._sharding.global_batch_from_local(batch, self.setup.mesh)

  def target_mean(self, batches: Iterable[dict[str, np.ndarray]],
                  num_batches: int) -> tuple[np.ndarray, float]:
    """The mean of every target concept of the batches (float64) and the target count."""
    total, count = np.zeros(self._dim, np.float64), 0.0
    for _, batch in self.global_batches(batches, num_batches):
      sv, c = jax.device_get(self._target_sum(batch))
      total += np.asarray(sv, np.float64)
      count += float(c)
    return (total / count if count else total), count

  def run(self, params: Any, buffers: Any, batches: Iterable[dict[str, np.ndarray]],
          num_batches: int = 0, *, mean: Optional[np.ndarray] = None,
          on_predictions: Any = None) -> dict[str, Any]:
    """Evaluates the local ``batches`` (an eval iterator) and returns means and counts.

    Returns ``{"loss", "num_targets", <loss extras>, "num_batches"}`` plus, with metrics,
    ``"model": {"l2", "contrastive_accuracy", "paraphrasing", "contrastive_targets"}`` and the
    baselines' dicts. ``on_predictions(global_batch, predictions)`` is called per batch when the
    evaluator returns predictions.
    """
    totals: dict[str, float] = {}
    n = 0
    for i, batch in self.global_batches(batches, num_batches):
      out = self(params, buffers, batch, i, mean)
      if self._with_preds:
        out, preds = out
        if on_predictions is not None:
          on_predictions(batch, preds)
      for k, v in jax.device_get(out).items():
        totals[k] = totals.get(k, 0.0) + float(v)
      n += 1
    count = totals.get("count", 0.0)
    result: dict[str, Any] = {"loss": totals["loss_sum"] / count if count else float("nan"),
                              "num_targets": count, "num_batches": n}
    for k, v in totals.items():
      if k.endswith("_sum") and "/" not in k and k != "loss_sum":
        result[k[:-4]] = v / count if count else float("nan")
    for name in ("model",) + BASELINES:
      sums = {k.split("/", 1)[1]: v for k, v in totals.items() if k.startswith(f"{name}/")}
      if sums:
        result[name] = finalize(sums)
    return result


def periodic(s: Any) -> Any:
  """Training's periodic evaluation (``train.train_and_evaluate``'s ``make_evaluator``): an
  :class:`Evaluator` with the ``config.train.eval_*`` settings, as ``evaluate(state,
  num_batches) -> flat metrics`` over up to ``num_batches`` held-out batches (all if <= 0):
  ``loss`` (the training objective), ``num_targets``, the loss extras (e.g.
  ``prev_concept_loss``) and, unless ``config.train.eval_metrics`` is off, ``l2``,
  ``contrastive_accuracy`` and ``paraphrasing`` in raw SONAR space."""
  evaluator = Evaluator(s, settings_from_config(s.config))

  def evaluate(state: dict[str, Any], num_batches: int) -> dict[str, float]:
    result = evaluator.run(state["params"], state["buffers"],
                           data_lib.make_eval_iterator(s.config), num_batches)
    return flat_metrics(result)
  return evaluate


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
  """:meth:`Evaluator.run`'s result as training's flat scalars: ``loss``, ``num_targets``, the
  loss extras and the model's ``l2`` / ``contrastive_accuracy`` / ``paraphrasing``."""
  out = {k: float(v) for k, v in result.items() if not isinstance(v, dict) and k != "num_batches"}
  out.update({k: float(result["model"][k]) for k in METRICS} if "model" in result else {})
  return out


# ----------------------------------------------------------------------------------------------
# CLI

def _define_flags() -> Any:
  f = flags
  f.DEFINE_string("workdir", None, "Training workdir whose checkpoints/ to restore.")
  f.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  f.DEFINE_string("data", None,
                  "Held-out data: a dataset directory or 'DIR[:W],DIR[:W],...' (every document is "
                  "evaluated). Default: the run's own eval set (config.data.eval, else the "
                  "config.data.eval_fraction held out of config.data.train).")
  f.DEFINE_string("out", None, "Output JSON (written atomically): settings and metrics.")
  f.DEFINE_integer("batches", 0, "Evaluate at most this many global batches (0 = all).")
  f.DEFINE_integer("batch_size", None,
                   "Rows per global eval batch (default: the run's config.data.global_batch_size). "
                   "Contrastive candidates come from the batch, so it is part of the result.")
  f.DEFINE_integer("contrastive_rows", 0,
                   "Contrastive-accuracy candidates from groups of this many consecutive rows of "
                   "the global batch (0 = the whole batch).")
  f.DEFINE_string("save_predictions", None,
                  "Optional .npz: predictions (N, S) and targets (N, S) float32 in raw SONAR "
                  "space, doc_index (N,) and position (N,) (input of data_prep.eval_text "
                  "roundtrip).")
  generate.define_sampler_flags()
  f.DEFINE_integer("seed", 0,
                   "PRNG seed of the Two-Tower's sampler (batch i uses fold_in(seed, i)).")
  return f.FLAGS


def _setup_for_eval(config: Any):
  """``train.setup`` on this machine's devices, on :func:`lcm_jax.checkpoint.mesh_for`'s mesh."""
  ckpt_lib.mesh_for(config, check_batch=True)
  return train.setup(config)


class _PredictionSink:
  """Collects target predictions (process 0 writes them): rows of global batches in order."""

  def __init__(self):
    self.preds, self.targets, self.doc, self.pos = [], [], [], []
    self._pieces = 0

  def __call__(self, batch: dict[str, Array], preds: Array) -> None:
    if jax.process_count() > 1:
      get = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    else:
      get = lambda x: np.asarray(jax.device_get(x))
    emb, seg = get(batch["embeddings"]), get(batch["segment_ids"])
    mask, pos, p = get(batch["target_mask"]), get(batch["positions"]), get(preds)
    tgt = np.asarray(target_positions(jnp.asarray(seg), jnp.asarray(mask)))
    # Number the pieces (row, segment) in order; segment ids within a row are 1, 2, ...
    piece = np.zeros(seg.shape, np.int64)
    for r in range(seg.shape[0]):
      k = int(seg[r].max())
      piece[r] = self._pieces + seg[r] - 1
      self._pieces += k
    rows, cols = np.nonzero(tgt)
    self.preds.append(p[rows, cols].astype(np.float32))
    self.targets.append(emb[rows, cols].astype(np.float32))
    self.doc.append(piece[rows, cols])
    self.pos.append(pos[rows, cols].astype(np.int64))

  def arrays(self, dim: int) -> dict[str, np.ndarray]:
    cat = lambda xs, shape, dt: np.concatenate(xs) if xs else np.zeros(shape, dt)
    return {"predictions": cat(self.preds, (0, dim), np.float32),
            "targets": cat(self.targets, (0, dim), np.float32),
            "doc_index": cat(self.doc, (0,), np.int64), "position": cat(self.pos, (0,), np.int64)}


def run_cli(fv: Any) -> dict[str, Any]:
  """Everything the CLI does after flag parsing; returns the JSON report. Raises user errors."""
  for name in ("workdir", "out"):
    if not fv[name].value:
      raise errors.UserError(f"--{name} is required")
  # The outputs first: a bad path must not cost a whole evaluation (nor leave anything behind).
  fileio.check_output_path(fv.out, "--out")
  if fv.save_predictions:
    fileio.check_output_path(fv.save_predictions, "--save_predictions")
    if os.path.abspath(fv.save_predictions) == os.path.abspath(fv.out):
      raise errors.UserError(f"--save_predictions {fv.save_predictions}: the same file as --out")
  if fv.batches < 0:
    raise errors.UserError(f"--batches: expected >= 0, got {fv.batches}")
  step = ckpt_lib.checkpoint_step(fv.workdir, fv.step)
  config = ckpt_lib.load_config(fv.workdir, step)
  config.data.worker_count = 0
  if fv.batch_size is not None:
    if fv.batch_size < 1:
      raise errors.UserError(f"--batch_size: expected >= 1, got {fv.batch_size}")
    config.data.global_batch_size = int(fv.batch_size)
  config.optimizer.grad_accum_steps = 1
  if fv.data:
    entries = data_lib.parse_dataset_spec(fv.data)
    if not entries:
      raise errors.UserError(f"--data: no dataset in {fv.data!r}")
    config.data.eval = fv.data
    data_desc = fv.data
  elif config.data.eval:
    data_desc = str(config.data.eval)
  else:
    data_desc = (f"held out of config.data.train={config.data.train} "
                 f"(config.data.eval_fraction={config.data.eval_fraction})")
  s = _setup_for_eval(config)
  family = s.model_cfg.family
  samples = s.family.samples
  sampler = generate.sampler_from_flags(
      fv, s.model_cfg.num_diffusion_train_steps if samples else None)
  if fv.contrastive_rows < 0:
    raise errors.UserError(f"--contrastive_rows: expected >= 0, got {fv.contrastive_rows}")
  rows = contrastive_rows_for(config, fv.contrastive_rows)
  settings = EvalSettings(metrics=True, sampler=sampler if samples else None, baselines=True,
                          contrastive_rows=rows, seed=fv.seed,
                          return_predictions=bool(fv.save_predictions))
  # Validates the data before the (slower) restore: dims against the model, an empty eval set.
  data_lib.make_eval_iterator(config)
  t0 = time.time()
  ckpt = ckpt_lib.Checkpointer(fv.workdir, create=False, async_save=False)
  try:
    weights = ckpt.restore_weights(step, {"params": s.abstract_state["params"],
                                          "buffers": s.abstract_state["buffers"]})
  finally:
    ckpt.close()
  evaluator = Evaluator(s, settings)
  mean, count = evaluator.target_mean(data_lib.make_eval_iterator(config), fv.batches)
  if count == 0:
    raise schema.ShardFormatError(
        f"empty eval set: {data_desc} holds no next-concept target (every document has a single "
        "concept)")
  sink = _PredictionSink() if fv.save_predictions else None
  result = evaluator.run(weights["params"], weights["buffers"], data_lib.make_eval_iterator(config),
                         fv.batches, mean=mean, on_predictions=sink)
  metrics = {name: result[name] for name in ("model",) + BASELINES}
  metrics["model"] = dict(metrics["model"], loss=result["loss"],
                          **{k: v for k, v in result.items()
                             if k not in ("loss", "num_targets", "num_batches")
                             and not isinstance(v, dict)})
  report = {
      "tool": TOOL,
      "settings": {
          "workdir": os.path.abspath(fv.workdir), "step": step, "family": family,
          "data": data_desc, "global_batch_size": int(config.data.global_batch_size),
          "seq_len": int(config.data.seq_len), "max_doc_len": int(config.data.max_doc_len),
          "batches": fv.batches, "contrastive_rows": rows or int(config.data.global_batch_size),
          "seed": fv.seed, "space": "raw SONAR (denormalized)",
          "sampler": dataclasses.asdict(sampler) if samples else None,
          "mean_concept": "mean of the evaluated target concepts",
      },
      "num_targets": int(result["num_targets"]),
      "num_batches": int(result["num_batches"]),
      "metrics": metrics,
      "seconds": round(time.time() - t0, 3),
  }
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(fv.out)), exist_ok=True)
    text = json.dumps(_jsonable(report), indent=2) + "\n"
    schema.write_file_atomic(fv.out, lambda f: f.write(text), suffix=".json")
    if sink is not None:
      os.makedirs(os.path.dirname(os.path.abspath(fv.save_predictions)), exist_ok=True)
      normalizer_lib.write_npz_atomic(fv.save_predictions, sink.arrays(s.model_cfg.sonar_embed_dim))
  return report


def _jsonable(x: Any) -> Any:
  """NaN/inf -> None (strict JSON), recursively."""
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def format_table(report: dict[str, Any]) -> str:
  """The readable table: model vs baselines, one row each."""
  st = report["settings"]
  lines = [f"{TOOL}: {st['family']} step {st['step']}, {report['num_targets']} targets in "
           f"{report['num_batches']} batches of {st['global_batch_size']} x {st['seq_len']} "
           f"(contrastive groups of {st['contrastive_rows']} rows), raw SONAR space"]
  if st["sampler"]:
    sm = st["sampler"]
    lines.append(f"sampler: {sm['num_steps']} steps ({sm['timestep_spacing']}), guidance "
                 f"{sm['guidance_scale']}, rescale {sm['guidance_rescale']}, initial noise "
                 f"{sm['initial_noise_scale']}, epsilon scaling {sm['epsilon_scaling']}, eta "
                 f"{sm['eta']}, seed {st['seed']}")
  cols = (("l2", 10), ("contrastive_accuracy", 22), ("paraphrasing", 14),
          ("context_cosine", 16), ("target_cosine", 15))
  lines.append(f"{'':<18}" + "".join(f"{c:>{w}}" for c, w in cols))
  for name in ("model",) + BASELINES:
    m = report["metrics"][name]
    lines.append(f"{name:<18}" + "".join(f"{m[c]:>{w}.4f}" for c, w in cols))
  lines.append(f"model loss (normalized space, training objective): "
               f"{report['metrics']['model']['loss']:.5g}")
  return "\n".join(lines)


def _report(fv: Any) -> Optional[str]:
  report = run_cli(fv)
  if jax.process_index() != 0:
    return None
  return f"{format_table(report)}\n-> {fv.out}"


main = errors.absl_main(_report)
"""absl entry point: user errors -> one ``error:`` line on stderr and exit status 2."""


def run() -> None:
  """``python -m lcm_jax.evaluate``."""
  errors.run_absl_tool(_define_flags, main)


if __name__ == "__main__":
  run()
