r"""Decode SONAR concept vectors to text with the SONAR decoder (beam search): one JSONL line a row.

  python -m data_prep.decode --embeddings=generated.npz --out=generated.jsonl \
      [--decoder=text_sonar_basic_decoder] [--tokenizer=CARD_OR_PATH] [--target_lang=eng_Latn] \
      [--beam_size=5] [--max_len=256] [--batch_size=32] [--device=cuda] [--dtype=float16]
  python -m data_prep.decode --help

Input (``--embeddings``), raw SONAR space:
  * the ``.npz`` written by ``python -m lcm_jax.generate``: ``embeddings`` (B, L, S) zero-padded,
    ``lengths`` (B,) int (concepts per row, 0 <= lengths <= L), ``ids`` (B,) str,
    ``stop_reasons`` (B,) str, ``prompt_lengths`` (B,) int. ``ids`` and ``stop_reasons`` are
    optional (ids default to the row index, stop reasons to null), so generate's prompt layout
    (``embeddings`` + ``lengths`` [+ ``ids``]) decodes too;
  * an ``.npz`` with ``embeddings`` (n, S), or a ``.npy`` (n, S): one row per vector.

Output (``--out``, UTF-8 JSONL, written atomically: temporary name in the same directory, then
rename), one line per row in input order::

  {"id": "doc-7", "sentences": ["...", "..."], "text": "... ...", "stop_reason": "eot"}

``sentences`` has one decoded sentence per generated concept (``lengths[i]`` of them; a row of
length 0 gives ``[]`` and ``""``), ``text`` is ``" ".join(sentences)``. For (n, S) inputs ``id`` is
the row index (an int), ``sentences`` has one element and ``stop_reason`` is null.

All concepts of all rows are flattened and decoded in one batched decoder call
(:meth:`data_prep.sonar.EmbeddingDecoder.decode`: ``--batch_size`` vectors per beam search), then
regrouped by ``lengths``. ``--max_len`` counts TOKENS per decoded sentence (the 2-token prefix and
the final ``</s>`` included; fairseq2's ``max_seq_len``), unrelated to generate's ``--max_len``
(concepts). Progress goes to stderr. Models: ``--decoder``/``--tokenizer`` take a fairseq2 card
name or a local card ``.yaml``/directory (``--tokenizer`` also a sentencepiece ``.model``); see
:mod:`data_prep.sonar` for the loading rules, devices and dtypes.

User errors (a missing file, a missing or malformed field, a concept dimension that is not the
decoder's, lengths beyond the padded axis, a model that cannot load, an ``--out`` that is a
directory or cannot be written) print one ``error: ...`` line naming the file and field (or flag)
and exit with status 2; no output file is written (``--out`` is checked before anything is read).
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from lcm_jax import fileio
from lcm_jax import schema
from lcm_jax.errors import UserError

from data_prep import sonar

TOOL = "data_prep.decode"
_PROGRESS_EVERY_S = 10.0


class InputError(UserError):
  """A bad ``--embeddings`` file; the message names the file and field."""


@dataclasses.dataclass
class DecodeInput:
  """What to decode: ``concepts`` (N, S) float32 = every row's concepts, row after row."""

  ids: list[Any]
  """One id per row (str for generate files, the int row index for (n, S) inputs)."""
  lengths: np.ndarray
  """(B,) int64 concepts per row; they sum to N."""
  concepts: np.ndarray
  """(N, S) float32."""
  stop_reasons: list[Optional[str]]
  """One per row; None when the file has none."""

  @property
  def dim(self) -> int:
    return int(self.concepts.shape[1])


def npz_field(path: str, data: Any, name: str) -> np.ndarray:
  """``data[name]`` of an opened ``.npz`` as an array; InputError naming the file and field."""
  try:
    return np.asarray(data[name])
  except KeyError:
    raise InputError(f"{path}: field '{name}' is missing (fields: "
                     f"{', '.join(sorted(data.keys())) or 'none'})") from None
  except ValueError as e:  # object arrays need pickle, which is off
    raise InputError(f"{path}: field '{name}' cannot be read without pickle ({e}); store "
                     "numbers and strings as plain numpy arrays") from None


def _row_field(path: str, data: Any, name: str, b: int) -> Optional[np.ndarray]:
  if name not in data:
    return None
  a = npz_field(path, data, name)
  if a.shape != (b,):
    raise InputError(f"{path}: field '{name}': expected shape ({b},), got {a.shape}")
  return a


