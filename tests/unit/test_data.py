"""Tests for lcm_jax.data: real ArrayRecord shards in tmp_path, tiny dims.

Every concept's embedding is recognisable: ``[dataset tag, document index, concept index,
document length, 0...]``, so batches can be mapped back to documents exactly.
"""

from __future__ import annotations

import collections
import json
import os
import struct
from typing import Any, Iterable

from absl import flags
import grain
import numpy as np
import pytest

from configs import base
from lcm_jax import data
from lcm_jax import schema
from lcm_jax.errors import UserError

DIM = 8


# ----------------------------------------------------------------------------------------------
# Helpers


def _doc_embeddings(tag: int, index: int, n: int, dim: int = DIM) -> np.ndarray:
  e = np.zeros((n, dim), np.float32)
  e[:, 0] = tag
  e[:, 1] = index
  e[:, 2] = np.arange(n)
  e[:, 3] = n
  e[:, 4:] = 0.5  # non-zero content everywhere (padding is all zero)
  return e


def write_dataset(path: str, lengths: Iterable[int], *, tag: int = 0, num_shards: int = 2,
                  dim: int = DIM, normalizer: str | None = None) -> list[int]:
  """Writes documents of the given lengths into ``num_shards`` shards plus a manifest."""
  lengths = [int(n) for n in lengths]
  os.makedirs(path, exist_ok=True)
  entries = []
  for s, idx in enumerate(np.array_split(np.arange(len(lengths)), num_shards)):
    docs = [schema.Document(id=f"{tag}-{i}", embeddings=_doc_embeddings(tag, i, lengths[i], dim))
            for i in idx]
    entries.append(schema.write_shard(os.path.join(path, schema.shard_name(s, num_shards)), docs,
                                      dtype="float32"))
  schema.write_manifest(path, schema.make_manifest(dim=dim, dtype="float32", shards=entries,
                                                   producer={"test": True}, normalizer=normalizer))
  return lengths


def write_raw_dataset(path: str, records: list[bytes], *, dim: int = DIM) -> str:
  """One shard of hand-made records (bypasses encode_document's checks)."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  shard = os.path.join(path, schema.shard_name(0, 1))
  w = ArrayRecordWriter(shard, schema.ARRAY_RECORD_OPTIONS)
  for r in records:
    w.write(r)
  w.close()
  entry = {"file": os.path.basename(shard), "num_documents": len(records), "num_concepts": 0}
  schema.write_manifest(path, schema.make_manifest(dim=dim, dtype="float32", shards=[entry],
                                                   producer={"test": True}))
  return shard


def raw_record(emb: np.ndarray, *, n: int | None = None, doc_id: str = "x") -> bytes:
  """A record with the given payload and header (``n`` may lie), float32."""
  emb = np.asarray(emb, np.float32)
  header = {"id": doc_id, "n": emb.shape[0] if n is None else n, "dim": emb.shape[1],
            "dtype": "float32"}
  h = json.dumps(header).encode()
  return struct.pack("<4sBI", schema.MAGIC, schema.VERSION, len(h)) + h + emb.astype("<f4").tobytes()


def to_spec(datasets: list[dict[str, Any]] | str) -> str:
  """The command-line form "DIR:WEIGHT,DIR:WEIGHT" of a dataset list."""
  if isinstance(datasets, str):
    return datasets
  return ",".join(f"{e['path']}:{e.get('weight', 1.0)}" for e in datasets)


def make_config(train: list[dict[str, Any]], **data_overrides: Any):
  c = base.get_config()
  c.model.sonar_embed_dim = DIM
  c.data.train = to_spec(train)
  c.data.eval = ""
  c.data.eval_fraction = 0.0
  c.data.seq_len = 48
  c.data.max_doc_len = 16
  c.data.global_batch_size = 4
  c.data.num_epochs = 1
  c.data.worker_count = 0
  for k, v in data_overrides.items():
    setattr(c.data, k, to_spec(v) if k in ("train", "eval") else v)
  return c


def check_batch(b: dict[str, np.ndarray], rows: int, cfg) -> list[tuple[int, int, int, int]]:
  """Checks one batch's format and invariants; returns its pieces (tag, doc, start, length)."""
  L, m = cfg.data.seq_len, cfg.data.max_doc_len
  assert b["embeddings"].shape == (rows, L, DIM) and b["embeddings"].dtype == np.float32
  for k, dt in (("segment_ids", np.int32), ("positions", np.int32), ("target_mask", np.float32)):
    assert b[k].shape == (rows, L) and b[k].dtype == dt, k
  pieces = []
  for r in range(rows):
    seg, pos, mask, emb = (b["segment_ids"][r], b["positions"][r], b["target_mask"][r],
                           b["embeddings"][r])
    pad = seg == 0
    assert not emb[pad].any() and not pos[pad].any() and not mask[pad].any()
    used = int((~pad).sum())
    assert not pad[:used].any(), "padding only at the end of a row"
    ids = seg[:used]
    assert (np.diff(ids) >= 0).all() and (ids.size == 0 or ids[0] == 1)
    for s in np.unique(ids):
      sl = np.nonzero(seg == s)[0]
      assert (np.diff(sl) == 1).all(), "a segment is contiguous"
      e = emb[sl]
      tag, doc, n = int(e[0, 0]), int(e[0, 1]), int(e[0, 3])
      assert (e[:, 0] == tag).all() and (e[:, 1] == doc).all(), "no cross-document mixing"
      start = int(e[0, 2])
      np.testing.assert_array_equal(e[:, 2], np.arange(start, start + len(sl)))
      assert start % m == 0 and len(sl) == min(m, n - start), "wrapped at max_doc_len"
      np.testing.assert_array_equal(pos[sl], np.arange(len(sl)))
      np.testing.assert_array_equal(mask[sl], (np.arange(len(sl)) > 0).astype(np.float32))
      pieces.append((tag, doc, start, len(sl)))
  return pieces


