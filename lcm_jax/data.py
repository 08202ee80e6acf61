"""The Grain input pipeline: embedding shards -> packed, checkpointable batches.

Per train dataset (``config.data.train``, a list of ``{"path": DIR, "weight": w}``)::

  manifest -> document indices (minus the held-out eval documents) -> shuffle (per epoch)
  -> repeat -> data-shard slice -> read + decode (lcm_jax.schema)
  -> weighted mixture of the datasets -> to_iter_dataset
  -> wrap documents into pieces of <= max_doc_len concepts
  -> first-fit pack pieces into rows of seq_len concepts -> batch -> mp_prefetch

Each data shard (one per process by default; ``config.data.data_shards``, see :func:`data_shards`)
runs this pipeline on its slice of the documents; a process concatenates the batches of its data
shards. Every batch is a dict of numpy arrays with ``B = global_batch_size // process_count`` rows
and ``L = seq_len`` concepts:

* ``embeddings``  float32 (B, L, dim): raw SONAR-space vectors (the model normalizes);
* ``segment_ids`` int32 (B, L): 1, 2, ... per document piece within a row, 0 = padding;
* ``positions``   int32 (B, L): 0, 1, ... within each piece (RoPE restarts), 0 on padding;
* ``target_mask`` float32 (B, L): 1 where the concept is a training target (not padding, not
  the first concept of a piece; for fine-tuning documents, those with a ``source_len`` in their
  header, only the target concepts).

Fine-tuning documents are never split: one longer than ``max_doc_len`` loses its EARLIEST source
concepts (at least one source concept is kept); a target that cannot fit with one source concept
is a :class:`~lcm_jax.schema.ShardFormatError`.

The train iterator is a Grain ``DatasetIterator`` (:class:`TrainIterator`): ``get_state()``
returns a JSON-serialisable dict with one state per data shard and ``set_state()`` resumes
exactly (also behind ``mp_prefetch``). :class:`lcm_jax.checkpoint.Checkpointer` saves it as one
file per data shard, so a checkpoint resumes on any process count that divides the number of
data shards.

Errors in the data or the config are :class:`~lcm_jax.errors.UserError` s:
:class:`lcm_jax.schema.ShardFormatError` naming the shard file, the record and the field, or a
``UserError`` naming the ``config.data`` field that is wrong.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import grain
import numpy as np

from lcm_jax import schema
from lcm_jax.errors import UserError

Batch = dict[str, np.ndarray]

# Reading threads / buffered documents per Python process (overridable by optional
# ``config.data.read_threads`` / ``config.data.read_buffer_size``).
_DEFAULT_READ_THREADS = 8
_DEFAULT_READ_BUFFER = 256
# Default first-fit packing window in concepts (see _packing_bins).
_PACKING_CONCEPTS = 8192


# ----------------------------------------------------------------------------------------------
# Datasets on disk


@dataclasses.dataclass(frozen=True)
class _DatasetInfo:
  """One dataset directory: its manifest and the shard layout (global index -> file, record)."""

  field: str                 # the config field it came from, e.g. "config.data.train[1]"
  path: str
  weight: float
  manifest_path: str
  dim: int
  files: tuple[str, ...]
  counts: tuple[int, ...]    # documents per shard, from the manifest

  @property
  def num_documents(self) -> int:
    return int(sum(self.counts))


def parse_dataset_spec(spec: str) -> list[dict[str, Any]]:
  """Parses ``"DIR[:WEIGHT],DIR[:WEIGHT],..."`` (the command-line form) into dataset entries."""
  out = []
  for item in (x.strip() for x in spec.split(",")):
    if not item:
      continue
    path, weight = item, 1.0
    head, sep, tail = item.rpartition(":")
    # A ':' suffix without '/' is a weight (DIR:0.7); one with '/' belongs to the path (gs://b/x).
    if sep and head and "/" not in tail:
      try:
        path, weight = head, float(tail)
      except ValueError:
        raise UserError(f"dataset {item!r}: weight {tail!r} is not a number (expected "
                        "DIR[:WEIGHT],DIR[:WEIGHT],...)") from None
    out.append({"path": path, "weight": weight})
  return out


def _entries(value: Any, field: str) -> list[dict[str, Any]]:
  """Normalises a ``config.data.train``/``eval`` value into a list of plain dicts."""
  if value is None:
    return []
  if isinstance(value, str):
    value = parse_dataset_spec(value)
  if not isinstance(value, Sequence):
    raise UserError(f"{field}: expected a list of {{'path': DIR, 'weight': w}}, got {value!r}")
  out = []
  for i, e in enumerate(value):
    if isinstance(e, str):
      e = {"path": e, "weight": 1.0}
    try:
      e = dict(e)
    except (TypeError, ValueError):
      raise UserError(f"{field}[{i}]: expected {{'path': DIR, 'weight': w}}, got {e!r}") from None
    if not e.get("path"):
      raise UserError(f"{field}[{i}].path: missing or empty")
    out.append(e)
  return out


def _load_dataset(entry: dict[str, Any], field: str, expected_dim: int | None) -> _DatasetInfo:
  """Reads and validates one dataset's manifest (not its shards)."""
  path = os.fspath(entry["path"])
  weight = entry.get("weight", 1.0)
  try:
    weight = float(weight)
  except (TypeError, ValueError):
    raise UserError(f"{field}.weight: not a number ({weight!r})") from None
  if not np.isfinite(weight) or weight <= 0:
    raise UserError(f"{field}.weight: must be > 0, got {weight}")
  if not os.path.isdir(path):
    raise UserError(f"{field}.path: dataset directory {path!r} does not exist")
  try:
    manifest = schema.read_manifest(path)
  except schema.ShardFormatError as e:
    raise schema.ShardFormatError(f"{field} ({path}): {e}") from None
  manifest_path = os.path.join(path, schema.MANIFEST_NAME)
  dim = manifest["dim"]
  if not isinstance(dim, int) or dim <= 0:
    raise schema.ShardFormatError(f"{manifest_path}: field 'dim': invalid value {dim!r}")
  if expected_dim is not None and dim != expected_dim:
    raise schema.ShardFormatError(
        f"{manifest_path}: field 'dim': {dim} != config.model.sonar_embed_dim ({expected_dim})")
  counts = []
  for i, s in enumerate(manifest["shards"]):
    n = s.get("num_documents")
    if not isinstance(n, int) or n < 0:
      raise schema.ShardFormatError(
          f"{manifest_path}: field 'shards[{i}].num_documents': invalid value {n!r}")
    counts.append(n)
  if sum(counts) == 0:
    raise schema.ShardFormatError(f"{manifest_path}: field 'shards': no documents in any shard")
  return _DatasetInfo(field=field, path=path, weight=weight, manifest_path=manifest_path, dim=dim,
                      files=tuple(schema.shard_paths(path, manifest)), counts=tuple(counts))


