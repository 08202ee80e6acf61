r"""Text-side evaluation (PyTorch): SONAR round-trip L2 of predicted concepts, and ROUGE-L of
generated continuations against target texts.

  python -m data_prep.eval_text roundtrip --predictions=FILE.npz [--out=FILE.json] \
      [--texts=FILE.jsonl] [--encoder=text_sonar_basic_encoder] [--decoder=text_sonar_basic_decoder] \
      [--tokenizer=CARD_OR_PATH] [--lang=eng_Latn] [--max=N] [--beam_size=5] [--decode_max_len=256] \
      [--batch_size=32] [--device=cuda] [--dtype=float32]
  python -m data_prep.eval_text rouge --data=FILE.jsonl [--source_field=source] \
      [--target_field=target] [--id_field=id] (--card=DIR/model_card.yaml | --workdir=W [--step=S]) \
      --out=FILE.json [--predictions_out=FILE.jsonl] [--source_prefix=TEXT] \
      [--source_suffix="[MODEL]:"] [--batch_size=64] [--max=N] [data_prep.text_generate's flags]
  python -m data_prep.eval_text {roundtrip,rouge} --help

roundtrip
  ``--predictions``: the ``.npz`` of ``python -m lcm_jax.evaluate --save_predictions``:
  ``predictions`` (N, S) floats in raw (denormalized) SONAR space, optional ``targets`` (N, S),
  ``doc_index`` (N,) and ``position`` (N,) integers. Also accepted: anything
  ``python -m data_prep.decode`` reads (:func:`data_prep.decode.read_input`: generate's ``.npz``
  with ``embeddings`` (B, T, S) + ``lengths``, an ``.npz`` with ``embeddings`` (n, S), an (n, S)
  ``.npy``); then every generated concept is one prediction. ``--max=N`` keeps the first N.
  Each prediction ``p`` is decoded to a sentence with the SONAR decoder (beam search,
  ``--lang``), the sentence is encoded again with the SONAR encoder (``--lang``) to ``r``, and

  * ``roundtrip_l2`` = ``||r - p||`` (the paper's round-trip L2: decode then re-encode the prediction):
    how far a prediction is from a vector that decodes to the same text, i.e. from the part of
    SONAR space the decoder/encoder pair maps to itself;
  * with ``targets``: ``l2_to_target`` = ``||p - t||`` (the plain teacher-forced L2) and
    ``roundtrip_l2_to_target`` = ``||r - t||`` (the L2 of the re-encoded prediction to the ground
    truth).

  Every metric is reported as mean, median, std, min and max (float64). ``--out`` (JSON, atomic):
  ``{"tool", "subcommand", "settings", "count", "metrics"}``; ``--texts`` (JSONL, atomic): one line
  per prediction ``{"index", "text", "roundtrip_l2", ...}`` with ``doc_index``/``position`` (or
  ``id``/``concept`` for generate's files) and the per-prediction target L2s. A short table goes
  to stdout.

rouge
  ``--data``: JSONL, one source/target pair per non-blank line (``--source_field``,
  ``--target_field``, dotted names reach nested objects, as ``data_prep.embed``). The source is a
  string; the target a string or a list of strings (sentences). Per pair the prompt's concepts
  are ``[--source_prefix] + SaT sentences of the source + [--source_suffix]``: the source is
  segmented and encoded in ``--lang``, the prefix and suffix are constant sentences encoded whole
  (never segmented) in ``--eot_lang``, exactly as ``data_prep.embed`` lays out a fine-tuning
  pair's source (default suffix ``"[MODEL]:"``, as embed's; ``--source_suffix=`` turns it off for
  a model not fine-tuned on pairs). Generation is ``python -m data_prep.text_generate``'s path
  (:func:`data_prep.text_generate.load_models` once, then
  :func:`~data_prep.text_generate.generate_texts` per batch: SaT segmentation, SONAR encoding,
  :class:`lcm_interop.torch_generate.Generator`, SONAR decoding) with its flags, names and defaults
  (``--card``/``--workdir``/``--step``, ``--sat_model``, ``--encoder``, ``--decoder``,
  ``--max_len``, ``--eot_threshold``, ``--temperature``, the sampler flags, ``--seed``, ...; see
  ``python -m data_prep.text_generate --help``). The models are loaded once (a ``--workdir`` is
  exported once); pairs go to the generator ``--batch_size`` at a time, and every batch draws its
  noise from ``--seed`` afresh, so a batch's continuations are deterministic and are those of one
  ``text_generate`` call on that batch's prompts with the same constants (with sampling noise,
  ``--temperature > 0`` or a diffusion model, they therefore depend on ``--batch_size``).

  Scores: ``rouge_score.rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)``
  (the ``rouge-score`` package: lowercase, non-alphanumerics to spaces, Porter stemmer, no nltk
  data needed), ``score(target, prediction)``. For ``rougeL`` the prediction is the generated
  sentences joined by spaces and the target its text (a list target joined by spaces). For
  ``rougeLsum`` (summary-level LCS over sentences split at newlines) the prediction is the
  generated sentences joined by newlines, and the target its text with its own newlines (one
  summary sentence per line, as CNN/DailyMail's highlights) or a list target joined by newlines;
  a target without newlines counts as one sentence. Reported: mean precision, recall and F1 over
  the pairs, x100 (the paper's 36.47 is a mean ROUGE-L F1 x100). ``--out`` (JSON, atomic):
  ``{"tool", "subcommand", "settings", "count", "metrics", "stop_reasons",
  "mean_generated_sentences"}``; ``--predictions_out`` (JSONL, atomic): one line per pair
  ``{"id", "line", "prompt_sentences", "sentences", "text", "target", "stop_reason", "rougeL",
  "rougeLsum"}`` (per-pair scores x100; ``prompt_sentences`` includes the prefix and suffix, one
  per prompt concept).

User errors (a missing file, a missing or malformed field, an empty data file, a dimension that is
not the encoder's/decoder's, a model that does not load, an output path that is a directory or
cannot be written, bad settings) print one ``error: ...`` line naming the file, the record/line
and the field (or the flag) and exit with status 2; nothing is written (the output paths are
checked before any work). Any other exception is a bug and keeps its traceback.
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

from data_prep import decode
from data_prep import text_generate
from data_prep.text_generate import UserError
from lcm_jax import errors
from lcm_jax import fileio
from lcm_jax import schema

TOOL = "data_prep.eval_text"
ROUGE_TYPES = ("rougeL", "rougeLsum")
_STATS = ("mean", "median", "std", "min", "max")
# text_generate flags that eval_text rouge sets itself.
_RESERVED_TG_FLAGS = ("--prompt", "--prompt_file", "--concepts", "--out")


# Bad input or settings: one ``error:`` line, exit status 2: text_generate's UserError (shared with
# text_generate, whose functions eval_text calls) and the project's lcm_jax.errors.UserError
# (decode.InputError, sonar's checks and load errors, ...). Nothing else: any other exception,
# a ValueError from a library included, is a bug and keeps its traceback.
USER_ERRORS = (UserError, errors.UserError)


def _log(msg: str) -> None:
  print(f"[{TOOL}] {msg}", file=sys.stderr, flush=True)


def _check_out(flag: str, path: Optional[str], inputs: Sequence[str] = ()) -> None:
  """Before any work: ``path`` can be written (not a directory, its directory writable or
  creatable) and is none of ``inputs``."""
  if path is None:
    return
  if os.path.isdir(path):
    raise UserError(f"{flag} {path}: is a directory")
  fileio.check_output_path(path, flag)
  for other in inputs:
    if os.path.abspath(path) == os.path.abspath(other):
      raise UserError(f"{flag} {path}: same file as the input {other}")


def _stats(x: np.ndarray) -> dict[str, float]:
  x = np.asarray(x, np.float64)
  return {"mean": float(x.mean()), "median": float(np.median(x)), "std": float(x.std()),
          "min": float(x.min()), "max": float(x.max())}


# ----------------------------------------------------------------------------------------------
# Round trip

@dataclasses.dataclass
class Predictions:
  """What ``roundtrip`` evaluates: ``predictions`` (N, S) float32 raw SONAR vectors."""

  predictions: np.ndarray
  targets: Optional[np.ndarray]
  """(N, S) float32 or None."""
  extra: dict[str, list[Any]]
  """Per-prediction columns for ``--texts``: doc_index/position, or id/concept."""

  @property
  def dim(self) -> int:
    return int(self.predictions.shape[1])


def _vectors(path: str, data: Any, name: str, shape: Optional[tuple[int, ...]]) -> np.ndarray:
  x = decode.npz_field(path, data, name)
  if shape is None:
    if x.ndim != 2 or x.shape[1] == 0:
      raise UserError(f"{path}: field '{name}': expected shape (N, S), got {x.shape}")
  elif x.shape != shape:
    raise UserError(f"{path}: field '{name}': expected shape {shape} (as 'predictions'), got "
                    f"{x.shape}")
  if not np.issubdtype(x.dtype, np.floating):
    raise UserError(f"{path}: field '{name}': expected floats, got dtype {x.dtype}")
  bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
  if len(bad):
    raise UserError(f"{path}: field '{name}': row {int(bad[0])} is not finite")
  return np.asarray(x, np.float32)


def read_predictions(path: str, max_rows: Optional[int] = None) -> Predictions:
  """Reads ``--predictions`` (module docstring); UserError or decode.InputError naming the file
  and field."""
  data = decode.load_npy_npz(path)
  if isinstance(data, np.ndarray) or "predictions" not in data:
    if not isinstance(data, np.ndarray):
      keys = sorted(data.keys())
      data.close()
      if "embeddings" not in keys:
        raise UserError(f"{path}: field 'predictions' is missing (fields: "
                        f"{', '.join(keys) or 'none'}); expected lcm_jax.evaluate's "
                        "--save_predictions file (or generate's embeddings + lengths)")
    inp = decode.read_input(path)
    ids = [rid for rid, n in zip(inp.ids, inp.lengths.tolist()) for _ in range(n)]
    concept = [j for n in inp.lengths.tolist() for j in range(n)]
    out = Predictions(inp.concepts, None, {"id": ids, "concept": concept})
  else:
    try:
      pred = _vectors(path, data, "predictions", None)
      n = pred.shape[0]
      targets = _vectors(path, data, "targets", pred.shape) if "targets" in data else None
      extra: dict[str, list[Any]] = {}
      for name in ("doc_index", "position"):
        if name in data:
          a = decode.npz_field(path, data, name)
          if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
            raise UserError(f"{path}: field '{name}': expected ({n},) integers, got {a.shape} "
                            f"{a.dtype}")
          extra[name] = [int(v) for v in a.tolist()]
    finally:
      data.close()
    out = Predictions(pred, targets, extra)
  if max_rows is not None:
    out = Predictions(out.predictions[:max_rows],
                      None if out.targets is None else out.targets[:max_rows],
                      {k: v[:max_rows] for k, v in out.extra.items()})
  if len(out.predictions) == 0:
    raise UserError(f"{path}: field 'predictions': no predictions to evaluate")
  return out


def roundtrip_metrics(pred: np.ndarray, reencoded: np.ndarray,
                      targets: Optional[np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """``(metrics, per-row L2s)``: round-trip L2 (and the target L2s when ``targets``), float64."""
  p = np.asarray(pred, np.float64)
  r = np.asarray(reencoded, np.float64)
  rows = {"roundtrip_l2": np.linalg.norm(r - p, axis=1)}
  if targets is not None:
    t = np.asarray(targets, np.float64)
    rows["l2_to_target"] = np.linalg.norm(p - t, axis=1)
    rows["roundtrip_l2_to_target"] = np.linalg.norm(r - t, axis=1)
  return {k: _stats(v) for k, v in rows.items()}, rows


def run_roundtrip(a: argparse.Namespace) -> dict[str, Any]:
  """The ``roundtrip`` subcommand after flag parsing; returns the JSON written to ``--out``."""
  from data_prep import sonar  # pylint: disable=g-import-not-at-top
  for flag in ("beam_size", "batch_size", "decode_max_len"):
    low = 3 if flag == "decode_max_len" else 1
    if getattr(a, flag) < low:
      raise UserError(f"--{flag}: must be >= {low}, got {getattr(a, flag)}")
  if a.max is not None and a.max < 1:
    raise UserError(f"--max: must be >= 1, got {a.max}")
  if not os.path.isfile(a.predictions):
    raise UserError(f"--predictions {a.predictions}: no such file")
  _check_out("--out", a.out, [a.predictions])
  _check_out("--texts", a.texts, [a.predictions] + ([a.out] if a.out else []))
  t0 = time.time()
  inp = read_predictions(a.predictions, a.max)
  try:
    sonar.resolve_device(a.device)
  except errors.UserError as e:
    raise UserError(f"--device {a.device}: {e}") from None
  os.environ.setdefault("FAIRSEQ2_NO_PROGRESS", "1")
  try:  # SonarLoadError and sonar's setting checks: user errors; anything else is a bug
    decoder = sonar.load_text_decoder(a.decoder, a.tokenizer, device=a.device, dtype=a.dtype,
                                      batch_size=a.batch_size)
  except errors.UserError as e:
    raise UserError(f"--decoder {a.decoder}: {e}") from None
  try:
    encoder = sonar.load_text_encoder(a.encoder, a.tokenizer, device=a.device, dtype=a.dtype)
  except errors.UserError as e:
    raise UserError(f"--encoder {a.encoder}: {e}") from None
  for flag, spec, dim in (("--decoder", a.decoder, decoder.dim),
                          ("--encoder", a.encoder, encoder.dim)):
    if inp.dim != dim:
      raise UserError(f"{a.predictions}: field 'predictions': dim {inp.dim} != {dim}, the "
                      f"dimension of {flag} {spec}")
  try:
    decoder.check_lang(a.lang)
  except errors.UserError as e:
    raise UserError(f"--lang {a.lang}: {e}") from None
  n = len(inp.predictions)
  _log(f"decoding and re-encoding {n} predictions with {a.decoder} / {a.encoder} on "
       f"{decoder.device}, beam {a.beam_size}")
  t1 = time.time()
  texts = decoder.decode(inp.predictions, a.lang, beam_size=a.beam_size,
                         max_len=a.decode_max_len, batch_size=a.batch_size)
  reencoded = encoder.encode(texts, a.lang)
  metrics, rows = roundtrip_metrics(inp.predictions, reencoded, inp.targets)
  dt = time.time() - t1
  settings = {k: getattr(a, k) for k in ("predictions", "decoder", "encoder", "tokenizer", "lang",
                                         "max", "beam_size", "decode_max_len", "batch_size",
                                         "device", "dtype")}
  result = {"tool": TOOL, "subcommand": "roundtrip", "settings": settings, "count": n,
            "has_targets": inp.targets is not None, "metrics": metrics,
            "seconds": round(dt, 3)}
  if a.texts:
    records = []
    for i, text in enumerate(texts):
      rec: dict[str, Any] = {"index": i, **{k: v[i] for k, v in inp.extra.items()}, "text": text}
      rec.update({k: float(v[i]) for k, v in rows.items()})
      records.append(rec)
    decode.write_jsonl_atomic(a.texts, records)
  if a.out:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    schema.write_json_atomic(a.out, result)
  print(f"{'metric':<24}" + "".join(f"{s:>10}" for s in _STATS))
  for name, st in metrics.items():
    print(f"{name:<24}" + "".join(f"{st[s]:>10.4f}" for s in _STATS))
  print(f"count {n}")
  _log(f"{n} predictions in {dt:.1f} s (total {time.time() - t0:.1f} s)"
       + "".join(f"; wrote {p}" for p in (a.out, a.texts) if p))
  return result


# ----------------------------------------------------------------------------------------------
# ROUGE-L

def make_scorer(use_stemmer: bool = True) -> Any:
  """``RougeScorer(["rougeL", "rougeLsum"], use_stemmer=use_stemmer)`` (module docstring)."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)