def concepts_of(batches: Iterable[dict[str, np.ndarray]]) -> collections.Counter:
  """Counter of (tag, doc, concept) over every non-padding position."""
  out = collections.Counter()
  for b in batches:
    e = b["embeddings"][b["segment_ids"] > 0]
    out.update(zip(e[:, 0].astype(int).tolist(), e[:, 1].astype(int).tolist(),
                   e[:, 2].astype(int).tolist()))
  return out


def all_concepts(tag: int, lengths: list[int], docs: Iterable[int] | None = None) -> collections.Counter:
  docs = range(len(lengths)) if docs is None else docs
  return collections.Counter((tag, d, i) for d in docs for i in range(lengths[d]))


def batches_equal(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> bool:
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.fixture(name="lengths")
def fixture_lengths() -> list[int]:
  rng = np.random.default_rng(0)
  return [int(n) for n in rng.integers(1, 50, size=120)]


@pytest.fixture(name="flags_parsed", scope="module")
def fixture_flags_parsed():
  flags.FLAGS.mark_as_parsed()


# ----------------------------------------------------------------------------------------------
# Content, slicing, mixture, eval


def test_one_epoch_yields_every_concept_once(tmp_path, lengths):
  write_dataset(str(tmp_path / "a"), lengths, tag=0, num_shards=3)
  cfg = make_config([{"path": str(tmp_path / "a"), "weight": 1.0}])
  batches = list(data.make_train_iterator(cfg, process_index=0, process_count=1))
  pieces = [p for b in batches for p in check_batch(b, 4, cfg)]
  assert concepts_of(batches) == all_concepts(0, lengths)
  # Every wrap point of every document starts its own piece.
  want = {(0, d, s) for d, n in enumerate(lengths) for s in range(0, n, cfg.data.max_doc_len)}
  assert {p[:3] for p in pieces} == want and len(pieces) == len(want)
  # Packing works: rows are mostly full.
  fill = sum(float((b["segment_ids"] > 0).mean()) for b in batches) / len(batches)
  assert fill > 0.8, fill


def test_shuffle_is_seeded_and_reshuffled_per_epoch(tmp_path, lengths):
  write_dataset(str(tmp_path / "a"), lengths)
  train = [{"path": str(tmp_path / "a"), "weight": 1.0}]
  order = lambda bs: [p[1] for b in bs for p in check_batch(b, 4, cfg) if p[2] == 0]
  cfg = make_config(train, num_epochs=2)
  two = list(data.make_train_iterator(cfg, process_index=0, process_count=1))
  docs = order(two)
  assert sorted(docs) == sorted(list(range(len(lengths))) * 2)
  # Rank of each document in the 1st and in the 2nd epoch (packing reorders a little only).
  seen: dict[int, list[int]] = collections.defaultdict(list)
  for rank, d in enumerate(docs):
    seen[d].append(rank)
  first, second = zip(*(seen[d] for d in range(len(lengths))))
  assert abs(np.corrcoef(np.arange(len(lengths)), first)[0, 1]) < 0.5, "epoch 1 is shuffled"
  assert abs(np.corrcoef(first, second)[0, 1]) < 0.5, "epoch 2 is shuffled differently"
  assert concepts_of(two) == all_concepts(0, lengths) + all_concepts(0, lengths)
  cfg = make_config(train, num_epochs=2)
  assert batches_equal(two, list(data.make_train_iterator(cfg, process_index=0, process_count=1)))


def test_process_slices_partition_the_data(tmp_path, lengths):
  write_dataset(str(tmp_path / "a"), lengths)
  cfg = make_config([{"path": str(tmp_path / "a"), "weight": 1.0}])
  whole = concepts_of(data.make_train_iterator(cfg, process_index=0, process_count=1))
  parts = []
  for pi in range(2):
    bs = list(data.make_train_iterator(cfg, process_index=pi, process_count=2))
    for b in bs:
      check_batch(b, 2, cfg)
    parts.append(concepts_of(bs))
  assert not set(parts[0]) & set(parts[1])
  assert parts[0] + parts[1] == whole == all_concepts(0, lengths)


def test_mixture_weights_and_determinism(tmp_path):
  short = [int(n) for n in np.random.default_rng(1).integers(1, 10, size=60)]
  write_dataset(str(tmp_path / "a"), short, tag=1)
  write_dataset(str(tmp_path / "b"), short, tag=2)
  train = [{"path": str(tmp_path / "a"), "weight": 3.0}, {"path": str(tmp_path / "b"), "weight": 1.0}]

  def take(seed: int, n: int = 40) -> list[dict[str, np.ndarray]]:
    cfg = make_config(train, num_epochs=None, shuffle_seed=seed)
    it = data.make_train_iterator(cfg, process_index=0, process_count=1)
    return [next(it) for _ in range(n)]

  batches = take(0)
  docs = collections.Counter(p[0] for b in batches for p in check_batch(b, 4, make_config(train)))
  ratio = docs[1] / docs[2]
  assert docs[2] > 100 and 2.7 < ratio < 3.3, docs
  assert batches_equal(batches[:10], take(0, 10))
  assert not batches_equal(batches[:10], take(1, 10))


def test_eval_split_is_disjoint_deterministic_and_finite(tmp_path, lengths):
  write_dataset(str(tmp_path / "a"), lengths)
  cfg = make_config([{"path": str(tmp_path / "a"), "weight": 1.0}], eval_fraction=0.2)
  held = np.nonzero(data.eval_document_mask(len(lengths), 0.2))[0].tolist()
  assert 10 < len(held) < 40
  train = concepts_of(data.make_train_iterator(cfg, process_index=0, process_count=1))
  ev = list(data.make_eval_iterator(cfg, process_index=0, process_count=1))
  for b in ev:
    check_batch(b, 4, cfg)
  assert concepts_of(ev) == all_concepts(0, lengths, held)
  assert train == all_concepts(0, lengths, sorted(set(range(len(lengths))) - set(held)))
  assert batches_equal(ev, list(data.make_eval_iterator(cfg, process_index=0, process_count=1)))
  # Two processes: the same number of batches each, together the same documents.
  per = [list(data.make_eval_iterator(cfg, process_index=i, process_count=2)) for i in range(2)]
  assert len(per[0]) == len(per[1]) == len(ev)
  assert concepts_of(per[0]) + concepts_of(per[1]) == concepts_of(ev)
  # Finite: ceil(rows / B) batches; the last one is padded with all-zero rows.
  rows = sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in ev)
  assert len(ev) == -(-rows // 4)
  assert (ev[-1]["segment_ids"].max(axis=1) == 0).sum() == len(ev) * 4 - rows


def test_eval_datasets_and_empty_eval(tmp_path, lengths):
  write_dataset(str(tmp_path / "a"), lengths, tag=0)
  write_dataset(str(tmp_path / "e"), [3, 20, 5], tag=7, num_shards=1)
  train = [{"path": str(tmp_path / "a"), "weight": 1.0}]
  cfg = make_config(train, eval=[{"path": str(tmp_path / "e"), "weight": 1.0}], eval_fraction=0.2)
  assert concepts_of(data.make_train_iterator(cfg, process_index=0, process_count=1)) == \
      all_concepts(0, lengths)  # nothing held out of train when eval datasets are listed
  ev = list(data.make_eval_iterator(cfg, process_index=0, process_count=1))
  assert len(ev) == 1 and concepts_of(ev) == all_concepts(7, [3, 20, 5])
  with pytest.raises(UserError, match="empty eval set.*eval_fraction"):
    data.make_eval_iterator(make_config(train), process_index=0, process_count=1)


# ----------------------------------------------------------------------------------------------
# Checkpointing


@pytest.mark.parametrize("workers", [0, 1])
def test_exact_resume_and_orbax_round_trip(tmp_path, lengths, workers, flags_parsed):
  del flags_parsed
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  write_dataset(str(tmp_path / "a"), lengths, tag=0)
  write_dataset(str(tmp_path / "b"), lengths[:40], tag=1)
  train = [{"path": str(tmp_path / "a"), "weight": 2.0}, {"path": str(tmp_path / "b"), "weight": 1.0}]
  cfg = make_config(train, num_epochs=None, eval_fraction=0.1, worker_count=workers,
                    packing_bins=6)
  it = data.make_train_iterator(cfg, process_index=0, process_count=1)
  for _ in range(5):
    next(it)
  state = it.get_state()
  json.dumps(state)  # JSON-serialisable (that is how Grain's Orbax handler stores it)
  # Async saving, as the trainer does: the state must be captured at save() time.
  mngr = ocp.CheckpointManager(
      str(tmp_path / "ckpt"), options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True),
      item_handlers={"data_iter": grain.checkpoint.CheckpointHandler()})
  mngr.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  expected = [next(it) for _ in range(7)]
  mngr.wait_until_finished()
  it.close()

  fresh = data.make_train_iterator(cfg, process_index=0, process_count=1)
  fresh.set_state(state)
  assert batches_equal(expected, [next(fresh) for _ in range(7)])
  fresh.close()

  restored = data.make_train_iterator(cfg, process_index=0, process_count=1)
  mngr.restore(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(restored)))
  assert batches_equal(expected, [next(restored) for _ in range(7)])
  restored.close()
  mngr.close()