def _check_embeddings(path: str, emb: np.ndarray) -> None:
  if emb.ndim not in (2, 3) or emb.shape[-1] == 0:
    raise InputError(f"{path}: field 'embeddings': expected shape (n, S) or (B, L, S), got "
                     f"{emb.shape}")
  if not np.issubdtype(emb.dtype, np.floating):
    raise InputError(f"{path}: field 'embeddings': expected floats, got dtype {emb.dtype}")


def load_npy_npz(path: str) -> Any:
  """``np.load(path)`` without pickle: an array (.npy) or an open NpzFile (the caller closes it);
  InputError naming the file if it is missing or unreadable."""
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such file")
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise InputError(f"{path}: cannot read as .npy/.npz ({e})") from None


def read_input(path: str) -> DecodeInput:
  """Reads and validates ``--embeddings`` (module docstring); raises :class:`InputError`."""
  data = load_npy_npz(path)
  if isinstance(data, np.ndarray):
    if data.ndim != 2:
      raise InputError(f"{path}: field 'embeddings' (the .npy array): expected shape (n, S), "
                       f"got {data.shape}")
    out = _read_fields(path, {"embeddings": data})
  else:
    try:
      out = _read_fields(path, data)
    finally:
      data.close()
  if not np.isfinite(out.concepts).all():
    k = int(np.argwhere(~np.isfinite(out.concepts))[0, 0])
    row = int(np.searchsorted(np.cumsum(out.lengths), k, side="right"))
    raise InputError(f"{path}: field 'embeddings': row {row} has a non-finite concept")
  return out


def _read_fields(path: str, data: Any) -> DecodeInput:
  emb = npz_field(path, data, "embeddings")
  _check_embeddings(path, emb)
  if emb.ndim == 2:
    n = emb.shape[0]
    return DecodeInput(ids=list(range(n)), lengths=np.ones(n, np.int64),
                       concepts=np.asarray(emb, dtype=np.float32), stop_reasons=[None] * n)
  b, max_len = emb.shape[:2]
  lengths = _row_field(path, data, "lengths", b)
  if lengths is None:
    raise InputError(f"{path}: field 'lengths' is missing: (B, L, S) embeddings need the "
                     "number of concepts per row")
  if not np.issubdtype(lengths.dtype, np.integer):
    raise InputError(f"{path}: field 'lengths': expected integers, got dtype {lengths.dtype}")
  lengths = lengths.astype(np.int64)
  bad = np.flatnonzero((lengths < 0) | (lengths > max_len))
  if len(bad):
    i = int(bad[0])
    raise InputError(f"{path}: field 'lengths': row {i} has {int(lengths[i])}, outside "
                     f"[0, {max_len}] (the padded axis of 'embeddings' {emb.shape})")
  ids_arr = _row_field(path, data, "ids", b)
  ids: list[Any] = list(range(b)) if ids_arr is None else [str(x) for x in ids_arr.tolist()]
  sr = _row_field(path, data, "stop_reasons", b)
  stop_reasons: list[Optional[str]] = [None] * b if sr is None else [str(x) for x in sr.tolist()]
  mask = np.arange(max_len)[None, :] < lengths[:, None]
  return DecodeInput(ids=ids, lengths=lengths, concepts=np.asarray(emb[mask], dtype=np.float32),
                     stop_reasons=stop_reasons)


def to_records(inp: DecodeInput, texts: Sequence[str]) -> list[dict[str, Any]]:
  """Regroups the flat decoded ``texts`` by ``inp.lengths`` into one output record per row."""
  if len(texts) != int(inp.lengths.sum()):
    raise AssertionError(f"{len(texts)} decoded texts for {int(inp.lengths.sum())} concepts")
  records, start = [], 0
  for rid, n, reason in zip(inp.ids, inp.lengths.tolist(), inp.stop_reasons):
    sents = list(texts[start:start + n])
    start += n
    records.append({"id": rid, "sentences": sents, "text": " ".join(sents),
                    "stop_reason": reason})
  return records


