"""Text to SONAR embedding shards: SaT-capped segmentation, SONAR encoding, sharded resumable jobs.

Run (one worker of N; N independent processes write disjoint shards, then one merge):
  python -m data_prep.embed --input='corpus/*.jsonl' --out=data/wiki --num_workers=8 --worker_index=3
  python -m data_prep.embed --out=data/wiki --merge          # after all workers: manifest.json
  python -m data_prep.embed --help

Offline with tiny random models (tests, demos; ``python -m data_prep.tiny_models --out=M`` first):
  python -m data_prep.embed --input=docs/*.txt --out=data/tiny --sat_model=M/sat/model \\
      --sat_tokenizer=M/sat/tokenizer --encoder=M/sonar/tiny_sonar_encoder.yaml

What one document becomes:
  * its text is split into sentences by SaT (``--sat_model``, ``--sat_threshold``) with the
    ``--max_chars`` cap (every sentence at most 250 characters; :mod:`data_prep.sat`);
  * each sentence is encoded by the SONAR text encoder (``--encoder``, ``--tokenizer``) in the
    document's language (``--lang`` or ``PATH@LANG``); sentences of a whole shard are encoded
    together, sorted by length (:mod:`data_prep.sonar`);
  * the end-of-text sentence (``--eot_text``, "End of text." by default) is appended as the last
    concept. A fine-tuning pair (``--source_field``/``--target_field``) becomes
    ``source sentences + [--source_suffix] + target sentences + [--target_suffix]`` with
    ``source_len`` in the record header (:mod:`lcm_jax.schema`); optional ``--source_prefix`` /
    ``--target_prefix`` sentences go first on their side. Constant sentences (end of text,
    prefixes, suffixes) are encoded once, in ``--eot_lang``.
  * the record stores the sentences' texts too (``--no-texts`` to leave them out).

How the work is split (deterministic, independent of ``--num_workers``):
  * the inputs (sorted) form one global document sequence; the *plan* cuts it into consecutive
    shards of ``--shard_docs`` documents, or fewer when ``--shard_bytes`` of input text is reached
    first. Every worker computes the same plan from document counts and sizes (no parsing); the
    plan and the content-affecting settings are stored in ``OUT/plan.json`` and a rerun with other
    inputs or settings is refused;
  * shard ``s`` (``shard-SSSSS-of-TTTTT.array_record``) belongs to worker ``s % num_workers``,
    so 1 worker and N workers write byte-identical shards; ``--worker_index`` defaults to
    ``$JOB_COMPLETION_INDEX`` (Kubernetes Indexed Job) or ``$SLURM_ARRAY_TASK_ID``;
  * a shard is written under a temporary name and renamed when complete; then its manifest part
    (``OUT/manifest_parts/shard-SSSSS.json``: counts, skips, segmentation stats) is written. A
    shard is finished when its part exists: a rerun skips finished shards, and redoes a shard whose
    part is missing (same bytes). A killed worker leaves only ``.tmp-*`` files, removed on rerun.
  * the merge (``--merge``, or automatically by the worker that finds every part present) checks
    every planned shard and its counts (documents written + documents skipped = documents planned)
    and writes ``manifest.json`` atomically.

Document ids are unique within a dataset: before it writes anything (no ``--out`` directory, no
plan, no shard), a worker that finds no ``plan.json`` reads every input once and stops with one
``error: ...`` line naming the duplicate id and both records (file and line/row), exit status 2
(:func:`data_prep.inputs.check_unique_ids`; a rerun that finds a matching plan skips the check,
which the plan's writer passed). Ids derived from file names stay unique across directories (see
:mod:`data_prep.inputs`).

Bad input (a missing field, non-UTF-8 bytes, an empty file, an unreadable Parquet file, a document
with no sentences) stops the worker with one ``error: ...`` line naming the file and line/row,
exit status 2; finished shards stay valid. ``--on_error=skip`` skips such documents instead, logs
each and counts them in the parts and the manifest. An ``--out`` that is a file or cannot be
created is refused before any work. Only the project's input checks
(:class:`lcm_jax.errors.UserError`) become one line; any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np

from lcm_jax import fileio
from lcm_jax import schema
from lcm_jax.errors import UserError

TOOL = "data_prep.embed"
PLAN_NAME = "plan.json"
PARTS_DIR = "manifest_parts"
PLAN_FORMAT_VERSION = 1
DEFAULT_ENCODER = "text_sonar_basic_encoder"
DEFAULT_SAT = "sat-3l"

log = logging.getLogger(TOOL)


class EmbedError(UserError):
  """A user error of the embedding job (bad flags, a plan mismatch, a document with no sentences)."""


# ------------------------------------------------------------------------------------------------
# The plan: consecutive shards over the global document sequence.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlannedShard:
  """Shard ``index`` of ``count``: ``ranges`` are ``(source_index, start, end)`` document ranges."""

  index: int
  count: int
  ranges: tuple[tuple[int, int, int], ...]
  num_docs: int
  num_bytes: int

  @property
  def file(self) -> str:
    return schema.shard_name(self.index, self.count)

  @property
  def part_file(self) -> str:
    return f"shard-{self.index:05d}.json"


def plan_shards(doc_sizes: Sequence[np.ndarray], shard_docs: int,
                shard_bytes: int | None = None) -> list[PlannedShard]:
  """Cuts the concatenation of the sources' documents into consecutive shards.

  A shard closes after ``shard_docs`` documents, or earlier once its documents' input bytes reach
  ``shard_bytes`` (a single larger document still makes a shard of its own). Shards may span
  sources; a source with zero documents contributes nothing.
  """
  if shard_docs < 1:
    raise EmbedError(f"--shard_docs: must be >= 1, got {shard_docs}")
  if shard_bytes is not None and shard_bytes < 1:
    raise EmbedError(f"--shard_bytes: must be >= 1, got {shard_bytes}")
  sizes = [np.asarray(s, np.int64) for s in doc_sizes]
  offsets = np.concatenate([[0], np.cumsum([len(s) for s in sizes])]).astype(np.int64)
  total = int(offsets[-1])
  all_sizes = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
  cum = np.concatenate([[0], np.cumsum(all_sizes)]).astype(np.int64)
  bounds = []
  start = 0
  while start < total:
    end = min(start + shard_docs, total)
    if shard_bytes is not None:
      # Smallest end with cum[end] - cum[start] >= shard_bytes, at least one document.
      by_bytes = int(np.searchsorted(cum, cum[start] + shard_bytes, side="left"))
      end = min(end, max(by_bytes, start + 1))
    bounds.append((start, end))
    start = end
  shards = []
  for k, (a, b) in enumerate(bounds):
    ranges = []
    for src in range(len(sizes)):
      lo, hi = max(a, int(offsets[src])), min(b, int(offsets[src + 1]))
      if lo < hi:
        ranges.append((src, lo - int(offsets[src]), hi - int(offsets[src])))
    shards.append(PlannedShard(index=k, count=len(bounds), ranges=tuple(ranges), num_docs=b - a,
                               num_bytes=int(cum[b] - cum[a])))
  return shards


def _plan_doc(shards: Sequence[PlannedShard], sources: Sequence[Any],
              settings: dict[str, Any]) -> dict[str, Any]:
  return {
      "format_version": PLAN_FORMAT_VERSION,
      "settings": settings,
      "sources": [s.fingerprint() for s in sources],
      "shards": [{"file": s.file, "ranges": [list(r) for r in s.ranges], "num_docs": s.num_docs,
                  "num_bytes": s.num_bytes} for s in shards],
  }


def _check_or_write_plan(out: str, plan: dict[str, Any], check_new: Any = None) -> None:
  """Writes ``OUT/plan.json``, or checks that an existing one describes the same work.

  ``check_new()`` runs first when there is no plan yet (the id check), before ``out`` is created.
  """
  path = os.path.join(out, PLAN_NAME)
  if os.path.exists(path):
    with open(path) as f:
      try:
        old = json.load(f)
      except json.JSONDecodeError as e:
        raise EmbedError(f"{path}: not valid JSON ({e}); delete it to start over") from None
    if old != json.loads(json.dumps(plan)):
      diff = [k for k in ("format_version", "settings", "sources", "shards") if old.get(k) != plan[k]]
      detail = ""
      if "settings" in diff:
        keys = sorted(set(old.get("settings", {})) | set(plan["settings"]))
        changed = [k for k in keys if old.get("settings", {}).get(k) != plan["settings"].get(k)]
        detail = f" (settings changed: {', '.join(changed)})"
      raise EmbedError(
          f"{path}: field(s) {', '.join(diff)} differ from this run{detail}: {out} holds shards of "
          "other inputs or settings. Rerun with the original flags, or use a new --out.")
    return
  if check_new is not None:
    check_new()
  os.makedirs(out, exist_ok=True)
  schema.write_json_atomic(path, plan)


# ------------------------------------------------------------------------------------------------
# Turning raw documents into schema Documents.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stats:
  """Counters of one shard (and, summed, of a worker or a dataset)."""

  documents_in: int = 0
  documents: int = 0
  skipped: int = 0
  sentences: int = 0
  concepts: int = 0
  chars: int = 0
  resplit: dict[str, int] = dataclasses.field(default_factory=dict)

  def add(self, other: "Stats") -> None:
    for f in ("documents_in", "documents", "skipped", "sentences", "concepts", "chars"):
      setattr(self, f, getattr(self, f) + getattr(other, f))
    for k, v in other.resplit.items():
      self.resplit[k] = self.resplit.get(k, 0) + int(v)

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Stats":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclasses.dataclass(frozen=True)
class TextSettings:
  """The content-affecting text conventions (stored in the plan)."""

  eot_text: str = "End of text."
  eot_lang: str = "eng_Latn"
  source_prefix: str | None = None
  source_suffix: str = "[MODEL]:"
  target_prefix: str | None = None
  target_suffix: str = "End of text."


class DocumentBuilder:
  """Segments and encodes raw documents into :class:`lcm_jax.schema.Document` s.

  ``segmenter`` has ``segment(texts) -> list[list[str]]`` and ``stats``; ``encoder`` has
  ``encode(sentences, lang) -> (n, dim) float32`` and ``dim``.
  """

  def __init__(self, segmenter: Any, encoder: Any, text: TextSettings, *, store_texts: bool = True,
               on_error: str = "raise", segment_batch: int = 64):
    self.segmenter = segmenter
    self.encoder = encoder
    self.text = text
    self.store_texts = store_texts
    self.on_error = on_error
    self.segment_batch = segment_batch
    self._constants: dict[str, np.ndarray] = {}

  def constant(self, sentence: str) -> np.ndarray:
    """The embedding of a fixed sentence (end of text, prefixes, suffixes), encoded once."""
    if sentence not in self._constants:
      self._constants[sentence] = np.asarray(
          self.encoder.encode([sentence], lang=self.text.eot_lang)[0], np.float32)
    return self._constants[sentence]

  def _segment(self, texts: list[str]) -> list[list[str]]:
    # SaT pads every text of a call to the longest one: batch texts of similar length together
    # (a stable sort, so the batches, and the output, are a deterministic function of the shard).
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[list[str]] = [[] for _ in texts]
    for i in range(0, len(order), self.segment_batch):
      idx = order[i:i + self.segment_batch]
      for j, sents in zip(idx, self.segmenter.segment([texts[j] for j in idx])):
        out[j] = sents
    return out

  def build(self, raw_docs: Sequence[Any], stats: Stats) -> list[schema.Document]:
    """Documents for ``raw_docs`` (a shard's worth); bad ones raise or are skipped (counted)."""
    t = self.text
    pairs = [d.text is None for d in raw_docs]
    texts: list[str] = []
    for d, is_pair in zip(raw_docs, pairs):
      texts.extend([d.source, d.target] if is_pair else [d.text])
      stats.chars += sum(len(x) for x in ([d.source, d.target] if is_pair else [d.text]))
    segmented = self._segment(texts)
    # Per document: its sentences (a list of (lang, sentence)), and the layout with constants.
    layouts = []
    k = 0
    for d, is_pair in zip(raw_docs, pairs):
      if is_pair:
        src, tgt = segmented[k], segmented[k + 1]
        k += 2
        empty = ("source" if not src else "target") if not (src and tgt) else None
        items = (([("const", t.source_prefix)] if t.source_prefix else [])
                 + [("sent", s) for s in src] + [("const", t.source_suffix)])
        source_len = len(items)
        items += (([("const", t.target_prefix)] if t.target_prefix else [])
                  + [("sent", s) for s in tgt] + [("const", t.target_suffix)])
      else:
        sents = segmented[k]
        k += 1
        empty = "text" if not sents else None
        items = [("sent", s) for s in sents] + [("const", t.eot_text)]
        source_len = None
      if empty is not None:
        msg = f"{d.where}: field '{empty}': document {d.id!r} has no sentences after segmentation"
        if self.on_error != "skip":
          raise EmbedError(msg)
        log.warning("skipping: %s", msg)
        stats.skipped += 1
        continue
      layouts.append((d, items, source_len))
    # Encode every sentence of the shard in one call per language (length-sorted inside).
    by_lang: dict[str, list[str]] = {}
    for d, items, _ in layouts:
      by_lang.setdefault(d.lang, []).extend(s for kind, s in items if kind == "sent")
    vectors = {lang: self.encoder.encode(sents, lang=lang) if sents else None
               for lang, sents in by_lang.items()}
    cursor = {lang: 0 for lang in by_lang}
    docs = []
    for d, items, source_len in layouts:
      rows = []
      for kind, s in items:
        if kind == "sent":
          rows.append(vectors[d.lang][cursor[d.lang]])
          cursor[d.lang] += 1
          stats.sentences += 1
        else:
          rows.append(self.constant(s))
      emb = np.stack(rows).astype(np.float32)
      stats.documents += 1
      stats.concepts += emb.shape[0]
      docs.append(schema.Document(id=d.id, embeddings=emb,
                                  texts=[s for _, s in items] if self.store_texts else None,
                                  source_len=source_len))
    return docs


# ------------------------------------------------------------------------------------------------
# The worker and the merge.
# ------------------------------------------------------------------------------------------------


def _env_worker_index() -> int | None:
  for var in ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
    if os.environ.get(var, "").strip():
      try:
        return int(os.environ[var])
      except ValueError:
        raise EmbedError(f"${var}={os.environ[var]!r} is not an integer worker index") from None
  return None


def _remove_stale_tmp(out: str, mine: Sequence[PlannedShard]) -> int:
  """Removes ``.tmp-*`` files of this worker's shards left by a killed run."""
  n = 0
  for s in mine:
    for pattern in (os.path.join(out, f".tmp-*-{s.file}"),
                    os.path.join(out, PARTS_DIR, f".tmp-*{s.part_file}*")):
      for f in glob.glob(pattern):
        os.remove(f)
        n += 1
  return n


def _read_part(out: str, shard: PlannedShard) -> dict[str, Any] | None:
  path = os.path.join(out, PARTS_DIR, shard.part_file)
  if not (os.path.exists(path) and os.path.exists(os.path.join(out, shard.file))):
    return None
  with open(path) as f:
    return json.load(f)


def _iter_raw(sources: Sequence[Any], shard: PlannedShard) -> Iterator[Any]:
  for src, start, end in shard.ranges:
    yield from sources[src].read(start, end)


class _Progress:
  """Documents/s and sentences/s on stderr: a tqdm bar on a terminal, a line every 30 s otherwise."""

  def __init__(self, total_docs: int, desc: str):
    self.t0 = time.time()
    self.docs = self.sents = 0
    self.tty = sys.stderr.isatty()
    self.bar = None
    self.last = self.t0
    self.total = total_docs
    if self.tty:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total_docs, desc=desc, unit="doc", file=sys.stderr, dynamic_ncols=True)

  def update(self, docs: int, sents: int) -> None:
    self.docs += docs
    self.sents += sents
    dt = max(time.time() - self.t0, 1e-9)
    if self.bar is not None:
      self.bar.update(docs)
      self.bar.set_postfix_str(f"{self.sents / dt:,.0f} sent/s")
    elif time.time() - self.last >= 30 or self.docs >= self.total:
      self.last = time.time()
      print(f"[{TOOL}] {self.docs}/{self.total} docs, {self.docs / dt:,.1f} docs/s, "
            f"{self.sents / dt:,.1f} sentences/s", file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def run_worker(*, sources: Sequence[Any], plan: Sequence[PlannedShard], out: str,
               num_workers: int, worker_index: int, builder: DocumentBuilder, dtype: str,
               producer: dict[str, Any], merge_when_done: bool = True) -> Stats:
  """Processes this worker's unfinished shards; returns the worker's summed stats."""
  mine = [s for s in plan if s.index % num_workers == worker_index]
  os.makedirs(os.path.join(out, PARTS_DIR), exist_ok=True)
  stale = _remove_stale_tmp(out, mine)
  if stale:
    log.info("removed %d temporary file(s) of an interrupted run", stale)
  todo = [s for s in mine if _read_part(out, s) is None]
  total = Stats()
  log.info("worker %d/%d: %d shard(s) in the plan of %d, %d already finished",
           worker_index, num_workers, len(mine), len(plan), len(mine) - len(todo))
  progress = _Progress(sum(s.num_docs for s in todo), f"worker {worker_index}")
  t0 = time.time()
  try:
    for shard in todo:
      stats = Stats()
      raw = list(_iter_raw(sources, shard))
      read_skips = shard.num_docs - len(raw)  # documents the readers skipped (on_error=skip)
      stats.documents_in = shard.num_docs
      stats.skipped += read_skips
      seg_before = dict(getattr(builder.segmenter, "stats", {}) or {})
      docs = builder.build(raw, stats)
      seg_after = dict(getattr(builder.segmenter, "stats", {}) or {})
      stats.resplit = {k: int(v) - int(seg_before.get(k, 0)) for k, v in seg_after.items()
                       if isinstance(v, (int, np.integer))}
      if stats.documents + stats.skipped != shard.num_docs:
        raise EmbedError(f"{shard.file}: count check: {stats.documents} documents + "
                         f"{stats.skipped} skipped != {shard.num_docs} planned")
      if not docs:
        raise EmbedError(f"{shard.file}: every document of the shard was skipped; "
                         "nothing to write (check the inputs)")
      entry = schema.write_shard(os.path.join(out, shard.file), docs, dtype=dtype)
      part = dict(entry, stats=stats.as_dict(), dim=int(docs[0].embeddings.shape[1]),
                  dtype=dtype, has_texts=builder.store_texts, producer=producer)
      schema.write_json_atomic(os.path.join(out, PARTS_DIR, shard.part_file), part)
      total.add(stats)
      progress.update(shard.num_docs, stats.sentences)
  finally:
    progress.close()
  dt = max(time.time() - t0, 1e-9)
  if todo:
    log.info("worker %d/%d done: %d shard(s), %d documents (%d skipped), %d sentences, "
             "%d concepts in %.1f s: %.1f docs/s, %.1f sentences/s", worker_index, num_workers,
             len(todo), total.documents, total.skipped, total.sentences, total.concepts, dt,
             total.documents / dt, total.sentences / dt)
  if merge_when_done and all(_read_part(out, s) is not None for s in plan):
    merge(out)
  return total


def merge(out: str) -> dict[str, Any]:
  """Checks every planned shard and its counts, then writes ``OUT/manifest.json`` atomically."""
  plan_path = os.path.join(out, PLAN_NAME)
  if not os.path.exists(plan_path):
    raise EmbedError(f"{plan_path}: missing (no embedding job has run in {out})")
  with open(plan_path) as f:
    plan = json.load(f)
  shards, missing, total = [], [], Stats()
  dims, dtypes, has_texts, producer = set(), set(), set(), None
  for i, s in enumerate(plan["shards"]):
    part_path = os.path.join(out, PARTS_DIR, f"shard-{i:05d}.json")
    if not (os.path.exists(part_path) and os.path.exists(os.path.join(out, s["file"]))):
      missing.append(s["file"])
      continue
    with open(part_path) as f:
      part = json.load(f)
    st = Stats.from_dict(part["stats"])
    if part["file"] != s["file"] or st.documents_in != s["num_docs"] or (
        part["num_documents"] + st.skipped != s["num_docs"]):
      raise EmbedError(f"{part_path}: count check failed: {part['num_documents']} documents + "
                       f"{st.skipped} skipped != {s['num_docs']} planned for {s['file']}")
    shards.append({k: part[k] for k in ("file", "num_documents", "num_concepts")})
    total.add(st)
    dims.add(part["dim"])
    dtypes.add(part["dtype"])
    has_texts.add(part["has_texts"])
    producer = part["producer"]
  if missing:
    raise EmbedError(f"{out}: {len(missing)} of {len(plan['shards'])} shard(s) not finished yet "
                     f"(first: {missing[0]}); run the missing workers, then --merge")
  if len(dims) != 1 or len(dtypes) != 1:
    raise EmbedError(f"{out}: shards disagree on dim {sorted(dims)} or dtype {sorted(dtypes)}")
  manifest = schema.make_manifest(dim=dims.pop(), dtype=dtypes.pop(), shards=shards,
                                  producer=producer, has_texts=all(has_texts))
  manifest["stats"] = total.as_dict()
  schema.write_manifest(out, manifest)
  log.info("merged %d shard(s): %d documents (%d skipped), %d concepts -> %s", len(shards),
           manifest["num_documents"], total.skipped, manifest["num_concepts"],
           os.path.join(out, schema.MANIFEST_NAME))
  return manifest


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=f"python -m {TOOL}",
      description="Split text into SaT-capped sentences, encode them with SONAR and write lcm_jax "
                  "embedding shards (ArrayRecord) + manifest.json. Run N workers with the same "
                  "flags and --worker_index=0..N-1; see the module docstring.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  g = p.add_argument_group("inputs")
  g.add_argument("--input", action="append", default=[],
                 help="a path, glob or tfds:NAME/CONFIG:SPLIT, optionally @LANG (e.g. "
                      "'fr/*.jsonl@fra_Latn'); repeat or comma-separate for several")
  g.add_argument("--format", default="auto", choices=("auto", "text", "jsonl", "parquet", "tfds"),
                 help="input format; auto = from the extension")
  g.add_argument("--text_unit", default="file", choices=("file", "line", "paragraph"),
                 help="plain text: one document per file, per non-empty line, or per paragraph")
  g.add_argument("--text_field", default="text", help="JSONL/Parquet/TFDS text field")
  g.add_argument("--id_field", default="id", help="JSONL/Parquet/TFDS id field (absent: FILE:N)")
  g.add_argument("--source_field", default=None,
                 help="fine-tuning pairs: the source (prompt) field; needs --target_field")
  g.add_argument("--target_field", default=None, help="fine-tuning pairs: the target field")
  g.add_argument("--lang", default="eng_Latn", help="default SONAR language code of the inputs")
  g.add_argument("--tfds_data_dir", default=None, help="data_dir of prepared TFDS datasets")
  g.add_argument("--on_error", default="raise", choices=("raise", "skip"),
                 help="a bad document (missing field, bad UTF-8/JSON, no sentences): stop with an "
                      "error naming it, or log, count and skip it")
  g = p.add_argument_group("output and sharding")
  g.add_argument("--out", required=True, help="dataset directory (created; reruns resume)")
  g.add_argument("--num_workers", type=int, default=1, help="number of independent workers")
  g.add_argument("--worker_index", type=int, default=None,
                 help="this worker, 0..num_workers-1 (default: $JOB_COMPLETION_INDEX, "
                      "$SLURM_ARRAY_TASK_ID, else 0)")
  g.add_argument("--shard_docs", type=int, default=1000, help="documents per shard (at most)")
  g.add_argument("--shard_bytes", type=int, default=None,
                 help="close a shard once its input text reaches this many bytes")
  g.add_argument("--dtype", default=schema.DEFAULT_DTYPE, choices=schema.ALLOWED_DTYPES,
                 help="storage dtype of the embeddings in the shards")
  g.add_argument("--texts", action=argparse.BooleanOptionalAction, default=True,
                 help="store each concept's sentence in the record")
  g.add_argument("--merge", action="store_true",
                 help="only merge the finished shards' parts into manifest.json (after all workers)")
  g.add_argument("--auto_merge", action=argparse.BooleanOptionalAction, default=True,
                 help="merge when this worker finds every shard of the plan finished")
  g = p.add_argument_group("segmentation (SaT)")
  g.add_argument("--sat_model", default=DEFAULT_SAT, help="SaT hub name or local model directory")
  g.add_argument("--sat_tokenizer", default=None, help="SaT tokenizer hub name or local directory")
  g.add_argument("--sat_threshold", type=float, default=None,
                 help="SaT boundary threshold (default: data_prep.sat's default)")
  g.add_argument("--max_chars", type=int, default=250, help="maximum characters per sentence")
  g.add_argument("--segment_batch", type=int, default=64, help="texts per SaT call")
  g = p.add_argument_group("encoding (SONAR)")
  g.add_argument("--encoder", default=DEFAULT_ENCODER,
                 help="SONAR text encoder: a fairseq2 card name or a local card (.yaml)")
  g.add_argument("--tokenizer", default=None,
                 help="SONAR tokenizer card or local sentencepiece model (default: the encoder's)")
  g.add_argument("--batch_size", type=int, default=256, help="sentences per encoder batch")
  g.add_argument("--max_tokens", type=int, default=None, help="tokens per encoder batch (cap)")
  g.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
  g.add_argument("--compute_dtype", default=None, choices=("float32", "float16", "bfloat16"),
                 help="encoder dtype (default: float32 on CPU, float16 on GPU)")
  g = p.add_argument_group("document conventions")
  g.add_argument("--eot_text", default="End of text.", help="end-of-text sentence appended")
  g.add_argument("--eot_lang", default="eng_Latn", help="language the constant sentences use")
  g.add_argument("--source_prefix", default=None, help="pairs: a sentence before the source")
  g.add_argument("--source_suffix", default="[MODEL]:", help="pairs: the sentence after the source")
  g.add_argument("--target_prefix", default=None, help="pairs: a sentence before the target")
  g.add_argument("--target_suffix", default="End of text.", help="pairs: the sentence after the target")
  g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  return p


def _split_inputs(values: Sequence[str]) -> list[str]:
  out = []
  for v in values:
    out.extend(x.strip() for x in v.split(",") if x.strip())
  return out


def _settings(a: argparse.Namespace, inputs: Sequence[str]) -> dict[str, Any]:
  """The flags that determine the shards' content (stored in the plan, checked on rerun)."""
  keys = ("format", "text_unit", "text_field", "id_field", "source_field", "target_field", "lang",
          "on_error", "shard_docs", "shard_bytes", "dtype", "texts", "sat_model", "sat_tokenizer",
          "sat_threshold", "max_chars", "encoder", "tokenizer", "compute_dtype", "eot_text",
          "eot_lang", "source_prefix", "source_suffix", "target_prefix", "target_suffix")
  return dict({k: getattr(a, k) for k in keys}, inputs=list(inputs))


def _user_errors() -> tuple[type[BaseException], ...]:
  """The errors that print one line: the project's input checks only (EmbedError, InputError,
  ShardFormatError, SegmenterLoadError, SonarLoadError, ... all subclass UserError). Importing
  the model modules here also finds a missing 'data' extra early."""
  from data_prep import inputs, sat, sonar  # pylint: disable=g-import-not-at-top,unused-import
  return (UserError,)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  a = _parser().parse_args(argv)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter(f"[{TOOL}] %(message)s"))
  log.handlers[:] = [handler]
  log.propagate = False
  log.setLevel(logging.DEBUG if a.verbose else logging.INFO)
  os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
  try:
    errors = _user_errors()
  except ImportError as e:
    print(f"error: the data_prep tools need the 'data' extra (torch, sonar-space, wtpsplit): {e}. "
          "Install with: EXTRAS=test,data bash scripts/setup.sh", file=sys.stderr)
    return 2
  try:
    return _run(a)
  except errors as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _run(a: argparse.Namespace) -> int:
  from data_prep import inputs as inputs_lib  # pylint: disable=g-import-not-at-top
  from data_prep import sat, sonar  # pylint: disable=g-import-not-at-top
  if a.merge:
    merge(a.out)
    return 0
  fileio.check_output_path(a.out, "--out", directory=True)
  inputs = _split_inputs(a.input)
  if not inputs:
    raise EmbedError("--input: at least one path, glob or tfds:NAME:SPLIT is required")
  if (a.source_field is None) != (a.target_field is None):
    raise EmbedError("--source_field and --target_field go together (fine-tuning pairs)")
  worker = a.worker_index if a.worker_index is not None else _env_worker_index()
  worker = 0 if worker is None else worker
  if a.num_workers < 1 or not 0 <= worker < a.num_workers:
    raise EmbedError(f"--worker_index={worker} is not in [0, --num_workers={a.num_workers})")
  sources = inputs_lib.open_sources(
      inputs, fmt=a.format, text_unit=a.text_unit, text_field=a.text_field, id_field=a.id_field,
      source_field=a.source_field, target_field=a.target_field, lang=a.lang,
      tfds_data_dir=a.tfds_data_dir, on_error=a.on_error)
  plan = plan_shards([s.doc_sizes() for s in sources], a.shard_docs, a.shard_bytes)
  if not plan:
    raise EmbedError(f"--input: {inputs} hold no documents")
  settings = _settings(a, inputs)

  def check_ids() -> None:
    t0 = time.time()
    n = inputs_lib.check_unique_ids(sources)
    log.info("%d document ids checked: unique (%.1f s)", n, time.time() - t0)

  _check_or_write_plan(a.out, _plan_doc(plan, sources, settings), check_new=check_ids)
  mine = [s for s in plan if s.index % a.num_workers == worker]
  if all(_read_part(a.out, s) is not None for s in mine):
    log.info("worker %d/%d: all %d shard(s) already finished", worker, a.num_workers, len(mine))
    if a.auto_merge and all(_read_part(a.out, s) is not None for s in plan):
      merge(a.out)
    return 0
  sat_kwargs = {} if a.sat_threshold is None else {"threshold": a.sat_threshold}
  segmenter = sat.Segmenter(sat.load_sat(a.sat_model, a.sat_tokenizer, device=a.device),
                            max_chars=a.max_chars, **sat_kwargs)
  encoder = sonar.load_text_encoder(a.encoder, a.tokenizer, device=a.device, dtype=a.compute_dtype,
                                    batch_size=a.batch_size, max_tokens=a.max_tokens)
  text = TextSettings(eot_text=a.eot_text, eot_lang=a.eot_lang, source_prefix=a.source_prefix,
                      source_suffix=a.source_suffix, target_prefix=a.target_prefix,
                      target_suffix=a.target_suffix)
  builder = DocumentBuilder(segmenter, encoder, text, store_texts=a.texts, on_error=a.on_error,
                            segment_batch=a.segment_batch)
  producer = {"tool": TOOL, "settings": settings}
  run_worker(sources=sources, plan=plan, out=a.out, num_workers=a.num_workers,
             worker_index=worker, builder=builder, dtype=a.dtype, producer=producer,
             merge_when_done=a.auto_merge)
  return 0


if __name__ == "__main__":
  sys.exit(main())
