"""Raw text inputs of the embedding job: documents from text, JSONL, Parquet and TFDS sources.

The embedding job (:mod:`data_prep.embed`) plans its shards over one GLOBAL document sequence: the
sources in the order :func:`open_sources` returns them, the documents of each source in source
order; a shard is a consecutive range of that sequence. Every worker computes the same plan, so a
source gives its document count and per-document sizes cheaply, without parsing its documents, and
reads any document range directly:

* :meth:`Source.num_docs` / :meth:`Source.doc_sizes`: counts and sizes (bytes; planning weights
  for shard-by-bytes plans). Line-based files: one vectorized pass over the bytes (no JSON parsing)
  finds the line offsets, which are kept, so :meth:`Source.read` seeks straight to a range. Parquet
  and TFDS: counts from metadata; sizes estimated from metadata unless ``exact_sizes``.
* :meth:`Source.read` ``(start, end)``: documents ``[start, end)`` of the source, as
  :class:`RawDoc` (``text``, or ``source``/``target`` for fine-tuning pairs).
* :meth:`Source.fingerprint`: path, size and mtime (or row/example counts), to detect inputs that
  changed between two runs of a job.

Formats (``fmt="auto"`` picks one from the extension or the ``tfds:`` prefix):

* ``text`` (.txt .text .md): one document per file (``text_unit="file"``, the default), per
  non-blank line (``"line"``) or per blank-line separated paragraph (``"paragraph"``); the text is
  stripped of surrounding whitespace and CRLF line ends become LF.
* ``jsonl`` (.jsonl .json): one document per non-blank line, each a JSON object.
* ``parquet`` (.parquet): one document per row.
* ``tfds`` (``tfds:NAME[/CONFIG][:VERSION]:SPLIT``, e.g. ``tfds:wikipedia/20230601.en:train`` or
  ``tfds:wikipedia/20230601.en:train[:10%]``): one document per example, via ``tfds.data_source``.

Fields (JSONL keys, Parquet columns, TFDS features): ``text_field`` (default ``text``), or
``source_field`` + ``target_field`` for fine-tuning pairs; ``id_field`` (default ``id``; when
absent the id is ``"<basename>:<line>"``, ``"<basename>:<row>"`` or ``"NAME:SPLIT[i]"``; a plain
text file read whole has its path as id). A dotted name (``meta.id``) reaches into nested objects /
struct columns / nested features when no top-level field has that exact name.

Document ids are unique within a dataset. Derived ids stay unique across files: when several
inputs share a basename (``en/part-0.jsonl`` and ``fr/part-0.jsonl``), those files use their path
relative to their common directory instead (``en/part-0.jsonl:3``). Ids taken from the data are
checked by :func:`check_unique_ids`, which the embedding job runs over the whole global sequence
before it writes anything; a duplicate raises :class:`InputError` naming the id and both records.

TFDS without TensorFlow: ``tfds.data_source`` reads datasets prepared in the ``array_record``
format (random access, no TensorFlow), and such a dataset can also be *prepared* without
TensorFlow (``builder.download_and_prepare()`` with ``file_format="array_record"``). Datasets
prepared as ``tfrecord`` (the TFDS default) need TensorFlow to read; convert them once
(``tfds convert_format --out_file_format=array_record``, which needs TensorFlow) or re-prepare.
Nothing is downloaded or prepared here (``download=False``).

Errors: :class:`InputError` (a :class:`lcm_jax.errors.UserError`), naming the file, the line
(1-based) or row (0-based) and the field. Other exceptions are bugs.
File-level problems (a missing path, a glob matching nothing, an empty file, an unreadable Parquet
file, a missing column) always raise. Problems of one document (a missing or non-string field, an
empty text, invalid UTF-8, invalid JSON) raise with ``on_error="raise"`` (the default); with
``on_error="skip"`` the document is left out, one warning line is logged, and
:attr:`Source.num_skipped` counts it (the total over a job is the sum over its sources).

Language: each source carries a language code (``RawDoc.lang``, for the segmenter and the SONAR
encoder): ``lang`` by default, or per input with a ``@LANG`` suffix
(``data/fr/*.jsonl@fra_Latn``, ``tfds:wikipedia/20230601.fr:train@fra_Latn``).
"""

from __future__ import annotations

import array
import copy
import dataclasses
import glob
import json
import logging
import os
import re
from typing import Any, Iterator, Sequence

import numpy as np

from lcm_jax.errors import UserError

logger = logging.getLogger(__name__)

FORMATS = ("text", "jsonl", "parquet", "tfds")
TEXT_UNITS = ("file", "line", "paragraph")
ON_ERROR = ("raise", "skip")
_QUIET = "quiet"  # internal: bad documents passed over without a word (check_unique_ids)
EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl",
              ".json": "jsonl", ".parquet": "parquet"}
