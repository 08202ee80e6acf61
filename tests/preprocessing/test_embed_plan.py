"""The embedding job's shard plan (data_prep.embed.plan_shards) against a brute-force reference."""

import numpy as np
import pytest

from data_prep import embed


def _reference_plan(sizes_per_source, shard_docs, shard_bytes):
  """One document at a time: close the shard at shard_docs docs or once bytes >= shard_bytes."""
  docs = [(s, i, int(b)) for s, sizes in enumerate(sizes_per_source) for i, b in enumerate(sizes)]
  shards, cur, cur_bytes = [], [], 0
  for d in docs:
    cur.append(d)
    cur_bytes += d[2]
    if len(cur) == shard_docs or (shard_bytes is not None and cur_bytes >= shard_bytes):
      shards.append(cur)
      cur, cur_bytes = [], 0
  if cur:
    shards.append(cur)
  return shards


def _flatten(plan):
  return [[(src, i) for src, a, b in s.ranges for i in range(a, b)] for s in plan]


@pytest.mark.parametrize("shard_docs,shard_bytes", [(1, None), (3, None), (7, None), (100, None),
                                                     (1000, 50), (4, 120), (2, 1), (5, 10_000)])
def test_plan_matches_reference(shard_docs, shard_bytes):
  rng = np.random.default_rng(shard_docs * 7 + (shard_bytes or 0))
  sizes = [rng.integers(1, 90, size=n) for n in (5, 0, 1, 13, 8)]
  plan = embed.plan_shards(sizes, shard_docs, shard_bytes)
  ref = _reference_plan(sizes, shard_docs, shard_bytes)
  assert _flatten(plan) == [[(s, i) for s, i, _ in shard] for shard in ref]
  assert [p.num_bytes for p in plan] == [sum(b for *_, b in shard) for shard in ref]
  assert [p.num_docs for p in plan] == [len(shard) for shard in ref]
  assert all(p.count == len(ref) and p.index == k for k, p in enumerate(plan))
  # Every document exactly once, in order.
  flat = [d for s in _flatten(plan) for d in s]
  assert flat == [(s, i) for s, sz in enumerate(sizes) for i in range(len(sz))]


def test_plan_names_and_worker_partition_are_disjoint_and_complete():
  plan = embed.plan_shards([np.ones(23, np.int64)], 4)
  assert [p.file for p in plan][:2] == ["shard-00000-of-00006.array_record",
                                        "shard-00001-of-00006.array_record"]
  for n in (1, 2, 3, 7):
    owned = [[p.index for p in plan if p.index % n == w] for w in range(n)]
    assert sorted(i for o in owned for i in o) == list(range(len(plan)))


def test_plan_rejects_bad_sizes():
  with pytest.raises(embed.EmbedError, match="--shard_docs"):
    embed.plan_shards([np.ones(3)], 0)
  with pytest.raises(embed.EmbedError, match="--shard_bytes"):
    embed.plan_shards([np.ones(3)], 2, 0)
  assert embed.plan_shards([np.zeros(0)], 5) == []