def _count_records(path: str) -> int:
  """Opens one ArrayRecord file and returns its record count (ShardFormatError if unreadable)."""
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top
  where = f"{path}: field 'file': cannot open as ArrayRecord"
  try:
    reader = ArrayRecordReader(path)
  except Exception as e:  # array_record raises RuntimeError/ValueError on corrupt files.
    raise schema.ShardFormatError(f"{where} ({type(e).__name__}: {e}); truncated or corrupt "
                                  "shard") from None
  # A truncated file or a damaged index/footer opens "successfully" with ok() False and 0 records.
  ok = reader.ok()
  count = int(reader.num_records()) if ok else 0
  try:
    reader.close()
  except Exception:  # pylint: disable=broad-except  # close() re-raises the failed status.
    ok = False
  if not ok:
    raise schema.ShardFormatError(f"{where} (footer or record index unreadable); truncated or "
                                  "corrupt shard")
  return count


def _open_source(info: _DatasetInfo) -> grain.sources.ArrayRecordDataSource:
  """Validates every shard of ``info`` against its manifest and returns the data source."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(info.files))) as pool:
    actual = list(pool.map(_count_records, info.files))
  for i, (f, want, got) in enumerate(zip(info.files, info.counts, actual)):
    if want != got:
      raise schema.ShardFormatError(
          f"{info.manifest_path}: field 'shards[{i}].num_documents': manifest says {want}, "
          f"{f} holds {got} records")
  # "file[start:end]" tells Grain the record count, so it does not reopen every file here.
  return grain.sources.ArrayRecordDataSource(
      [f"{f}[0:{n}]" for f, n in zip(info.files, info.counts) if n > 0])


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """A stable 64-bit integer hash (SplitMix64 finaliser), vectorised."""
  with np.errstate(over="ignore"):
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def eval_document_mask(num_documents: int, fraction: float) -> np.ndarray:
  """Which global document indices are held out: a stable hash of the index, < ``fraction``.

  The held-out set for a smaller fraction is a subset of the one for a larger fraction.
  """
  if fraction <= 0:
    return np.zeros(num_documents, dtype=bool)
  u = (_splitmix64(np.arange(num_documents, dtype=np.uint64)) >> np.uint64(11)).astype(np.float64)
  return u * (1.0 / (1 << 53)) < fraction


# ----------------------------------------------------------------------------------------------
# Grain transforms (module level so that mp_prefetch workers can unpickle them)


class _ReadDocument(grain.transforms.Map):
  """Global document index -> ``{"embeddings": float32 (n, dim), "source_len": int64 ()}``
  (``source_len`` 0 for pre-training documents), errors naming file+record."""

  def __init__(self, source: grain.sources.ArrayRecordDataSource, info: _DatasetInfo):
    self._source = source
    self._files = [f for f, n in zip(info.files, info.counts) if n > 0]
    counts = [n for n in info.counts if n > 0]
    self._ends = list(np.cumsum(counts).tolist())
    self._dim = info.dim

  def map(self, element: Any) -> dict[str, np.ndarray]:
    index = int(element)
    shard = bisect.bisect_right(self._ends, index)
    record = index - (self._ends[shard - 1] if shard else 0)
    path = self._files[shard]
    try:
      raw = self._source[index]
    except Exception as e:  # pylint: disable=broad-except
      raise schema.ShardFormatError(
          f"{path}: record {record}: field 'record': cannot read ({type(e).__name__}: {e}); "
          "truncated or corrupt shard") from None
    doc = schema.decode_document(raw, path=path, index=record, expected_dim=self._dim)
    out = {"embeddings": np.asarray(doc.embeddings, dtype=np.float32),
           "source_len": np.int64(doc.source_len or 0)}
    if doc.source_len is not None:
      out["where"] = f"{path}: record {record} (document {doc.id!r})"
    return out


class _WrapPieces(grain.experimental.FlatMapTransform):
  """Document -> pieces of at most ``max_doc_len`` concepts; a piece's first concept is no target."""

  def __init__(self, max_doc_len: int):
    self.max_doc_len = max_doc_len
    self.max_fan_out = 1 << 30  # Unused by FlatMapIterDataset; documents can be any length.

  def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    emb = element["embeddings"]
    source_len = int(element.get("source_len", 0))
    if source_len:
      return [self._source_target(emb, source_len, element.get("where", "<document>"))]
    pieces = []
    for start in range(0, emb.shape[0], self.max_doc_len):
      piece = emb[start:start + self.max_doc_len]
      mask = np.ones(piece.shape[0], dtype=np.float32)
      mask[0] = 0.0
      pieces.append({"embeddings": piece, "target_mask": mask})
    return pieces

  def _source_target(self, emb: np.ndarray, source_len: int, where: str) -> dict[str, np.ndarray]:
    """One piece: the target whole, preceded by as much of the source's END as fits."""
    target_len = emb.shape[0] - source_len
    if target_len + 1 > self.max_doc_len:
      raise schema.ShardFormatError(
          f"{where}: field 'source_len': the target has {target_len} concepts; with one source "
          f"concept it does not fit config.data.max_doc_len={self.max_doc_len}")
    start = max(0, emb.shape[0] - self.max_doc_len)
    piece = emb[start:]
    mask = np.zeros(piece.shape[0], dtype=np.float32)
    mask[source_len - start:] = 1.0
    return {"embeddings": piece, "target_mask": mask}