TFDS_PREFIX = "tfds:"
DEFAULT_LANG = "eng_Latn"
# A ``@LANG`` suffix: FLORES-200 / SONAR codes (eng_Latn, zho_Hans), or a bare ISO code (en, fra).
_LANG_RE = re.compile(r"^[a-z]{2,3}(_[A-Z][a-z]{3})?$")
# NAME[/CONFIG][:VERSION]:SPLIT; the split may hold colons itself (train[10:20]).
_TFDS_SPEC_RE = re.compile(r"^([^:\[\]]+(?::\d+(?:\.\d+)*)?):([^:].*)$")
_GLOB_CHARS = re.compile(r"[*?\[]")
_BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 24  # bytes per block of the line scan and of range reads
_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True  # \t \n \v \f \r space
_NOT_WHITESPACE = ~_WHITESPACE


class InputError(UserError):
  """Bad input. The message names the file (or TFDS dataset), the line/row and the field."""


@dataclasses.dataclass
class RawDoc:
  """One input document before segmentation.

  Attributes:
    id: document id (from ``id_field``, else derived from the file and line/row).
    text: the text of a pre-training document; None for a fine-tuning pair.
    source: the prompt of a fine-tuning pair (``source_field``), else None.
    target: the answer of a fine-tuning pair (``target_field``), else None.
    where: where it came from, e.g. ``"data/a.jsonl:line 17"``, ``"data/b.parquet:row 3"``,
      ``"tfds wikipedia/20230601.en:train[42]"``.
    lang: language code for the segmenter and encoder, e.g. ``"eng_Latn"``.
  """

  id: str
  text: str | None
  source: str | None
  target: str | None
  where: str
  lang: str

  @property
  def is_pair(self) -> bool:
    """Whether this is a fine-tuning (source, target) pair."""
    return self.source is not None


@dataclasses.dataclass(frozen=True)
class Fields:
  """Which fields hold a document's content and id."""

  text: str = "text"
  id: str | None = "id"
  source: str | None = None
  target: str | None = None

  def __post_init__(self) -> None:
    if (self.source is None) != (self.target is None):
      raise InputError("source_field and target_field go together (fine-tuning pairs): got "
                       f"source_field={self.source!r}, target_field={self.target!r}")

  @property
  def is_pair(self) -> bool:
    return self.source is not None

  @property
  def content(self) -> tuple[str, ...]:
    """The fields that hold text: ``(source, target)`` for pairs, else ``(text,)``."""
    if self.is_pair:
      return (self.source, self.target)  # type: ignore[return-value]
    return (self.text,)


class _DocError(Exception):
  """One document is bad (``on_error`` decides); carries the full message."""


# ---------------------------------------------------------------------------------------------
# The common interface


class Source:
  """A sequence of documents: counts and sizes up front, random access by index range.

  Attributes:
    name: the input as the user named it (a path from the expanded glob, or ``tfds:...``).
    lang: language code given to every document.
    on_error: ``"raise"`` or ``"skip"`` for problems of individual documents.
    num_skipped: documents skipped so far by :meth:`read` in this process (``on_error="skip"``).
  """

  format: str = ""

  def __init__(self, name: str, *, fields: Fields, lang: str, on_error: str) -> None:
    if on_error not in ON_ERROR:
      raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    self.name = name
    self.fields = fields
    self.lang = lang
    self.on_error = on_error
    self.num_skipped = 0
    # The prefix of derived ids ("<prefix>:<line>"); open_sources makes it unique across files.
    self.id_prefix = os.path.basename(name)

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r}, lang={self.lang!r})"

  def __len__(self) -> int:
    return self.num_docs()

  def num_docs(self) -> int:
    """Number of documents (skipped ones included: they have an index like any other)."""
    raise NotImplementedError

  def doc_sizes(self) -> np.ndarray:
    """(num_docs,) int64 per-document input sizes in bytes, for shard-by-bytes planning."""
    raise NotImplementedError

  def fingerprint(self) -> dict[str, Any]:
    """A JSON-able description that changes when the input changes (path, size, mtime, ...)."""
    raise NotImplementedError

  def read(self, start: int = 0, end: int | None = None) -> Iterator[RawDoc]:
    """Yields documents ``[start, end)`` (default: all) in source order.

    Bad documents raise :class:`InputError` (``on_error="raise"``) or are left out, logged and
    counted in :attr:`num_skipped` (``on_error="skip"``); so with skipping, fewer than
    ``end - start`` documents may come out.
    """
    n = self.num_docs()
    end = n if end is None else end
    if not 0 <= start <= end <= n:
      raise ValueError(f"{self.name}: read range [{start}, {end}) is outside [0, {n}]")
    return self._read(start, end)

  def _read(self, start: int, end: int) -> Iterator[RawDoc]:
    raise NotImplementedError

  def _skip_or_raise(self, err: _DocError) -> None:
    if self.on_error == _QUIET:  # check_unique_ids' pass: read() reports the document later
      return
    if self.on_error == "raise":
      raise InputError(str(err)) from None
    self.num_skipped += 1
    logger.warning("skipping document: %s", err)

  def _content(self, get: Any, where: str) -> tuple[str | None, str | None, str | None]:
    """``(text, source, target)`` from ``get(field) -> (found, value)``; raises _DocError."""
    values = []
    for field in self.fields.content:
      found, value = get(field)
      if not found or value is None:
        raise _DocError(f"{where}: field '{field}': missing" + ("" if not found else " (null)"))
      if isinstance(value, bytes):
        value = _decode(value, f"{where}: field '{field}'")
      if not isinstance(value, str):
        raise _DocError(f"{where}: field '{field}': expected a string, got "
                        f"{type(value).__name__}")
      if not value or value.isspace():
        raise _DocError(f"{where}: field '{field}': empty text")
      values.append(value)
    if self.fields.is_pair:
      return None, values[0], values[1]
    return values[0], None, None

  def _id(self, get: Any, where: str, default: str) -> str:
    if self.fields.id is None:
      return default
    found, value = get(self.fields.id)
    if not found or value is None:
      return default
    if isinstance(value, bytes):
      value = _decode(value, f"{where}: field '{self.fields.id}'")
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
      return str(int(value))
    if not isinstance(value, str):
      raise _DocError(f"{where}: field '{self.fields.id}': expected a string or an integer id, "
                      f"got {type(value).__name__}")
    return value