def write_jsonl_atomic(path: str, records: Sequence[dict[str, Any]]) -> str:
  """Writes one JSON object per line to ``path`` via a temporary file in the same directory."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(f: Any) -> None:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  return schema.write_file_atomic(path, write, suffix=".jsonl")


def _log(msg: str) -> None:
  print(f"[{TOOL}] {msg}", file=sys.stderr, flush=True)


class _Progress:
  """Prints ``decoded k/N concepts`` to stderr at most every few seconds."""

  def __init__(self, every_s: float = _PROGRESS_EVERY_S) -> None:
    self.t0 = self.last = time.time()
    self.every_s = every_s

  def __call__(self, done: int, total: int) -> None:
    now = time.time()
    if now - self.last >= self.every_s and done < total:
      self.last = now
      rate = done / max(now - self.t0, 1e-9)
      _log(f"decoded {done}/{total} concepts ({rate:.1f}/s, ~{(total - done) / rate:.0f} s left)")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=f"python -m {TOOL}",
      description="Decode SONAR concept vectors (python -m lcm_jax.generate output, or an (n, S) "
                  ".npy/.npz) to text with the SONAR decoder; writes one JSONL line per row: "
                  '{"id", "sentences", "text", "stop_reason"}.',
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--embeddings", required=True,
                 help="generate's .npz (embeddings (B, L, S) + lengths [+ ids, stop_reasons]), "
                      "or an .npz with embeddings (n, S), or a .npy (n, S)")
  p.add_argument("--out", required=True, help="output .jsonl file (written atomically)")
  p.add_argument("--decoder", default=sonar.DEFAULT_DECODER,
                 help="SONAR text decoder: a fairseq2 card name, or a local card .yaml / "
                      "directory of cards")
  p.add_argument("--tokenizer", default=None,
                 help="tokenizer card name, card .yaml/directory or sentencepiece .model; "
                      "None = the decoder's card")
  p.add_argument("--target_lang", default=sonar.DEFAULT_LANG, help="output language code")
  p.add_argument("--beam_size", type=int, default=5, help="beam search width")
  p.add_argument("--max_len", type=int, default=256,
                 help="most TOKENS per decoded sentence, 2-token prefix and </s> included")
  p.add_argument("--batch_size", type=int, default=32, help="vectors per beam-search batch")
  p.add_argument("--device", default=None,
                 help="torch device; None = cuda if available, else cpu")
  p.add_argument("--dtype", default=None, choices=sonar.DTYPES,
                 help="model dtype; None = float16 on cuda, float32 on cpu")
  return p


def _fail(msg: str) -> int:
  print(f"error: {msg}", file=sys.stderr, flush=True)
  return 2


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status (2 on a user error: one line, nothing
  written). Only the project's input checks (:class:`lcm_jax.errors.UserError`) become one line;
  any other exception is a bug and keeps its traceback."""
  a = _parser().parse_args(argv)
  try:
    return _run(a)
  except UserError as e:
    return _fail(str(e))


def _run(a: argparse.Namespace) -> int:
  for flag in ("beam_size", "batch_size", "max_len"):
    if getattr(a, flag) < (3 if flag == "max_len" else 1):
      raise UserError(f"--{flag}: must be >= {3 if flag == 'max_len' else 1}, got "
                      f"{getattr(a, flag)}")
  if not os.path.isfile(a.embeddings):
    raise InputError(f"--embeddings {a.embeddings}: no such file")
  fileio.check_output_path(a.out, "--out")
  if os.path.abspath(a.out) == os.path.abspath(a.embeddings):
    raise UserError(f"--out {a.out}: same file as --embeddings")
  t0 = time.time()
  inp = read_input(a.embeddings)
  try:
    sonar.resolve_device(a.device)
  except UserError as e:
    raise UserError(f"--device {a.device}: {e}") from None
  os.environ.setdefault("FAIRSEQ2_NO_PROGRESS", "1")  # no progress bars from fairseq2's loaders
  try:
    decoder = sonar.EmbeddingDecoder.load(a.decoder, a.tokenizer, device=a.device, dtype=a.dtype,
                                          batch_size=a.batch_size)
  except sonar.SonarLoadError as e:
    raise UserError(f"--decoder {a.decoder}: {e}") from None
  if inp.dim != decoder.dim:
    raise InputError(f"{a.embeddings}: field 'embeddings': concept dim {inp.dim} != "
                     f"{decoder.dim}, the input dim of decoder {a.decoder}")
  try:
    decoder.check_lang(a.target_lang)
  except UserError as e:
    raise UserError(f"--target_lang {a.target_lang}: {e}") from None
  n = len(inp.concepts)
  _log(f"decoding {n} concepts of {len(inp.ids)} rows with {a.decoder} on {decoder.device} "
       f"({str(decoder.dtype).replace('torch.', '')}), beam {a.beam_size}, max_len {a.max_len}")
  t1 = time.time()
  texts = decoder.decode(inp.concepts, a.target_lang, beam_size=a.beam_size, max_len=a.max_len,
                         batch_size=a.batch_size, progress=_Progress())
  write_jsonl_atomic(a.out, to_records(inp, texts))
  dt = time.time() - t1
  _log(f"wrote {a.out}: {len(inp.ids)} rows, {n} sentences; decoding {dt:.1f} s "
       f"({n / max(dt, 1e-9):.1f} concepts/s), total {time.time() - t0:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