# ----------------------------------------------------------------------------------------------
# Bad input


def _iterate(path: str, **overrides: Any) -> None:
  cfg = make_config([{"path": path, "weight": 1.0}], **overrides)
  for _ in data.make_train_iterator(cfg, process_index=0, process_count=1):
    pass


def _good(i: int, n: int = 3, dim: int = DIM) -> bytes:
  return schema.encode_document(schema.Document(f"d{i}", _doc_embeddings(0, i, n, dim)), "float32")


@pytest.mark.parametrize("bad,pattern", [
    (_good(3, dim=6), r"record 3 \(document 'd3'\): field 'embeddings': dim 6 != expected 8"),
    (raw_record(np.full((2, DIM), np.nan), doc_id="d3"), r"record 3 .*field 'embeddings'.*NaN"),
    (raw_record(np.full((2, DIM), np.inf), doc_id="d3"), r"record 3 .*field 'embeddings'.*NaN/inf"),
    (raw_record(np.zeros((0, DIM)), doc_id="d3"), r"record 3 .*field 'embeddings': empty document"),
    (raw_record(np.zeros((2, DIM)), n=5, doc_id="d3"), r"record 3 .*field 'embeddings'.*truncated"),
    (b"nope", r"record 3: field 'header'"),
])
def test_bad_records_name_file_record_field(tmp_path, bad, pattern):
  shard = write_raw_dataset(str(tmp_path / "d"), [_good(0), _good(1), _good(2), bad, _good(4)])
  with pytest.raises(schema.ShardFormatError, match=pattern) as e:
    _iterate(str(tmp_path / "d"))
  assert shard in str(e.value)