def _decode(raw: bytes, where: str, file_offset: int | None = None) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    at = f"byte offset {file_offset + e.start} in the file" if file_offset is not None else \
        f"byte {e.start}"
    raise _DocError(f"{where}: invalid UTF-8 at {at} ({raw[e.start:e.start + 4]!r}...)") from None


def _file_fingerprint(path: str, **extra: Any) -> dict[str, Any]:
  st = os.stat(path)
  return {"path": os.path.abspath(path), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns),
          **extra}


def _lookup(obj: Any, field: str) -> tuple[bool, Any]:
  """``(found, value)`` of ``field`` in a dict, the dotted path (``meta.id``) if not a key."""
  if isinstance(obj, dict) and field in obj:
    return True, obj[field]
  if "." not in field:
    return False, None
  cur = obj
  for part in field.split("."):
    if not isinstance(cur, dict) or part not in cur:
      return False, None
    cur = cur[part]
  return True, cur


# ---------------------------------------------------------------------------------------------
# Line-based files: plain text and JSONL


def _scan_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """One pass over the file's bytes, block by block, without decoding anything.

  Returns, for every NON-BLANK line (a blank line holds only ASCII whitespace): its start offset,
  its end offset (excluding the ``\\n``), its 1-based line number, and whether the line before it
  is blank (or absent): the start of a paragraph.
  """
  starts, ends, linenos, para = [], [], [], []
  base = 0          # file offset of data[0]
  next_lineno = 1   # line number of the first line in data
  prev_blank = True
  carry = b""
  with open(path, "rb") as f:
    while True:
      block = f.read(_CHUNK)
      data = carry + block if carry else block
      if block:
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # no complete line yet: keep reading
          carry = data
          continue
      else:
        cut = len(data)
      if cut:
        arr = np.frombuffer(data, np.uint8, count=cut)
        line_ends = np.flatnonzero(arr == 10) + 1
        if not len(line_ends) or line_ends[-1] != cut:
          line_ends = np.append(line_ends, cut)  # last line of the file, without "\n"
        line_starts = np.concatenate([[0], line_ends[:-1]])
        blank = np.add.reduceat(_NOT_WHITESPACE[arr], line_starts, dtype=np.int64) == 0
        keep = ~blank
        before_blank = np.concatenate([[prev_blank], blank[:-1]])
        content_ends = line_ends - (arr[line_ends - 1] == 10)
        starts.append(base + line_starts[keep])
        ends.append(base + content_ends[keep])
        linenos.append(next_lineno + np.flatnonzero(keep))
        para.append(before_blank[keep])
        prev_blank = bool(blank[-1])
        next_lineno += len(line_starts)
        base += cut
      carry = data[cut:]
      if not block:
        break
  cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
  return (cat(starts, np.int64), cat(ends, np.int64), cat(linenos, np.int64), cat(para, bool))