def score_pair(scorer: Any, sentences: Sequence[str], target: str | Sequence[str]
               ) -> dict[str, dict[str, float]]:
  """ROUGE-L and ROUGE-Lsum (precision, recall, fmeasure, x100) of the generated ``sentences``
  against ``target`` (a text, or a list of sentences): the joining rules of the module docstring."""
  if isinstance(target, str):
    target_l, target_lsum = target, target
  else:
    target_l, target_lsum = " ".join(target), "\n".join(target)
  out = {}
  for kind, tgt, pred in (("rougeL", target_l, " ".join(sentences)),
                          ("rougeLsum", target_lsum, "\n".join(sentences))):
    s = scorer.score(tgt, pred)[kind]
    out[kind] = {"precision": 100.0 * s.precision, "recall": 100.0 * s.recall,
                 "fmeasure": 100.0 * s.fmeasure}
  return out


@dataclasses.dataclass
class Pair:
  id: str
  line: int
  source: str
  target: str | list[str]


def read_pairs(path: str, source_field: str, target_field: str,
               id_field: Optional[str] = "id") -> list[Pair]:
  """The source/target pairs of a JSONL file; UserError naming the file, line and field."""
  from data_prep.inputs import _lookup  # pylint: disable=g-import-not-at-top,protected-access
  if not os.path.isfile(path):
    raise UserError(f"--data {path}: no such file")
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"--data {path}: {e}") from None
  pairs = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}:{n}"
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{where}: bad JSON ({e})") from None
    if not isinstance(rec, dict):
      raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    found, source = _lookup(rec, source_field)
    if not found:
      raise UserError(f"{where}: field '{source_field}' (--source_field) is missing")
    if not isinstance(source, str) or not source.strip():
      raise UserError(f"{where}: field '{source_field}': expected a non-empty string")
    found, target = _lookup(rec, target_field)
    if not found:
      raise UserError(f"{where}: field '{target_field}' (--target_field) is missing")
    ok = (isinstance(target, str) and target.strip()) or (
        isinstance(target, list) and target and all(isinstance(s, str) for s in target)
        and any(s.strip() for s in target))
    if not ok:
      raise UserError(f"{where}: field '{target_field}': expected a non-empty string or list of "
                      "strings")
    rid = f"{os.path.basename(path)}:{n}"
    if id_field:
      found, v = _lookup(rec, id_field)
      if found and v is not None:
        rid = str(v)
    pairs.append(Pair(rid, n, source, target))
  if not pairs:
    raise UserError(f"--data {path}: no source/target pairs (the file is empty)")
  return pairs


