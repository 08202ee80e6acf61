"""The on-disk schema of embedding shards: one definition for every writer and reader.

A dataset is a directory holding
  * ``shard-XXXXX-of-YYYYY.array_record`` files, written with ``group_size:1`` (random access),
    one record per document;
  * ``manifest.json`` (see :func:`make_manifest`): dim, dtype, shard list with per-shard counts,
    totals and how the data was produced;
  * optionally ``normalizer.npz`` (see :mod:`lcm_jax.normalizer`).

A record is::

    b"LCMD" | uint8 version (=1) | uint32 LE header length H | H bytes UTF-8 JSON header | payload

with header ``{"id": str, "n": int, "dim": int, "dtype": "float16"|"float32", "texts": [str]*n?,
"source_len": int?}`` and payload the ``n x dim`` embedding matrix, C order, little endian, in
``dtype``.

``source_len`` marks a fine-tuning (source/target) document: its first ``source_len`` concepts are
the source (the prompt, ending with the "[MODEL]:" suffix sentence), the rest the target (ending with
"End of text."). Only target concepts are training targets. Absent = a pre-training document.

This module depends on numpy only, so the PyTorch side (``data_prep``) and the JAX side share it.
Errors are :class:`ShardFormatError` and name the file, the record index and the field.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import struct
import tempfile
from typing import IO, Any, Iterable, Sequence

import numpy as np

from lcm_jax.errors import UserError
from lcm_jax.fileio import write_file_atomic  # also re-exported: schema.write_file_atomic

MAGIC = b"LCMD"
VERSION = 1
_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
ALLOWED_DTYPES = ("float16", "float32")
DEFAULT_DTYPE = "float16"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "lcm_jax.embedding_shards"
SHARD_SUFFIX = ".array_record"
ARRAY_RECORD_OPTIONS = "group_size:1"


class ShardFormatError(UserError):
  """A shard, record or manifest violates the schema. The message names file, record and field."""


@dataclasses.dataclass
class Document:
  """One document: ``embeddings`` is (n, dim); ``texts`` optional, one sentence per concept;
  ``source_len`` optional: the first ``source_len`` concepts are a fine-tuning source."""

  id: str
  embeddings: np.ndarray
  texts: Sequence[str] | None = None
  source_len: int | None = None


def _check_source_len(source_len: Any, n: int, where: str) -> None:
  if (not isinstance(source_len, int) or isinstance(source_len, bool)
      or not 1 <= source_len < n):
    raise ShardFormatError(f"{where}: field 'source_len': {source_len!r} is not an int in "
                           f"[1, n-1] = [1, {n - 1}] (a source/target document needs at least one "
                           "concept on each side)")


def _where(path: str | None, index: int | None) -> str:
  parts = [str(path) if path is not None else "<bytes>"]
  if index is not None:
    parts.append(f"record {index}")
  return ": ".join(parts)


def encode_document(doc: Document, dtype: str = DEFAULT_DTYPE) -> bytes:
  """Serialises a document. Validates shape, dtype, finiteness and text count."""
  where = f"document {doc.id!r}"
  if dtype not in ALLOWED_DTYPES:
    raise ShardFormatError(f"{where}: field 'dtype': {dtype!r} not in {ALLOWED_DTYPES}")
  emb = np.asarray(doc.embeddings)
  if emb.ndim != 2:
    raise ShardFormatError(f"{where}: field 'embeddings': expected (n, dim), got shape {emb.shape}")
  if emb.shape[0] == 0:
    raise ShardFormatError(f"{where}: field 'embeddings': empty document (0 concepts)")
  emb = emb.astype(dtype)
  if not np.isfinite(emb).all():
    bad = int(np.argwhere(~np.isfinite(emb))[0][0])
    raise ShardFormatError(
        f"{where}: field 'embeddings': non-finite value at concept {bad} (after cast to {dtype})")
  header: dict[str, Any] = {"id": str(doc.id), "n": int(emb.shape[0]), "dim": int(emb.shape[1]),
                            "dtype": dtype}
  if doc.texts is not None:
    texts = [str(t) for t in doc.texts]
    if len(texts) != emb.shape[0]:
      raise ShardFormatError(
          f"{where}: field 'texts': {len(texts)} texts for {emb.shape[0]} concepts")
    header["texts"] = texts
  if doc.source_len is not None:
    _check_source_len(doc.source_len, int(emb.shape[0]), where)
    header["source_len"] = int(doc.source_len)
  hbytes = json.dumps(header, ensure_ascii=False).encode("utf-8")
  return _PREFIX.pack(MAGIC, VERSION, len(hbytes)) + hbytes + emb.astype(emb.dtype.newbyteorder("<")).tobytes()


def decode_document(data: bytes, *, path: str | None = None, index: int | None = None,
                    expected_dim: int | None = None, check_finite: bool = True) -> Document:
  """Parses one record; raises :class:`ShardFormatError` naming ``path``/``index``/field."""
  where = _where(path, index)
  if len(data) < _PREFIX.size:
    raise ShardFormatError(f"{where}: field 'header': record too short ({len(data)} bytes)")
  magic, version, hlen = _PREFIX.unpack_from(data, 0)
  if magic != MAGIC:
    raise ShardFormatError(f"{where}: field 'magic': expected {MAGIC!r}, got {magic!r} "
                           "(not an lcm_jax shard, or corrupt)")
  if version != VERSION:
    raise ShardFormatError(f"{where}: field 'version': unsupported version {version}")
  start = _PREFIX.size
  if start + hlen > len(data):
    raise ShardFormatError(f"{where}: field 'header': truncated ({len(data)} bytes, header "
                           f"claims {hlen})")
  try:
    header = json.loads(data[start:start + hlen].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ShardFormatError(f"{where}: field 'header': not valid JSON ({e})") from None
  for key in ("id", "n", "dim", "dtype"):
    if key not in header:
      raise ShardFormatError(f"{where}: field '{key}': missing from header")
  n, dim, dtype = header["n"], header["dim"], header["dtype"]
  where = f"{where} (document {header['id']!r})"
  if dtype not in ALLOWED_DTYPES:
    raise ShardFormatError(f"{where}: field 'dtype': {dtype!r} not in {ALLOWED_DTYPES}")
  if not isinstance(n, int) or n <= 0:
    raise ShardFormatError(f"{where}: field 'embeddings': empty document (n={n})")
  if expected_dim is not None and dim != expected_dim:
    raise ShardFormatError(
        f"{where}: field 'embeddings': dim {dim} != expected {expected_dim}")
  payload = memoryview(data)[start + hlen:]
  itemsize = np.dtype(dtype).itemsize
  if len(payload) != n * dim * itemsize:
    raise ShardFormatError(f"{where}: field 'embeddings': payload has {len(payload)} bytes, "
                           f"expected {n}x{dim}x{itemsize}={n * dim * itemsize} (truncated?)")
  emb = np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder("<")).reshape(n, dim)
  if check_finite and not np.isfinite(emb).all():
    bad = int(np.argwhere(~np.isfinite(emb))[0][0])
    raise ShardFormatError(f"{where}: field 'embeddings': non-finite value (NaN/inf) at concept {bad}")
  texts = header.get("texts")
  if texts is not None and len(texts) != n:
    raise ShardFormatError(f"{where}: field 'texts': {len(texts)} texts for {n} concepts")
  source_len = header.get("source_len")
  if source_len is not None:
    _check_source_len(source_len, n, where)
  return Document(id=header["id"], embeddings=emb, texts=texts, source_len=source_len)


def shard_name(index: int, count: int, prefix: str = "shard") -> str:
  return f"{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def _tmp_path(path: str) -> str:
  d, base = os.path.split(os.path.abspath(path))
  return os.path.join(d, f".tmp-{os.getpid()}-{base}")


def write_shard(path: str, docs: Iterable[Document], dtype: str = DEFAULT_DTYPE) -> dict[str, Any]:
  """Writes documents to ``path`` atomically (temporary name, then rename).

  Returns the manifest entry ``{"file", "num_documents", "num_concepts"}``. On any error the
  temporary file is removed and ``path`` is untouched.
  """
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  tmp = _tmp_path(path)
  num_docs = num_concepts = 0
  writer = ArrayRecordWriter(tmp, ARRAY_RECORD_OPTIONS)
  try:
    for doc in docs:
      writer.write(encode_document(doc, dtype))
      num_docs += 1
      num_concepts += int(np.shape(doc.embeddings)[0])
    writer.close()
    writer = None
    os.replace(tmp, path)
  except BaseException:
    if writer is not None:
      writer.close()
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return {"file": os.path.basename(path), "num_documents": num_docs, "num_concepts": num_concepts}


def read_shard(path: str, expected_dim: int | None = None) -> list[Document]:
  """Reads every document of one shard (for tools and tests; training reads through Grain)."""
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise ShardFormatError(f"{path}: no such shard file")
  try:
    reader = ArrayRecordReader(path)
  except Exception as e:  # array_record raises RuntimeError/ValueError on corrupt files.
    raise ShardFormatError(f"{path}: cannot open as ArrayRecord ({e})") from None
  try:
    n = reader.num_records()
    out = []
    for i in range(n):
      try:
        raw = reader.read([i])[0]
      except Exception as e:
        raise ShardFormatError(f"{path}: record {i}: cannot read ({e}); truncated or corrupt shard") from None
      out.append(decode_document(raw, path=path, index=i, expected_dim=expected_dim))
    return out
  finally:
    reader.close()


def write_json_atomic(path: str, obj: Any) -> None:
  def write(f: IO[Any]) -> None:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  write_file_atomic(path, write, suffix=".json")


def move_dir_into_place(tmp: str, out: str, overwrite: bool = True) -> None:
  """Renames a finished temporary directory ``tmp`` to ``out``: the last step of every tool that
  builds a directory privately so that a failure leaves nothing half-written. An empty ``out`` is
  replaced; a non-empty one only with ``overwrite`` (ValueError otherwise)."""
  if os.path.isdir(out) and not os.listdir(out):
    os.rmdir(out)
  elif os.path.exists(out):
    if not overwrite:
      raise UserError(f"{out} appeared while it was being built (overwrite to replace it)")
    trash = tempfile.mkdtemp(prefix=f".old-{os.path.basename(out)}-", dir=os.path.dirname(out))
    os.rename(out, os.path.join(trash, "old"))
    os.rename(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)
    return
  os.rename(tmp, out)


def make_manifest(*, dim: int, dtype: str, shards: Sequence[dict[str, Any]], producer: dict[str, Any],
                  has_texts: bool = False, normalizer: str | None = None) -> dict[str, Any]:
  """Builds a manifest dict. ``shards`` are :func:`write_shard` return values."""
  return {
      "format": MANIFEST_FORMAT,
      "version": VERSION,
      "dim": int(dim),
      "dtype": dtype,
      "has_texts": bool(has_texts),
      "shards": list(shards),
      "num_documents": int(sum(s["num_documents"] for s in shards)),
      "num_concepts": int(sum(s["num_concepts"] for s in shards)),
      "normalizer": normalizer,
      "producer": dict(producer, created=datetime.datetime.now(datetime.timezone.utc).isoformat()),
  }


def write_manifest(data_dir: str, manifest: dict[str, Any]) -> str:
  path = os.path.join(data_dir, MANIFEST_NAME)
  write_json_atomic(path, manifest)
  return path


def read_manifest(data_dir: str) -> dict[str, Any]:
  """Reads and validates ``DIR/manifest.json``; checks that every listed shard exists."""
  path = os.path.join(data_dir, MANIFEST_NAME)
  if not os.path.isdir(data_dir):
    raise ShardFormatError(f"{data_dir}: dataset directory does not exist")
  if not os.path.exists(path):
    raise ShardFormatError(f"{path}: missing manifest (is {data_dir} an lcm_jax dataset?)")
  try:
    with open(path) as f:
      m = json.load(f)
  except json.JSONDecodeError as e:
    raise ShardFormatError(f"{path}: not valid JSON ({e})") from None
  for key in ("format", "dim", "dtype", "shards", "num_documents", "num_concepts"):
    if key not in m:
      raise ShardFormatError(f"{path}: field '{key}': missing")
  if m["format"] != MANIFEST_FORMAT:
    raise ShardFormatError(f"{path}: field 'format': {m['format']!r} != {MANIFEST_FORMAT!r}")
  if m["dtype"] not in ALLOWED_DTYPES:
    raise ShardFormatError(f"{path}: field 'dtype': {m['dtype']!r} not in {ALLOWED_DTYPES}")
  if not m["shards"]:
    raise ShardFormatError(f"{path}: field 'shards': empty dataset")
  for i, s in enumerate(m["shards"]):
    f = os.path.join(data_dir, s["file"])
    if not os.path.exists(f):
      raise ShardFormatError(f"{path}: field 'shards[{i}].file': {f} does not exist")
  return m


def shard_paths(data_dir: str, manifest: dict[str, Any] | None = None) -> list[str]:
  manifest = manifest or read_manifest(data_dir)
  return [os.path.join(data_dir, s["file"]) for s in manifest["shards"]]