class _LineBasedSource(Source):
  """Documents are byte spans of one file, found by :func:`_scan_lines` and kept as offsets."""

  def __init__(self, path: str, **kwargs: Any) -> None:
    super().__init__(path, **kwargs)
    self.path = path
    self._spans: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # starts, ends, lines
    if not os.path.isfile(path):
      raise InputError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
      raise InputError(f"{path}: empty file (0 bytes, zero documents)")

  def _unit(self) -> str:
    raise NotImplementedError

  def _index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if self._spans is None:
      starts, ends, linenos, para = _scan_lines(self.path)
      if self._unit() == "paragraph":
        first = np.flatnonzero(para)
        last = np.concatenate([first[1:] - 1, [len(starts) - 1]]) if len(first) else first
        starts, ends, linenos = starts[first], ends[last], linenos[first]
      if not len(starts):
        raise InputError(f"{self.path}: zero documents (the file holds only blank lines)")
      self._spans = (starts, ends, linenos)
    return self._spans

  def num_docs(self) -> int:
    return int(len(self._index()[0]))

  def doc_sizes(self) -> np.ndarray:
    """Bytes of each document's span in the file (line or paragraph, without the last ``\\n``)."""
    starts, ends, _ = self._index()
    return (ends - starts).astype(np.int64)

  def fingerprint(self) -> dict[str, Any]:
    return _file_fingerprint(self.path, format=self.format, unit=self._unit())

  def _read(self, start: int, end: int) -> Iterator[RawDoc]:
    starts, ends, linenos = self._index()
    with open(self.path, "rb") as f:
      i = start
      while i < end:
        # One read per block of consecutive documents (~_CHUNK bytes, at least one document).
        j = int(np.searchsorted(starts, starts[i] + _CHUNK, side="left"))
        j = min(end, max(j, i + 1))
        lo = int(starts[i])
        f.seek(lo)
        buf = f.read(int(ends[j - 1]) - lo)
        for off, stop, lineno in zip(starts[i:j].tolist(), ends[i:j].tolist(),
                                     linenos[i:j].tolist()):
          raw = buf[off - lo:stop - lo]
          if off == 0 and raw.startswith(_BOM):
            raw, off = raw[3:], 3
          try:
            yield self._parse(raw, off, lineno)
          except _DocError as e:
            self._skip_or_raise(e)
        i = j

  def _parse(self, raw: bytes, offset: int, lineno: int) -> RawDoc:
    raise NotImplementedError


class TextSource(_LineBasedSource):
  """Plain UTF-8 text: one document per file, per non-blank line, or per paragraph."""

  format = "text"

  def __init__(self, path: str, *, text_unit: str = "file", **kwargs: Any) -> None:
    if text_unit not in TEXT_UNITS:
      raise InputError(f"{path}: text_unit must be one of {TEXT_UNITS}, got {text_unit!r}")
    self.text_unit = text_unit
    super().__init__(path, **kwargs)
    if self.fields.is_pair:
      raise InputError(f"{path}: plain text has no fields; source/target pairs need JSONL, "
                       "Parquet or TFDS input")

  def _unit(self) -> str:
    return self.text_unit

  def _index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if self.text_unit != "file":
      return super()._index()
    if self._spans is None:  # The whole file is one document: no scan needed.
      size = os.path.getsize(self.path)
      self._spans = (np.zeros(1, np.int64), np.full(1, size, np.int64), np.ones(1, np.int64))
    return self._spans

  def _parse(self, raw: bytes, offset: int, lineno: int) -> RawDoc:
    base = self.id_prefix
    if self.text_unit == "file":
      where, doc_id = self.path, self.path
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        bad_line = raw.count(b"\n", 0, e.start) + 1
        raise _DocError(f"{self.path}:line {bad_line}: invalid UTF-8 at byte offset "
                        f"{offset + e.start} in the file ({raw[e.start:e.start + 4]!r}...)"
                        ) from None
    else:
      where, doc_id = f"{self.path}:line {lineno}", f"{base}:{lineno}"
      text = _decode(raw, where, offset)
    text = text.strip().replace("\r\n", "\n")
    if not text:
      raise _DocError(f"{where}: empty text (whitespace only)")
    return RawDoc(id=doc_id, text=text, source=None, target=None, where=where, lang=self.lang)


class JsonlSource(_LineBasedSource):
  """JSON Lines: one JSON object per non-blank line."""

  format = "jsonl"

  def _unit(self) -> str:
    return "line"

  def _parse(self, raw: bytes, offset: int, lineno: int) -> RawDoc:
    where = f"{self.path}:line {lineno}"
    line = _decode(raw, where, offset)
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise _DocError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
      raise _DocError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    fields = self.fields
    if not fields.is_pair:  # The common case, without the generic field machinery.
      text = obj.get(fields.text)
      doc_id = obj.get(fields.id) if fields.id is not None else None
      if type(text) is str and text and not text.isspace() and type(doc_id) is str:
        return RawDoc(id=doc_id, text=text, source=None, target=None, where=where, lang=self.lang)
    get = lambda field: _lookup(obj, field)
    text, source, target = self._content(get, where)
    doc_id = self._id(get, where, f"{self.id_prefix}:{lineno}")
    return RawDoc(id=doc_id, text=text, source=source, target=target, where=where, lang=self.lang)