def _generation_args(extras: Sequence[str]) -> argparse.Namespace:
  """``data_prep.text_generate``'s flags (its parser, defaults and checks) from ``extras``."""
  for x in extras:
    if x.split("=", 1)[0] in _RESERVED_TG_FLAGS:
      raise UserError(f"{x.split('=', 1)[0]}: not a flag of eval_text rouge (the prompts come "
                      "from --data, the output goes to --out/--predictions_out)")
  p = text_generate._parser()  # pylint: disable=protected-access
  p.prog = f"python -m {TOOL} rouge"
  return p.parse_args(list(extras) + ["--prompt_file=-", "--out=-"])


def run_rouge(a: argparse.Namespace, extras: Sequence[str]) -> dict[str, Any]:
  """The ``rouge`` subcommand after flag parsing; returns the JSON written to ``--out``."""
  g = _generation_args(extras)
  if a.batch_size < 1:
    raise UserError(f"--batch_size: must be >= 1, got {a.batch_size}")
  if a.max is not None and a.max < 1:
    raise UserError(f"--max: must be >= 1, got {a.max}")
  for flag in ("source_prefix", "source_suffix"):
    v = getattr(a, flag)
    if v is not None and v and not v.strip():
      raise UserError(f"--{flag} {v!r}: is blank (give a sentence, or an empty value for none)")
  _check_out("--out", a.out, [a.data])
  _check_out("--predictions_out", a.predictions_out, [a.data, a.out])
  pairs = read_pairs(a.data, a.source_field, a.target_field, a.id_field)[:a.max]
  scorer = make_scorer(use_stemmer=True)
  prefix = [a.source_prefix] if a.source_prefix else []
  suffix = [a.source_suffix] if a.source_suffix else []
  t0 = time.time()
  models = text_generate.load_models(g)  # once: a --workdir is exported once
  records: list[dict[str, Any]] = []
  for start in range(0, len(pairs), a.batch_size):
    batch = pairs[start:start + a.batch_size]
    # Every batch draws its noise from --seed afresh (module docstring).
    generated, _ = text_generate.generate_texts(
        models, g, [(f"{a.data}:{p.line}", p.source) for p in batch], prefix=prefix,
        suffix=suffix)
    for p, rec in zip(batch, generated):
      records.append({"id": p.id, "line": p.line, "prompt_sentences": rec["prompt_sentences"],
                      "sentences": rec["sentences"], "text": rec["text"], "target": p.target,
                      "stop_reason": rec["stop_reason"],
                      **score_pair(scorer, rec["sentences"], p.target)})
    _log(f"generated and scored {len(records)}/{len(pairs)} pairs")
  metrics = {kind: {m: float(np.mean([r[kind][m] for r in records]))
                    for m in ("precision", "recall", "fmeasure")} for kind in ROUGE_TYPES}
  reasons: dict[str, int] = {}
  for r in records:
    reasons[r["stop_reason"]] = reasons.get(r["stop_reason"], 0) + 1
  gen_settings = {k: v for k, v in vars(g).items()
                  if k not in ("prompt", "prompt_file", "out", "concepts", "card", "workdir")}
  settings = {"data": a.data, "source_field": a.source_field, "target_field": a.target_field,
              "id_field": a.id_field, "source_prefix": a.source_prefix,
              "source_suffix": a.source_suffix, "batch_size": a.batch_size, "max": a.max,
              "card": g.card, "workdir": g.workdir, **gen_settings,
              "rouge": {"types": list(ROUGE_TYPES), "use_stemmer": True,
                        "rougeLsum_sentences": "newline"}}
  result = {"tool": TOOL, "subcommand": "rouge", "settings": settings, "count": len(records),
            "metrics": metrics, "stop_reasons": reasons,
            "mean_generated_sentences": float(np.mean([len(r["sentences"]) for r in records])),
            "seconds": round(time.time() - t0, 3)}
  if a.predictions_out:
    decode.write_jsonl_atomic(a.predictions_out, records)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  schema.write_json_atomic(a.out, result)
  print(f"{'metric':<12}{'precision':>10}{'recall':>10}{'F1':>10}")
  for kind, m in metrics.items():
    print(f"{kind:<12}{m['precision']:>10.2f}{m['recall']:>10.2f}{m['fmeasure']:>10.2f}")
  print(f"count {len(records)}")
  _log(f"{len(records)} pairs in {time.time() - t0:.1f} s; wrote {a.out}"
       + (f" and {a.predictions_out}" if a.predictions_out else ""))
  return result