def test_truncated_and_corrupt_shards(tmp_path, lengths):
  shard = os.path.join(str(tmp_path / "t"), schema.shard_name(0, 1))
  write_dataset(str(tmp_path / "t"), lengths[:60], num_shards=1)
  raw = open(shard, "rb").read()
  with open(shard, "wb") as f:
    f.write(raw[:len(raw) // 2])
  with pytest.raises(schema.ShardFormatError, match="field 'file'.*truncated or corrupt") as e:
    _iterate(str(tmp_path / "t"))
  assert shard in str(e.value)

  shard = os.path.join(str(tmp_path / "c"), schema.shard_name(0, 1))
  write_dataset(str(tmp_path / "c"), lengths[:60], num_shards=1)
  raw = bytearray(open(shard, "rb").read())
  raw[2000:2016] = b"\xab" * 16  # inside a record chunk: its hash no longer matches
  with open(shard, "wb") as f:
    f.write(bytes(raw))
  with pytest.raises(schema.ShardFormatError, match=r"record \d+: field 'record': cannot read") as e:
    _iterate(str(tmp_path / "c"))
  assert shard in str(e.value)


def test_manifest_count_mismatch(tmp_path):
  path = str(tmp_path / "m")
  write_dataset(path, [3, 4, 5], num_shards=1)
  m = json.load(open(os.path.join(path, schema.MANIFEST_NAME)))
  m["shards"][0]["num_documents"] = 4
  schema.write_manifest(path, m)
  with pytest.raises(schema.ShardFormatError, match=r"shards\[0\]\.num_documents.*says 4.*holds 3"):
    _iterate(path)


def test_config_errors(tmp_path):
  write_dataset(str(tmp_path / "a"), [3, 4, 5], num_shards=1)
  write_dataset(str(tmp_path / "w"), [3, 4, 5], num_shards=1, dim=6)
  good = {"path": str(tmp_path / "a"), "weight": 1.0}
  cases = [
      (make_config([good, {"path": str(tmp_path / "nope"), "weight": 1.0}]),
       r"config\.data\.train\[1\]\.path: dataset directory .*nope.* does not exist"),
      (make_config([good, {"path": str(tmp_path / "a"), "weight": 0.0}]),
       r"config\.data\.train\[1\]\.weight: must be > 0"),
      (make_config([{"path": str(tmp_path / "w"), "weight": 1.0}]),
       r"w/manifest\.json: field 'dim': 6 != config\.model\.sonar_embed_dim \(8\)"),
      (make_config([good], global_batch_size=5),
       r"config\.data\.global_batch_size \(5\) is not divisible by the process count \(2\)"),
      (make_config([good], max_doc_len=64), r"config\.data\.max_doc_len \(64\).*seq_len \(48\)"),
      (make_config([]), r"config\.data\.train: no training datasets"),
  ]
  for cfg, pattern in cases:
    with pytest.raises(UserError, match=pattern):
      data.make_train_iterator(cfg, process_index=0, process_count=2)


def test_missing_dataset_directory_is_one_error_line(tmp_path):
  """What a user sees: ``error: <config field>: dataset directory <path> does not exist``, exit 2,
  and no workdir created (a UserError, not a traceback)."""
  from tests import helpers  # pylint: disable=g-import-not-at-top
  missing, wd = str(tmp_path / "nope"), str(tmp_path / "wd")
  in_process = make_config([{"path": missing, "weight": 1.0}])
  with pytest.raises(UserError, match=r"config\.data\.train\[0\]\.path: dataset directory"):
    data.make_train_iterator(in_process, process_index=0, process_count=1)
  r = helpers.run_cli(helpers.main_cmd(wd, missing), timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == (
      f"error: config.data.train[0].path: dataset directory {missing!r} does not exist")
  assert "Traceback" not in r.stderr and not os.path.exists(wd)


def test_dataset_dim_and_normalizer(tmp_path):
  write_dataset(str(tmp_path / "a"), [3, 4], num_shards=1, normalizer="normalizer.npz")
  write_dataset(str(tmp_path / "b"), [3, 4], num_shards=1)
  cfg = make_config([{"path": str(tmp_path / "a"), "weight": 1.0}])
  assert data.dataset_dim(cfg) == DIM
  with pytest.raises(UserError, match="field 'normalizer'.*does not exist"):
    data.resolve_normalizer_path(cfg)
  np.savez(str(tmp_path / "a" / "normalizer.npz"), center=np.zeros(DIM))
  assert data.resolve_normalizer_path(cfg) == str(tmp_path / "a" / "normalizer.npz")
  cfg.data.normalizer = str(tmp_path / "other.npz")
  with pytest.raises(UserError, match=r"config\.data\.normalizer: .*other\.npz.* does not exist"):
    data.resolve_normalizer_path(cfg)
  cfg = make_config([{"path": str(tmp_path / "b"), "weight": 1.0}])
  with pytest.raises(UserError, match=r"manifest\.json field 'normalizer' is not set"):
    data.resolve_normalizer_path(cfg)


def test_parse_dataset_spec():
  assert data.parse_dataset_spec("/d/wiki:0.7, /d/books:0.3") == [
      {"path": "/d/wiki", "weight": 0.7}, {"path": "/d/books", "weight": 0.3}]
  assert data.parse_dataset_spec("rel/dir") == [{"path": "rel/dir", "weight": 1.0}]
  assert data.parse_dataset_spec("gs://bucket/ds:2") == [{"path": "gs://bucket/ds", "weight": 2.0}]
  assert data.parse_dataset_spec("gs://bucket/ds") == [{"path": "gs://bucket/ds", "weight": 1.0}]
  assert data.parse_dataset_spec("") == []