# ---------------------------------------------------------------------------------------------
# Parquet


def _arrow_field_path(schema: Any, field: str) -> list[str] | None:
  """The column path of ``field`` (a top-level name, else a dotted path through structs)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  if field in schema.names:
    return [field]
  if "." not in field:
    return None
  parts = field.split(".")
  if parts[0] not in schema.names:
    return None
  t = schema.field(parts[0]).type
  for part in parts[1:]:
    if not pa.types.is_struct(t) or t.get_field_index(part) < 0:
      return None
    t = t.field(part).type
  return parts


def _arrow_type_at(schema: Any, path: list[str]) -> Any:
  t = schema.field(path[0]).type
  for part in path[1:]:
    t = t.field(part).type
  return t


class ParquetSource(Source):
  """Parquet: one document per row; counts from the metadata, reads by row group."""

  format = "parquet"

  def __init__(self, path: str, *, exact_sizes: bool = False, **kwargs: Any) -> None:
    super().__init__(path, **kwargs)
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    self.path = path
    self.exact_sizes = exact_sizes
    if not os.path.isfile(path):
      raise InputError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
      raise InputError(f"{path}: empty file (0 bytes, zero documents)")
    try:
      pf = pq.ParquetFile(path)
      meta = pf.metadata
      schema = pf.schema_arrow
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on corrupt or foreign files
      raise InputError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    self._rows_per_group = np.array(
        [meta.row_group(g).num_rows for g in range(meta.num_row_groups)], np.int64)
    self._group_ends = np.cumsum(self._rows_per_group)
    self._num_rows = int(meta.num_rows)
    if self._num_rows == 0:
      raise InputError(f"{path}: zero documents (the Parquet file has no rows)")
    self._paths: dict[str, list[str]] = {}
    for field in self.fields.content:
      p = _arrow_field_path(schema, field)
      if p is None:
        raise InputError(f"{path}: field '{field}': no such column (columns: "
                         f"{', '.join(schema.names)})")
      t = _arrow_type_at(schema, p)
      if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
              or pa.types.is_large_binary(t) or pa.types.is_string_view(t)
              or pa.types.is_binary_view(t)):
        raise InputError(f"{path}: field '{field}': expected a string column, got {t}")
      self._paths[field] = p
    if self.fields.id is not None:
      p = _arrow_field_path(schema, self.fields.id)
      if p is not None:
        self._paths[self.fields.id] = p
    self._columns = sorted({p[0] for p in self._paths.values()})
    self._meta = meta
    self._cache: tuple[int, dict[str, Any]] | None = None  # (row group, arrow columns)

  def num_docs(self) -> int:
    return self._num_rows

  def doc_sizes(self) -> np.ndarray:
    """Bytes of the text (or source + target) per row.

    ``exact_sizes=False`` (default): from the metadata only, each row group's uncompressed size of
    those columns spread evenly over its rows. ``exact_sizes=True``: the UTF-8 byte lengths,
    reading those columns (nulls count 0).
    """
    import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    content = [".".join(self._paths[f]) for f in self.fields.content]
    out = np.zeros(self._num_rows, np.int64)
    pos = 0
    pf = pq.ParquetFile(self.path) if self.exact_sizes else None
    content_columns = sorted({self._paths[f][0] for f in self.fields.content})
    for g, rows in enumerate(self._rows_per_group):
      rows = int(rows)
      if pf is not None:
        table = pf.read_row_group(g, columns=content_columns)
        for field in self.fields.content:
          lengths = pc.binary_length(self._column(table, self._paths[field])).fill_null(0)
          out[pos:pos + rows] += lengths.to_numpy().astype(np.int64)
      elif rows:
        rg = self._meta.row_group(g)
        total = sum(rg.column(c).total_uncompressed_size for c in range(rg.num_columns)
                    if rg.column(c).path_in_schema in content)
        out[pos:pos + rows] = total // rows
        out[pos:pos + total % rows] += 1
      pos += rows
    return out

  def fingerprint(self) -> dict[str, Any]:
    return _file_fingerprint(self.path, format=self.format, num_rows=self._num_rows)

  @staticmethod
  def _column(table: Any, path: list[str]) -> Any:
    import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top
    col = table.column(path[0])
    return pc.struct_field(col, path[1:]) if len(path) > 1 else col

  def _group(self, g: int) -> dict[str, Any]:
    """Arrow arrays of the needed columns of row group ``g`` (the last one read is cached)."""
    if self._cache is None or self._cache[0] != g:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
      try:
        table = pq.ParquetFile(self.path).read_row_group(g, columns=self._columns)
      except Exception as e:
        raise InputError(f"{self.path}: row group {g}: cannot read ({type(e).__name__}: {e}); "
                         "corrupt or truncated Parquet file") from None
      self._cache = (g, {f: self._column(table, p) for f, p in self._paths.items()})
    return self._cache[1]

  def _read(self, start: int, end: int) -> Iterator[RawDoc]:
    base = self.id_prefix
    row = start
    while row < end:
      g = int(np.searchsorted(self._group_ends, row, side="right"))
      g_start = int(self._group_ends[g] - self._rows_per_group[g])
      g_end = min(end, int(self._group_ends[g]))
      cols = {f: c.slice(row - g_start, g_end - row).to_pylist()
              for f, c in self._group(g).items()}
      for r in range(row, g_end):
        i = r - row
        where = f"{self.path}:row {r}"
        get = lambda field: (field in cols, cols[field][i] if field in cols else None)
        try:
          text, source, target = self._content(get, where)
          doc_id = self._id(get, where, f"{base}:{r}")
        except _DocError as e:
          self._skip_or_raise(e)
          continue
        yield RawDoc(id=doc_id, text=text, source=source, target=target, where=where,
                     lang=self.lang)
      row = g_end


# ---------------------------------------------------------------------------------------------
# TFDS


def _tfds_feature(features: Any, field: str) -> Any:
  """The feature at ``field`` (a top-level key, else a dotted path), or None."""
  try:
    if field in features.keys():
      return features[field]
  except AttributeError:
    return None
  if "." not in field:
    return None
  cur = features
  for part in field.split("."):
    if not hasattr(cur, "keys") or part not in cur.keys():
      return None
    cur = cur[part]
  return cur


class TfdsSource(Source):
  """A TFDS split prepared as array_record, read with ``tfds.data_source`` (no TensorFlow)."""

  format = "tfds"

  def __init__(self, spec: str, *, data_dir: str | None = None, exact_sizes: bool = False,
               **kwargs: Any) -> None:
    super().__init__(spec, **kwargs)
    body = spec[len(TFDS_PREFIX):] if spec.startswith(TFDS_PREFIX) else spec
    m = _TFDS_SPEC_RE.match(body)
    if not m:
      raise InputError(f"{spec}: expected tfds:NAME[/CONFIG][:VERSION]:SPLIT, e.g. "
                       "tfds:wikipedia/20230601.en:train")
    name, split = m.groups()
    self.dataset, self.split = name, split
    self.data_dir = data_dir
    self.exact_sizes = exact_sizes
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise InputError(f"{spec}: TFDS input needs tensorflow-datasets ({e})") from None
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # DatasetNotFoundError, unknown split, tfrecord-only dataset, ...
      first = str(e).strip().splitlines()[0] if str(e).strip() else ""
      hint = ""
      if "tensorflow" in str(e).lower() or "tfrecord" in str(e).lower():
        hint = (" (tfds.data_source needs a dataset prepared with file_format='array_record'; "
                "convert it with `tfds convert_format --out_file_format=array_record`)")
      where = f"data_dir {data_dir}" if data_dir else "the default TFDS data_dir"
      raise InputError(f"{spec}: cannot open the TFDS dataset in {where} "
                       f"({type(e).__name__}: {first}){hint}") from None
    info = self._ds.dataset_info
    features = info.features
    for field in self.fields.content:
      feat = _tfds_feature(features, field)
      if feat is None:
        raise InputError(f"{spec}: field '{field}': no such feature (features: "
                         f"{', '.join(features.keys())})")
      if type(feat).__name__ != "Text" and "str" not in str(getattr(feat, "dtype", "")):
        raise InputError(f"{spec}: field '{field}': expected a Text feature, got {feat!r}")
    self._has_id = (self.fields.id is not None
                    and _tfds_feature(features, self.fields.id) is not None)
    self._num = len(self._ds)
    if self._num == 0:
      raise InputError(f"{spec}: zero documents in split {split!r}")
    self.full_name = info.full_name

  def num_docs(self) -> int:
    return self._num

  def doc_sizes(self) -> np.ndarray:
    """Bytes per example.

    ``exact_sizes=False`` (default): from the dataset info only, the serialized bytes per example
    of the split each array_record file belongs to (every example of a file gets the same size).
    ``exact_sizes=True``: UTF-8 bytes of the text (or source + target), reading every example.
    """
    if self.exact_sizes:
      out = np.zeros(self._num, np.int64)
      for lo in range(0, self._num, 1024):
        hi = min(self._num, lo + 1024)
        for k, ex in enumerate(self._ds.__getitems__(list(range(lo, hi)))):
          for field in self.fields.content:
            found, value = _lookup(ex, field)
            if found and isinstance(value, (bytes, str)):
              out[lo + k] += len(value) if isinstance(value, bytes) else len(value.encode())
      return out
    info = self._ds.dataset_info
    per_file: dict[str, float] = {}
    for split_info in info.splits.values():
      avg = int(split_info.num_bytes) / max(1, int(split_info.num_examples))
      for fi in split_info.file_instructions:
        per_file[os.fspath(fi.filename)] = avg
    fallback = sum(per_file.values()) / max(1, len(per_file))
    # At least 1 byte each: a dataset info without byte counts still gives a count-based plan.
    parts = [np.full(int(fi.take), max(1, round(per_file.get(os.fspath(fi.filename), fallback))),
                     np.int64)
             for fi in info.splits[self.split].file_instructions]
    out = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if len(out) != self._num:  # Should not happen; never plan with inconsistent sizes.
      out = np.full(self._num, max(1, round(fallback)), np.int64)
    return out

  def fingerprint(self) -> dict[str, Any]:
    info = self._ds.dataset_info
    return {"tfds": self.full_name, "split": self.split, "data_dir": os.fspath(info.data_dir),
            "num_examples": self._num,
            "files": [[os.path.basename(os.fspath(fi.filename)), int(fi.skip), int(fi.take)]
                      for fi in info.splits[self.split].file_instructions]}

  def _read(self, start: int, end: int) -> Iterator[RawDoc]:
    for lo in range(start, end, 256):
      hi = min(end, lo + 256)
      try:
        examples = self._ds.__getitems__(list(range(lo, hi)))
      except Exception as e:
        raise InputError(f"tfds {self.dataset}:{self.split}[{lo}:{hi}]: cannot read "
                         f"({type(e).__name__}: {e})") from None
      for k, ex in enumerate(examples):
        i = lo + k
        where = f"tfds {self.dataset}:{self.split}[{i}]"
        get = lambda field: _lookup(ex, field)  # pylint: disable=cell-var-from-loop
        try:
          text, source, target = self._content(get, where)
          doc_id = self._id(get, where, f"{self.dataset}:{self.split}[{i}]") if self._has_id \
              else f"{self.dataset}:{self.split}[{i}]"
        except _DocError as e:
          self._skip_or_raise(e)
          continue
        yield RawDoc(id=doc_id, text=text, source=source, target=target, where=where,
                     lang=self.lang)


# ---------------------------------------------------------------------------------------------
# Opening a list of inputs


def split_lang(spec: str, default: str) -> tuple[str, str]:
  """``"data/fr/*.jsonl@fra_Latn"`` -> ``("data/fr/*.jsonl", "fra_Latn")``; no suffix: default.

  Only a suffix that looks like a language code (``eng_Latn``, ``en``) counts, so a path that
  merely contains ``@`` stays a path.
  """
  head, sep, tail = spec.rpartition("@")
  if sep and head and _LANG_RE.match(tail):
    return head, tail
  return spec, default


def _expand(pattern: str) -> list[str]:
  if _GLOB_CHARS.search(pattern):
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if not os.path.isdir(p))
    if not paths:
      raise InputError(f"{pattern}: the glob matches no file")
    return paths
  if os.path.isdir(pattern):
    raise InputError(f"{pattern}: is a directory; pass a glob such as "
                     f"{pattern.rstrip('/')}/*.jsonl")
  if not os.path.exists(pattern):
    raise InputError(f"{pattern}: no such file")
  return [pattern]


def format_of(path: str) -> str:
  """The format ``fmt="auto"`` picks for ``path``."""
  if path.startswith(TFDS_PREFIX):
    return "tfds"
  ext = os.path.splitext(path)[1].lower()
  if ext not in EXTENSIONS:
    raise InputError(f"{path}: cannot tell the format from the extension {ext or '(none)'!r} "
                     f"(known: {', '.join(sorted(EXTENSIONS))}); pass the format explicitly")
  return EXTENSIONS[ext]


def open_sources(inputs: Sequence[str], *, fmt: str = "auto", text_unit: str = "file",
                 text_field: str = "text", id_field: str | None = "id",
                 source_field: str | None = None, target_field: str | None = None,
                 lang: str = DEFAULT_LANG, tfds_data_dir: str | None = None,
                 on_error: str = "raise", exact_sizes: bool = False) -> list[Source]:
  """Opens the inputs as sources, in the order of the global document sequence.

  Args:
    inputs: paths, globs (expanded and sorted; recursive ``**`` allowed) or ``tfds:`` specs, each
      with an optional ``@LANG`` suffix. Order is kept across inputs.
    fmt: ``"auto"`` (from the extension) or one of :data:`FORMATS` for every file input.
    text_unit: plain text only: ``"file"``, ``"line"`` or ``"paragraph"``.
    text_field, id_field, source_field, target_field: field names (dots reach nested fields).
      ``source_field`` + ``target_field`` make fine-tuning pairs (``text_field`` is then unused).
    lang: language code of inputs without an ``@LANG`` suffix.
    tfds_data_dir: TFDS data_dir (default: TFDS's own, ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    on_error: ``"raise"`` or ``"skip"`` for bad individual documents (see the module docstring).
    exact_sizes: Parquet/TFDS: exact :meth:`Source.doc_sizes` (reads the text) instead of
      metadata estimates.

  Raises:
    InputError: a missing path, a glob that matches nothing, an unknown extension, a file listed
      twice, or a file-level problem found on opening (empty file, unreadable Parquet file,
      missing column or feature, unknown TFDS dataset or split).
  """
  if fmt != "auto" and fmt not in FORMATS:
    raise InputError(f"unknown input format {fmt!r} (known: auto, {', '.join(FORMATS)})")
  if on_error not in ON_ERROR:
    raise InputError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
  if not inputs:
    raise InputError("no inputs given")
  fields = Fields(text=text_field, id=id_field or None, source=source_field, target=target_field)
  sources: list[Source] = []
  seen: dict[str, str] = {}
  for spec in inputs:
    pattern, spec_lang = split_lang(spec, lang)
    common = dict(fields=fields, lang=spec_lang, on_error=on_error)
    if pattern.startswith(TFDS_PREFIX) or fmt == "tfds":
      sources.append(TfdsSource(pattern, data_dir=tfds_data_dir, exact_sizes=exact_sizes,
                                **common))
      continue
    for path in _expand(pattern):
      key = os.path.realpath(path)
      if key in seen:
        raise InputError(f"{path}: listed twice (by {seen[key]!r} and {spec!r}); each document "
                         "must appear once in the global sequence")
      seen[key] = spec
      kind = format_of(path) if fmt == "auto" else fmt
      if kind == "text":
        sources.append(TextSource(path, text_unit=text_unit, **common))
      elif kind == "jsonl":
        sources.append(JsonlSource(path, **common))
      elif kind == "parquet":
        sources.append(ParquetSource(path, exact_sizes=exact_sizes, **common))
      else:
        raise InputError(f"{path}: format {kind!r} needs a tfds: spec, not a path")
  _unique_id_prefixes(sources)
  return sources


def _unique_id_prefixes(sources: Sequence[Source]) -> None:
  """Files that share a basename get their path relative to their common directory as the
  prefix of derived ids (``en/part-0.jsonl:3``); every other file keeps its basename."""
  by_base: dict[str, list[Source]] = {}
  for s in sources:
    if not isinstance(s, TfdsSource):
      by_base.setdefault(s.id_prefix, []).append(s)
  for group in by_base.values():
    if len(group) > 1:
      paths = [os.path.abspath(s.name) for s in group]
      common = os.path.commonpath([os.path.dirname(p) for p in paths])
      for s, p in zip(group, paths):
        s.id_prefix = os.path.relpath(p, common)


def check_unique_ids(sources: Sequence[Source]) -> int:
  """Raises :class:`InputError` if two documents of ``sources`` share an id; returns the count.

  Reads every document once (bad documents are passed over here: :meth:`Source.read` reports or
  skips them as ``on_error`` says) and keeps one 64-bit hash per id, so memory is 8 bytes per
  document. Only if two hashes collide does a second pass compare the ids themselves; the error
  names the id and both records (``file:line N`` / ``file:row N`` / ``tfds NAME:SPLIT[i]``), the
  earlier one first.
  """
  def ids() -> Iterator[tuple[str, str]]:
    for src in sources:
      quiet = copy.copy(src)  # shares the index; bad documents are not logged nor counted here
      quiet.on_error = _QUIET
      for d in quiet.read():
        yield d.id, d.where

  hashes = array.array("q", (hash(i) for i, _ in ids()))
  h = np.frombuffer(hashes, np.int64) if len(hashes) else np.zeros(0, np.int64)
  h = np.sort(h)
  clash = set(h[1:][h[1:] == h[:-1]].tolist())
  if clash:
    first: dict[str, str] = {}
    for doc_id, where in ids():
      if hash(doc_id) in clash:
        if doc_id in first:
          raise InputError(
              f"{where}: duplicate document id {doc_id!r}, already used by {first[doc_id]} (ids "
              "must be unique within a dataset: fix the data, or pick another --id_field, or "
              "--id_field= (empty) for FILE:LINE ids)")
        first[doc_id] = where
  return len(hashes)