# ----------------------------------------------------------------------------------------------
# CLI

def _parser() -> argparse.ArgumentParser:
  from data_prep import sonar  # pylint: disable=g-import-not-at-top
  fmt = argparse.ArgumentDefaultsHelpFormatter
  p = argparse.ArgumentParser(
      prog=f"python -m {TOOL}", formatter_class=fmt,
      description="Text-side evaluation with SONAR (PyTorch): round-trip L2 of predicted "
                  "concepts, and ROUGE-L of generated continuations.")
  sub = p.add_subparsers(dest="command", required=True)
  r = sub.add_parser("roundtrip", formatter_class=fmt,
                     help="decode predictions, re-encode, L2 to the prediction (and target)",
                     description="Decode each predicted concept with SONAR, re-encode the text "
                                 "and report the L2 of the re-encoded vector to the prediction "
                                 "(and to the target, when the file has targets).")
  r.add_argument("--predictions", required=True,
                 help="lcm_jax.evaluate --save_predictions .npz (predictions [+ targets, "
                      "doc_index, position]), or a file data_prep.decode reads")
  r.add_argument("--out", default=None, help="metrics .json (written atomically)")
  r.add_argument("--texts", default=None, help="per-prediction decoded texts and L2s, .jsonl")
  r.add_argument("--encoder", default=sonar.DEFAULT_ENCODER, help="SONAR encoder card/path")
  r.add_argument("--decoder", default=sonar.DEFAULT_DECODER, help="SONAR decoder card/path")
  r.add_argument("--tokenizer", default=None,
                 help="SONAR tokenizer card/path (default: the encoder's / decoder's own)")
  r.add_argument("--lang", default=sonar.DEFAULT_LANG, help="language decoded to and encoded from")
  r.add_argument("--max", type=int, default=None, help="evaluate the first N predictions only")
  r.add_argument("--beam_size", type=int, default=5, help="SONAR decoder beam width")
  r.add_argument("--decode_max_len", type=int, default=256, help="most TOKENS per decoded sentence")
  r.add_argument("--batch_size", type=int, default=32, help="vectors per beam-search batch")
  r.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
  r.add_argument("--dtype", default=None, choices=sonar.DTYPES,
                 help="SONAR dtype (default: float16 on cuda, float32 on cpu)")
  g = sub.add_parser(
      "rouge", formatter_class=fmt,
      help="generate continuations of sources, ROUGE-L against targets",
      description="Generate a continuation of every source with the PyTorch LCM (exactly "
                  "data_prep.text_generate's path), decode it and score ROUGE-L / ROUGE-Lsum "
                  "against the target.",
      epilog="Model and generation flags: those of python -m data_prep.text_generate (same names "
             "and defaults): --card | --workdir [--step], --sat_model, --sat_tokenizer, "
             "--encoder, --decoder, --tokenizer, --lang, --target_lang, --eot_text, --eot_lang "
             "(also the language of --source_prefix/--source_suffix), --max_len, "
             "--min_gen_len, --eot_threshold, --repetition_threshold, "
             "--[no-]sample_latent_variable, --temperature, "
             "--sampler_steps, --guidance_scale, --guidance_rescale, --initial_noise_scale, "
             "--eta, --seed, --beam_size, --decode_max_len, --device, ...; see its --help.")
  g.add_argument("--data", required=True, help="source/target pairs, .jsonl")
  g.add_argument("--source_field", default="source", help="the source (prompt) field")
  g.add_argument("--target_field", default="target", help="the target (reference) field")
  g.add_argument("--id_field", default="id", help="the id field (else FILE:LINE)")
  g.add_argument("--out", required=True, help="metrics .json (written atomically)")
  g.add_argument("--predictions_out", default=None,
                 help="per-pair generated texts and scores, .jsonl")
  g.add_argument("--source_prefix", default=None, help="a sentence before every source")
  g.add_argument("--source_suffix", default="[MODEL]:",
                 help="a sentence after every source (data_prep.embed's); empty = none")
  g.add_argument("--batch_size", type=int, default=64,
                 help="pairs per generation batch (noise drawn from --seed per batch)")
  g.add_argument("--max", type=int, default=None, help="evaluate the first N pairs only")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  p = _parser()
  a, extras = p.parse_known_args(argv)
  if a.command == "roundtrip" and extras:
    p.error(f"unrecognized arguments: {' '.join(extras)}")
  try:
    if a.command == "roundtrip":
      run_roundtrip(a)
    else:
      run_rouge(a, extras)
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
