"""Source/target (fine-tuning) documents: schema field, target-only masks, truncation, errors.

Embeddings are recognisable (column 0 = document index, column 1 = concept index, column 2 =
1 for target concepts), so every batch position can be checked against the document it came from.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from lcm_jax import data
from lcm_jax import evaluate
from lcm_jax import schema
from tests.unit.test_data import DIM, make_config


def _pair(index: int, source_len: int, target_len: int) -> schema.Document:
  n = source_len + target_len
  e = np.full((n, DIM), 0.5, np.float32)
  e[:, 0] = index
  e[:, 1] = np.arange(n)
  e[:, 2] = (np.arange(n) >= source_len).astype(np.float32)
  return schema.Document(id=f"pair-{index}", embeddings=e, source_len=source_len)


def _write(path, docs) -> None:
  os.makedirs(path, exist_ok=True)
  entry = schema.write_shard(os.path.join(path, schema.shard_name(0, 1)), docs, dtype="float32")
  schema.write_manifest(str(path), schema.make_manifest(dim=DIM, dtype="float32", shards=[entry],
                                                        producer={"test": True}))


def _batches(cfg):
  return list(data.make_train_iterator(cfg, process_index=0, process_count=1))


def test_schema_round_trips_source_len_and_rejects_bad_values(tmp_path):
  doc = _pair(0, 3, 2)
  back = schema.decode_document(schema.encode_document(doc, "float32"))
  assert back.source_len == 3
  assert schema.decode_document(schema.encode_document(
      schema.Document("p", doc.embeddings), "float32")).source_len is None
  for bad in (0, 5, 7, -1, True, 2.5):
    with pytest.raises(schema.ShardFormatError, match="field 'source_len'"):
      schema.encode_document(schema.Document("bad", doc.embeddings, source_len=bad), "float32")


def test_only_target_concepts_are_targets(tmp_path):
  sizes = [(3, 2), (1, 4), (5, 1), (2, 2), (4, 3), (1, 1)]
  _write(tmp_path / "ft", [_pair(i, s, t) for i, (s, t) in enumerate(sizes)])
  cfg = make_config([{"path": str(tmp_path / "ft")}], max_doc_len=16)
  seen = {}
  for b in _batches(cfg):
    for r in range(b["segment_ids"].shape[0]):
      for seg in np.unique(b["segment_ids"][r]):
        if seg == 0:
          continue
        cols = np.nonzero(b["segment_ids"][r] == seg)[0]
        emb = b["embeddings"][r, cols]
        index = int(emb[0, 0])
        s, t = sizes[index]
        assert len(cols) == s + t                         # never split
        np.testing.assert_array_equal(b["positions"][r, cols], np.arange(s + t))
        np.testing.assert_array_equal(b["target_mask"][r, cols], emb[:, 2])  # exactly the target
        seen[index] = seen.get(index, 0) + 1
  assert seen == {i: 1 for i in range(len(sizes))}


def test_long_pairs_drop_the_earliest_source_concepts(tmp_path):
  _write(tmp_path / "ft", [_pair(0, 10, 4), _pair(1, 2, 3)])
  cfg = make_config([{"path": str(tmp_path / "ft")}], max_doc_len=6, seq_len=12,
                    global_batch_size=1)
  pieces = {}
  for b in _batches(cfg):
    for seg in np.unique(b["segment_ids"][0]):
      if seg:
        cols = np.nonzero(b["segment_ids"][0] == seg)[0]
        pieces[int(b["embeddings"][0, cols[0], 0])] = (b["embeddings"][0, cols],
                                                       b["target_mask"][0, cols])
  emb, mask = pieces[0]
  np.testing.assert_array_equal(emb[:, 1], np.arange(8, 14))     # the last 6 of 14 concepts
  np.testing.assert_array_equal(mask, [0, 0, 1, 1, 1, 1])        # 2 source + the 4 targets
  np.testing.assert_array_equal(pieces[1][1], [0, 0, 1, 1, 1])


def test_a_target_that_cannot_fit_is_an_error_naming_the_record(tmp_path):
  _write(tmp_path / "ft", [_pair(0, 2, 2), _pair(1, 2, 6)])
  cfg = make_config([{"path": str(tmp_path / "ft")}], max_doc_len=6, seq_len=12,
                    global_batch_size=1)
  with pytest.raises(schema.ShardFormatError,
                     match=r"shard-00000-of-00001.array_record: record 1 \(document 'pair-1'\): "
                           r"field 'source_len'.*max_doc_len=6"):
    _batches(cfg)


# ----------------------------------------------------------------------------------------------
# Fine-tuning a pre-trained run: init_from + target-only loss


def _train_config(train_dir, normalizer, *, steps):
  from configs import mse_1b6  # pylint: disable=g-import-not-at-top
  c = mse_1b6.get_config("tiny")
  c.model.sonar_embed_dim = DIM
  c.model.model_dim = 16
  c.model.num_heads = 2
  c.model.ffn_inner_dim = 32
  c.data.train = str(train_dir)
  c.data.eval = str(train_dir)
  c.data.normalizer = str(normalizer)
  c.data.synthetic_corpus = ""
  c.data.seq_len = 16
  c.data.max_doc_len = 16
  c.data.global_batch_size = 8
  c.train.num_steps = steps
  c.train.eval_every = steps
  c.train.eval_batches = 0
  c.train.checkpoint_every = steps
  c.train.log_every = steps
  c.train.async_checkpoint = False
  c.optimizer.warmup_steps = 1
  return c


def test_finetuning_starts_from_pretrained_weights_and_scores_only_targets(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from lcm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from lcm_jax import train  # pylint: disable=g-import-not-at-top
  from lcm_jax.normalizer import Normalizer  # pylint: disable=g-import-not-at-top
  from tests.unit.test_data import write_dataset  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  norm = Normalizer(center=rng.normal(size=DIM).astype(np.float32),
                    scale=rng.uniform(0.5, 2, DIM).astype(np.float32))
  norm_path = norm.save(str(tmp_path / "normalizer.npz"))
  write_dataset(str(tmp_path / "pre"), [5, 7, 9, 4, 6, 8], num_shards=1)
  sizes = [(3, 2), (1, 4), (5, 1), (2, 2)]
  _write(tmp_path / "ft", [_pair(i, s, t) for i, (s, t) in enumerate(sizes)])

  pre_dir = str(tmp_path / "w_pre")
  train.train_and_evaluate(_train_config(tmp_path / "pre", norm_path, steps=3), pre_dir)
  ft_cfg = _train_config(tmp_path / "ft", norm_path, steps=2)

  # The fine-tuning state starts from the pre-trained params, with a fresh optimizer.
  s = train.setup(ft_cfg)
  pre_state, _ = ckpt_lib.Checkpointer(pre_dir, create=False).restore(None, s.abstract_state)
  fresh = train.init_state(s, norm)
  ft_cfg.train.init_from = pre_dir
  started = train.load_pretrained(s, fresh, pre_dir)
  for a, b in zip(jax.tree.leaves(started["params"]), jax.tree.leaves(pre_state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
             for a, b in zip(jax.tree.leaves(fresh["params"]), jax.tree.leaves(pre_state["params"])))
  assert int(started["step"]) == 0

  metrics = train.train_and_evaluate(ft_cfg, str(tmp_path / "w_ft"), evaluate.periodic)
  assert metrics["num_targets"] == sum(t for _, t in sizes)   # only target concepts are scored
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoints"):
    train.load_pretrained(s, fresh, str(tmp_path / "nowhere"))