def _collate(rows: Sequence[dict[str, np.ndarray]], *, batch_size: int, row_start: int = 0,
             row_stop: int | None = None) -> Batch:
  """Stacks packed rows ``[row_start:row_stop]`` into a batch padded to ``batch_size`` rows.

  Padding rows are all zero (segment id 0, no targets). Renames the packer's outputs.
  """
  first = rows[0]
  rows = rows[row_start:row_stop]
  fields = (("embeddings", "embeddings", np.float32),
            ("segment_ids", "embeddings_segment_ids", np.int32),
            ("positions", "embeddings_positions", np.int32),
            ("target_mask", "target_mask", np.float32))
  out = {}
  for name, key, dtype in fields:
    buf = np.zeros((batch_size,) + first[key].shape, dtype=dtype)
    for i, r in enumerate(rows):
      buf[i] = r[key]
    out[name] = buf
  return out


# ----------------------------------------------------------------------------------------------
# Config checks


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} / process_count {process_count} invalid")
  return int(process_index), int(process_count)


def _opt(cfg: Any, name: str, default: Any) -> Any:
  """An optional ``config.data`` field (ConfigDict or dict)."""
  try:
    value = cfg.get(name, default)
  except AttributeError:
    value = getattr(cfg, name, default)
  return default if value is None else value


def _check_config(config: Any, process_count: int) -> int:
  """Validates the ``config.data`` fields; returns the per-process batch size."""
  d = config.data
  g = int(d.global_batch_size)
  if g <= 0:
    raise UserError(f"config.data.global_batch_size must be > 0, got {g}")
  if g % process_count:
    raise UserError(f"config.data.global_batch_size ({g}) is not divisible by the process count "
                    f"({process_count})")
  if int(d.seq_len) <= 0:
    raise UserError(f"config.data.seq_len must be > 0, got {d.seq_len}")
  if not 1 <= int(d.max_doc_len) <= int(d.seq_len):
    raise UserError(f"config.data.max_doc_len ({d.max_doc_len}) must be in [1, config.data.seq_len "
                    f"({d.seq_len})]: a document piece must fit into one packed row")
  if d.num_epochs is not None and int(d.num_epochs) < 1:
    raise UserError(f"config.data.num_epochs must be None (forever) or >= 1, got {d.num_epochs}")
  if int(d.worker_count) < 0:
    raise UserError(f"config.data.worker_count must be >= 0, got {d.worker_count}")
  if int(d.worker_buffer_size) < 1:
    raise UserError(f"config.data.worker_buffer_size must be >= 1, got {d.worker_buffer_size}")
  if not 0.0 <= float(d.eval_fraction) < 1.0:
    raise UserError(f"config.data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
  return g // process_count


def _require_parsed_flags() -> None:
  """Grain worker processes read absl flags; fail early with a clear message if unparsed."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    raise RuntimeError(
        "config.data.worker_count > 0 (Grain mp_prefetch) needs absl flags to be parsed: run "
        "under absl.app.run(main), or call absl.flags.FLAGS.mark_as_parsed() before building the "
        "iterator; scripts also need an `if __name__ == '__main__':` guard (workers are spawned)")


def _train_infos(config: Any) -> list[_DatasetInfo]:
  entries = _entries(config.data.train, "config.data.train")
  if not entries:
    raise UserError("config.data.train: no training datasets")
  dim = int(config.model.sonar_embed_dim)
  return [_load_dataset(e, f"config.data.train[{i}]", dim) for i, e in enumerate(entries)]


def _read_options(config: Any) -> grain.ReadOptions:
  return grain.ReadOptions(
      num_threads=int(_opt(config.data, "read_threads", _DEFAULT_READ_THREADS)),
      prefetch_buffer_size=int(_opt(config.data, "read_buffer_size", _DEFAULT_READ_BUFFER)))


def _packing_bins(config: Any, batch_rows: int) -> int:
  """First-fit bins: at least one batch of rows and ~8192 concepts (fill ~98.7% at seq_len 128).

  Overridable by the optional ``config.data.packing_bins``. More bins pack tighter but buffer
  more memory (bins x seq_len x dim floats) and re-pack more work on resume.
  """
  bins = int(_opt(config.data, "packing_bins", 0))
  return bins if bins > 0 else max(batch_rows, _PACKING_CONCEPTS // int(config.data.seq_len))


def _pack(ds: grain.IterDataset, config: Any, num_bins: int) -> grain.IterDataset:
  """Wraps documents into pieces and first-fit packs them into rows of ``seq_len`` concepts."""
  seq_len = int(config.data.seq_len)
  ds = grain.experimental.FlatMapIterDataset(ds, _WrapPieces(int(config.data.max_doc_len)))
  return grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={"embeddings": seq_len, "target_mask": seq_len},
      num_packing_bins=num_bins, shuffle_bins=False)


# ----------------------------------------------------------------------------------------------
# Public API


def dataset_dim(config: Any) -> int:
  """The embedding dim shared by every train (and eval) dataset's manifest."""
  infos = [_load_dataset(e, f"config.data.train[{i}]", None)
           for i, e in enumerate(_entries(config.data.train, "config.data.train"))]
  infos += [_load_dataset(e, f"config.data.eval[{i}]", None)
            for i, e in enumerate(_entries(config.data.eval, "config.data.eval"))]
  if not infos:
    raise UserError("config.data.train: no training datasets")
  for info in infos[1:]:
    if info.dim != infos[0].dim:
      raise schema.ShardFormatError(
          f"{info.manifest_path}: field 'dim': {info.dim} != {infos[0].dim} of "
          f"{infos[0].manifest_path} ({info.field} vs {infos[0].field})")
  return infos[0].dim


def resolve_normalizer_path(config: Any) -> str:
  """``config.data.normalizer``, else the first train dataset's manifest ``normalizer`` file."""
  explicit = config.data.normalizer
  if explicit:
    if not os.path.exists(explicit):
      raise UserError(f"config.data.normalizer: {explicit!r} does not exist")
    return os.fspath(explicit)
  entries = _entries(config.data.train, "config.data.train")
  if not entries:
    raise UserError("config.data.normalizer is empty and config.data.train lists no dataset")
  info = _load_dataset(entries[0], "config.data.train[0]", None)
  with open(info.manifest_path) as f:
    name = json.load(f).get("normalizer")
  if not name:
    raise UserError(f"config.data.normalizer is empty and {info.manifest_path} field 'normalizer' "
                    "is not set: fit a normalizer (data_prep) or set config.data.normalizer")
  path = os.path.join(info.path, name)
  if not os.path.exists(path):
    raise UserError(f"{info.manifest_path}: field 'normalizer': {path} does not exist")
  return path


def make_train_iterator(config: Any, *, process_index: int | None = None,
                        process_count: int | None = None) -> TrainIterator:
  """The checkpointable, per-process training iterator (see the module docstring).

  ``process_index``/``process_count`` default to ``jax.process_index()``/``jax.process_count()``.
  With ``config.data.worker_count > 0`` every data shard (stream) of this process runs in its own
  ``worker_count`` Grain worker processes (``mp_prefetch``); absl flags must then be parsed and
  the script needs a ``__main__`` guard. The workers exit when this process dies, even by SIGKILL.
  """
  pi, pc = _process(process_index, process_count)
  _check_config(config, pc)
  d = config.data
  infos = _train_infos(config)
  num_shards = data_shards(config, pc)
  mine = range(pi * num_shards // pc, (pi + 1) * num_shards // pc)
  rows = int(d.global_batch_size) // num_shards
  streams = [_train_stream(config, infos, k, num_shards, rows) for k in mine]
  if int(d.worker_count) > 0:
    _require_parsed_flags()
    # Per stream, so that a stream's batches (and state) do not depend on how many streams share
    # a process: that is what lets a checkpoint resume on another process count.
    options = grain.MultiprocessingOptions(num_workers=int(d.worker_count),
                                           per_worker_buffer_size=int(d.worker_buffer_size))
    streams = [ds.mp_prefetch(options, worker_init_fn=exit_with_parent) for ds in streams]
  return TrainIterator([iter(ds) for ds in streams], list(mine), num_shards)


class TrainIterator(grain.DatasetIterator):
  """The batches of this process's data shards (streams), concatenated row-wise, in order.

  Its state is per data shard, so that the shards can be checkpointed and restored one by one
  (:mod:`lcm_jax.checkpoint` writes one file per data shard) by any process that runs them:

  * ``get_state()`` -> ``{"data_shards": K, "states": {"k": state of shard k, ...}}`` for this
    process's shards; ``set_state`` takes the same form (shards of other processes are ignored);
  * :attr:`data_shards` (this process's shard indices) and :attr:`num_data_shards` (``K``);
  * :meth:`set_process_state`: restores from the state that the previous, per-process iterator
    (a Grain zip of the streams) saved, for checkpoints written before the per-shard layout.
  """

  def __init__(self, streams: Sequence[grain.DatasetIterator], shards: Sequence[int],
               num_shards: int):
    super().__init__(list(streams))
    if len(streams) != len(shards) or not streams:
      raise ValueError(f"{len(streams)} streams for data shards {list(shards)}")
    self.data_shards = tuple(int(k) for k in shards)
    self.num_data_shards = int(num_shards)

  def __next__(self) -> Batch:
    self._assert_not_closed()
    batches = [next(it) for it in self._parents]  # StopIteration when a stream ends (num_epochs)
    return batches[0] if len(batches) == 1 else _concat_batches(batches)

  def get_state(self) -> dict[str, Any]:
    return {"data_shards": self.num_data_shards,
            "states": {str(k): it.get_state() for k, it in zip(self.data_shards, self._parents)}}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or "states" not in state:
      raise ValueError(f"not a {type(self).__name__} state (no 'states'): {str(state)[:200]}")
    if int(state.get("data_shards", -1)) != self.num_data_shards:
      raise ValueError(f"the state is for {state.get('data_shards')} data shards, this iterator "
                       f"has {self.num_data_shards}")
    missing = [k for k in self.data_shards if str(k) not in state["states"]]
    if missing:
      raise ValueError(f"the state has no data shard {missing} (it has "
                       f"{sorted(state['states'], key=int)})")
    for k, it in zip(self.data_shards, self._parents):
      it.set_state(state["states"][str(k)])

  def set_process_state(self, state: Any) -> None:
    """Restores from a state of the per-process iterator of earlier versions (same process count).

    That iterator was the process's only stream or, for several, ``zip(streams).map(concat)``
    whose state is ``{"parents": [stream states]}``; behind ``mp_prefetch`` the several streams
    were sliced together and cannot be split (ValueError).
    """
    if len(self._parents) == 1:
      self._parents[0].set_state(state)
      return
    parents = state.get("parents") if isinstance(state, dict) else None
    if not isinstance(parents, list) or len(parents) != len(self._parents):
      raise ValueError(f"cannot split a per-process data state into {len(self._parents)} data "
                       "shards (saved with config.data.worker_count > 0?)")
    for it, s in zip(self._parents, parents):
      it.set_state(s)

  def __str__(self) -> str:
    return (f"TrainIterator(data shards {list(self.data_shards)} of {self.num_data_shards})")


# Exit status of a Grain worker whose parent died (128 + SIGKILL, as if killed with it).
ORPHANED_WORKER_EXIT = 137


def exit_with_parent(worker_index: int = 0, worker_count: int = 1) -> None:
  """Grain ``worker_init_fn``: the worker process exits as soon as its parent process dies.

  A Grain worker blocks on its output queue forever once nobody reads it, so a SIGKILLed trainer
  would leave its workers running. Python's ``spawn`` gives every child the read end of a pipe
  whose write end only the parent holds (``multiprocessing.parent_process().sentinel``); it
  becomes readable when the parent is gone, however it died. A daemon thread waits on it and
  ends the worker with :func:`os._exit`. (``prctl(PR_SET_PDEATHSIG)`` would fire when the parent
  *thread* that started the worker exits, and Grain starts workers from short-lived threads.)
  """
  del worker_index, worker_count
  import multiprocessing  # pylint: disable=g-import-not-at-top
  import multiprocessing.connection  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  parent = multiprocessing.parent_process()
  sentinel = getattr(parent, "sentinel", None)
  if sentinel is None:  # not started by multiprocessing: nothing to watch
    return

  def watch():
    multiprocessing.connection.wait([sentinel])
    os._exit(ORPHANED_WORKER_EXIT)  # pylint: disable=protected-access

  threading.Thread(target=watch, name="lcm_jax-exit-with-parent", daemon=True).start()


def data_shards(config: Any, process_count: int) -> int:
  """The number of data shards (independent read/pack streams) of the global batch.

  ``config.data.data_shards`` (optional; 0 or missing = one per process). Shard ``k`` reads every
  ``K``-th document of each shuffled dataset and packs its own ``global_batch_size / K`` rows of
  every batch; process ``p`` of ``P`` runs shards ``p*K/P .. (p+1)*K/P - 1`` and their rows, in
  order, are its slice of the global batch. So the global batches depend on ``K`` only, not on
  how many processes share the work: a 2-process run and a 1-process run with the same ``K``
  train on identical batches.
  """
  k = int(_opt(config.data, "data_shards", 0)) or process_count
  g = int(config.data.global_batch_size)
  if k < 1:
    raise UserError(f"config.data.data_shards must be >= 0 (0 = one per process), got {k}")
  if k % process_count:
    raise UserError(f"config.data.data_shards={k} is not divisible by the process count "
                    f"({process_count}): every process must run the same number of data shards")
  if g % k:
    raise UserError(f"config.data.global_batch_size ({g}) is not divisible by "
                    f"config.data.data_shards ({k})")
  return k


def _train_stream(config: Any, infos: list[_DatasetInfo], shard: int, num_shards: int,
                  rows: int) -> grain.IterDataset:
  """Data shard ``shard`` of ``num_shards``: its documents, packed into batches of ``rows`` rows."""
  d = config.data
  hold_out = not _entries(d.eval, "config.data.eval") and float(d.eval_fraction) > 0
  num_epochs = None if d.num_epochs is None else int(d.num_epochs)
  parts = []
  for i, info in enumerate(infos):
    indices = np.arange(info.num_documents, dtype=np.int64)
    if hold_out:
      indices = indices[~eval_document_mask(info.num_documents, float(d.eval_fraction))]
    if indices.size == 0:
      raise UserError(f"{info.field}: all {info.num_documents} documents of {info.path} are held "
                      f"out for eval (config.data.eval_fraction={d.eval_fraction})")
    seed = int(np.random.SeedSequence([int(d.shuffle_seed), i]).generate_state(1)[0])
    ds = grain.MapDataset.source(indices).shuffle(seed=seed).repeat(num_epochs)
    ds = ds[shard::num_shards]
    if len(ds) == 0:
      raise UserError(f"{info.field}: {indices.size} training documents cannot feed "
                      f"{num_shards} data shards (processes or config.data.data_shards)")
    parts.append(ds.map(_ReadDocument(_open_source(info), info)))
  if len(parts) == 1:
    mixed = parts[0]
  else:
    total = sum(info.weight for info in infos)
    mixed = grain.MapDataset.mix(parts, [info.weight / total for info in infos])
  ds = mixed.to_iter_dataset(_read_options(config))
  ds = _pack(ds, config, _packing_bins(config, rows))
  return ds.batch(rows, batch_fn=functools.partial(_collate, batch_size=rows))


def _concat_batches(batches: tuple[Batch, ...]) -> Batch:
  return {k: np.concatenate([b[k] for b in batches], axis=0) for k in batches[0]}


def make_eval_iterator(config: Any, *, process_index: int | None = None,
                       process_count: int | None = None) -> grain.DatasetIterator:
  """A finite, deterministic (unshuffled) iterator over the held-out documents.

  Held out: every document of ``config.data.eval`` if it lists datasets, else the
  ``config.data.eval_fraction`` of each train dataset chosen by :func:`eval_document_mask`.
  Documents are packed globally (every process packs the same rows) and each process takes its
  ``B`` rows of every global batch, so all processes yield the same number of batches; the last
  batch is padded with all-zero rows.
  """
  pi, pc = _process(process_index, process_count)
  local_batch = _check_config(config, pc)
  d = config.data
  global_batch = local_batch * pc
  eval_entries = _entries(d.eval, "config.data.eval")
  dim = int(config.model.sonar_embed_dim)
  parts = []
  if eval_entries:
    for i, e in enumerate(eval_entries):
      info = _load_dataset(e, f"config.data.eval[{i}]", dim)
      indices = np.arange(info.num_documents, dtype=np.int64)
      parts.append((info, indices))
  else:
    if float(d.eval_fraction) <= 0:
      raise UserError("empty eval set: config.data.eval lists no dataset and "
                      "config.data.eval_fraction is 0")
    for info in _train_infos(config):
      indices = np.nonzero(eval_document_mask(info.num_documents, float(d.eval_fraction)))[0]
      if indices.size:
        parts.append((info, indices.astype(np.int64)))
  if not parts:
    raise UserError(f"empty eval set: config.data.eval_fraction={d.eval_fraction} holds out no "
                    "document of config.data.train; raise it or list config.data.eval datasets")
  datasets = [grain.MapDataset.source(idx).map(_ReadDocument(_open_source(info), info))
              for info, idx in parts]
  ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.concatenate(datasets)
  ds = _pack(ds.to_iter_dataset(_read_options(config)), config,
             _packing_bins(config, global_batch))
  ds = ds.batch(global_batch, batch_fn=functools.partial(
      _collate, batch_size=local_batch, row_start=pi * local_batch,
      row_stop=(pi + 1) * local_batch))
  return iter(ds)
