r"""Embedding-job overhead: documents through data_prep.embed vs the bare SONAR encoder, same run.

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embed.py                  # tiny and bench sizes
  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embed.py --sizes=bench --rounds=5 --docs=200
  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embed.py --sonar_dim=128 --sonar_layers=4
  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embed.py --models=M      # a tiny_models dir M

The issue's question: how much slower is the whole job (read, segment, encode, write, merge) than
the bare SONAR encoder on the same sentences? Target: job sentences/s >= 0.9 x bare sentences/s.

What runs. ``--docs`` documents of :func:`data_prep.text_corpus.documents` (1-12 English-like
sentences, about 1 in 12 a 300-700 character run-on that the 250-character cap re-splits) are
written to one JSONL file. Models are tiny random ones (:mod:`data_prep.tiny_models`: the 2-layer,
hidden-32 SaT, and a random SONAR text encoder run by sonar's own model code with the fairseq2
NLLB tokenizer), built in a temporary directory for each size, or taken from ``--models``. Each
size, after an untimed warm-up of both sides on the first ``--warmup_docs`` documents, runs
``--rounds`` interleaved rounds (which side goes first alternates from round to round):

  * job: the WHOLE job in process, ``data_prep.embed.main([--input=corpus.jsonl, --out=NEW_DIR,
    --num_workers=1, --batch_size, --shard_docs, --sat_threshold, --sat_model, --encoder])``:
    opening and planning the input, plan.json, reading the documents, SaT segmentation with the
    cap, SONAR encoding (with the once-per-run end-of-text sentence), building the records,
    writing the ArrayRecord shard(s) and manifest parts, and the automatic merge into
    manifest.json. Wall-clock around ``main``, into a new output directory every round;
  * bare: ``SentenceEncoder.encode`` on exactly the sentences the job encoded, read back from
    the shards (each record's ``texts`` without its final end-of-text sentence), one call per
    shard as the job makes them (the job encodes a shard's sentences in one call; ``encode``
    sorts them by token count), same ``--batch_size``, same loaded model, same language. Its
    rows are checked once against the job's stored (float16) embeddings.

Model loading is excluded without estimating anything: the job's ``main`` runs unchanged except
that, during the timed calls, ``data_prep.sat.load_sat`` and ``data_prep.sonar.load_text_encoder``
are stand-ins that hand over the models loaded once before the rounds (SaT: the loaded wtpsplit
object; SONAR: a new ``SentenceEncoder`` around the loaded pipeline with the job's
batch_size/max_tokens, which is how the real loader ends). So the job's time holds everything a
worker does after loading, and no separately timed load is subtracted (that difference would be
noisier than the overhead measured). Load times and the ``import torch`` time are printed once,
not counted. For the split, ``Segmenter.segment``, ``SentenceEncoder.encode``,
``schema.write_shard`` and ``embed.merge`` are wrapped by two ``perf_counter`` calls each (a
handful of calls per run).

Printed per size, per round and as medians over rounds (each column its own median): job
seconds, documents/s and sentences/s (sentences = the segmented sentences, end-of-text
constants not counted; the same count for both sides), bare-encoder seconds and sentences/s,
ratio = job sentences/s / bare sentences/s, and the job's time split: seg (SaT predict + split +
cap), enc (SONAR encode inside the job), write (shard files), merge, other (the rest: input
reading and planning, plan/part JSON, record building, glue), then seg%, enc%, rest% of the job.
SaT is part of the job, so the ratio is at most about enc% / 100.

Sizes (``--sizes``, default both; ``--sonar_dim``/``--sonar_layers``/``--sonar_heads``/
``--sonar_ffn`` replace them by one custom size; every size uses the same tiny SaT, which
tiny_models does not scale):

  * ``tiny`` (400 documents): SONAR dim 32, 2 layers, 4 heads, FFN 128, the tests' models. The
    encoder is then so cheap that SaT dominates the job (~80-85%): the ratio mostly measures SaT.
  * ``bench`` (100 documents, to stay within ~3 minutes in all on 2 cores): SONAR dim 256,
    4 layers, 4 heads, FFN 2048 (8 x dim like SONAR's 1024 -> 8192). It mimics production's
    TIME proportion between the two models, not their sizes or FLOP ratio (at these widths
    per-call overhead, not FLOPs, sets the cost). Production: the SONAR encoder, 24 layers x
    1024 (FFN 8192, ~0.5 GMAC per token), runs on every sentence; SaT-3l, 3 layers x 768 over
    XLM-R subword tokens (FFN 3072, ~21 MMAC per token, 24 x less), runs once over each
    document in 512-token windows: a text is padded to the longest of its 64-text SaT call, and
    a text over 512 tokens is cut into windows 64 tokens apart (``sat.split``'s stride), so each
    of its tokens goes through ~8 windows. Estimated SaT share of a production job: ~4% for
    short documents (one window, little padding), ~7-10% with 2-3 x padding or overlap, up to
    ~20-25% for long (Wikipedia-length) documents. Here bench measures SaT ~7-10%, encoding
    ~90-93%; the tiny SaT tokenizer makes this corpus ~430 tokens per document, so ~3.4
    window tokens per text token.

SaT threshold (``--sat_threshold``, default 0.7, passed to the job). The random tiny SaT at the
production threshold 0.2 cuts every ~9 characters (~69 "sentences" per document, a few SONAR
tokens each), which no real SaT does; at 0.7 it gives ~8.5 sentences of ~75 characters per
document, close to the corpus' true sentences (~6.5 per document, plus the cap's pieces of the
run-ons), so the encoder sees sentence lengths like production's.

Threads: ``OMP_NUM_THREADS`` is set to ``--threads`` before torch is imported, and
``torch.set_num_threads(--threads)``; on a shared CPU extra threads spin and slow both sides
(data_prep.sonar's docstring). HF_HUB_OFFLINE=1 is set: nothing is downloaded. The job's log
lines go to a buffer, shown only if the job fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(dim=32, layers=2, heads=4, ffn=128, docs=400),
    "bench": dict(dim=256, layers=4, heads=4, ffn=2048, docs=100),
}
LANG = "eng_Latn"
EOT = "End of text."
PHASES = ("seg", "enc", "write", "merge")


class Clock:
  """Seconds summed per phase name over the wrapped calls of one job run."""

  def __init__(self) -> None:
    self.total: dict[str, float] = {}

  def reset(self) -> None:
    self.total = {p: 0.0 for p in PHASES}

  def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
      t0 = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        self.total[phase] = self.total.get(phase, 0.0) + time.perf_counter() - t0
    return timed


class Loaded:
  """The models of one size, loaded once, and the patches that hand them to ``embed.main``."""

  def __init__(self, paths: dict[str, str], batch_size: int):
    from data_prep import sat, sonar  # pylint: disable=g-import-not-at-top
    self.paths = paths
    t0 = time.perf_counter()
    self.sat = sat.load_sat(paths["sat_model"], paths["sat_tokenizer"])
    self.sat_load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    self.encoder = sonar.load_text_encoder(paths["encoder"], batch_size=batch_size)
    self.encoder_load_s = time.perf_counter() - t0
    self.clock = Clock()

  @contextlib.contextmanager
  def patched(self):
    """``embed.main`` gets these models instead of loading them; four calls are timed."""
    from data_prep import embed, sat, sonar  # pylint: disable=g-import-not-at-top
    from lcm_jax import schema  # pylint: disable=g-import-not-at-top
    clock, loaded = self.clock, self
    real_segmenter, real_encoder_cls = sat.Segmenter, sonar.SentenceEncoder

    def load_sat(model: str, tokenizer: str | None = None, device: str | None = None) -> Any:
      if os.path.abspath(model) != loaded.paths["sat_model"] or device is not None:
        raise AssertionError(f"benchmark: the job asked for SaT {model!r} on {device!r}")
      return loaded.sat

    class TimedSegmenter(real_segmenter):  # type: ignore[misc,valid-type]
      segment = clock.wrap("seg", real_segmenter.segment)

    class TimedEncoder(real_encoder_cls):  # type: ignore[misc,valid-type]
      encode = clock.wrap("enc", real_encoder_cls.encode)

    def load_text_encoder(encoder: str, tokenizer: str | None = None, device: str | None = None,
                          dtype: str | None = None, *, batch_size: int = 64,
                          max_tokens: int | None = None) -> Any:
      if (os.path.abspath(encoder) != loaded.paths["encoder"] or tokenizer is not None
          or device is not None or dtype is not None):
        raise AssertionError(f"benchmark: the job asked for SONAR {encoder!r} {tokenizer!r} on "
                             f"{device!r} {dtype!r}")
      return TimedEncoder(loaded.encoder.pipeline, batch_size=batch_size, max_tokens=max_tokens)

    saved = [(sat, "load_sat", sat.load_sat), (sat, "Segmenter", sat.Segmenter),
             (sonar, "load_text_encoder", sonar.load_text_encoder),
             (schema, "write_shard", schema.write_shard), (embed, "merge", embed.merge)]
    sat.load_sat, sat.Segmenter = load_sat, TimedSegmenter
    sonar.load_text_encoder = load_text_encoder
    schema.write_shard = clock.wrap("write", schema.write_shard)
    embed.merge = clock.wrap("merge", embed.merge)
    try:
      yield
    finally:
      for module, name, value in saved:
        setattr(module, name, value)


def _quiet() -> contextlib.AbstractContextManager:
  """Drops stderr: fairseq2's initialisation re-enables and prints its own DeprecationWarnings."""
  return contextlib.redirect_stderr(io.StringIO())


def write_corpus(path: str, docs: Sequence[str]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for i, d in enumerate(docs):
      f.write(json.dumps({"id": f"doc{i:05d}", "text": d}) + "\n")


def run_job(loaded: Loaded, corpus: str, out: str, args: argparse.Namespace) -> tuple[float, dict]:
  """Runs ``embed.main`` into the fresh directory ``out``; returns (seconds, phase seconds)."""
  from data_prep import embed  # pylint: disable=g-import-not-at-top
  argv = [f"--input={corpus}", f"--out={out}", "--num_workers=1", "--worker_index=0",
          f"--batch_size={args.batch_size}", f"--shard_docs={args.shard_docs}",
          f"--sat_threshold={args.sat_threshold}",
          f"--sat_model={loaded.paths['sat_model']}", f"--encoder={loaded.paths['encoder']}"]
  buf = io.StringIO()
  with loaded.patched(), contextlib.redirect_stderr(buf):
    loaded.clock.reset()
    t0 = time.perf_counter()
    rc = embed.main(argv)
    dt = time.perf_counter() - t0
  if rc != 0:
    raise SystemExit(f"error: data_prep.embed failed (status {rc}):\n{buf.getvalue()}")
  return dt, dict(loaded.clock.total)


def read_sentences(out: str) -> tuple[int, list[list[str]], list[Any]]:
  """(documents, per-shard sentence lists without end-of-text, per-shard stored embeddings)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lcm_jax import schema  # pylint: disable=g-import-not-at-top
  manifest = schema.read_manifest(out)
  per_shard, stored, docs = [], [], 0
  for path in schema.shard_paths(out, manifest):
    sents, rows = [], []
    for d in schema.read_shard(path):
      if d.texts is None or list(d.texts[-1:]) != [EOT]:
        raise SystemExit(f"error: {path}: document {d.id!r} has no texts ending in {EOT!r}")
      sents.extend(d.texts[:-1])
      rows.append(np.asarray(d.embeddings[:-1], np.float32))
      docs += 1
    per_shard.append(sents)
    stored.append(np.concatenate(rows))
  return docs, per_shard, stored


def run_bare(loaded: Loaded, per_shard: Sequence[Sequence[str]]) -> tuple[float, list[Any]]:
  t0 = time.perf_counter()
  out = [loaded.encoder.encode(s, lang=LANG) for s in per_shard]
  return time.perf_counter() - t0, out


def bench_size(name: str, paths: dict[str, str], info: dict[str, Any], corpus: str,
               warm_corpus: str, work: str, args: argparse.Namespace) -> dict[str, float]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  with _quiet():
    loaded = Loaded(paths, args.batch_size)
  print(f"\n== {name}: SONAR dim {info.get('dim')}, {info.get('num_layers')} layers, "
        f"{info.get('num_heads')} heads, FFN {info.get('ffn_dim')}; SaT tiny (2 layers x 32) | "
        f"load (excluded): SaT {loaded.sat_load_s:.2f} s, SONAR {loaded.encoder_load_s:.2f} s",
        flush=True)
  # Warm-up (untimed): every code path once, the job on the first --warmup_docs documents and
  # the bare encoder on one encoder batch of their sentences.
  warm_out = os.path.join(work, f"{name}-warmup")
  run_job(loaded, warm_corpus, warm_out, args)
  run_bare(loaded, [s[:args.batch_size] for s in read_sentences(warm_out)[1][:1]])
  shutil.rmtree(warm_out)

  per_shard: list[list[str]] | None = None
  rows = []
  print(f"{'round':>6} {'job s':>7} {'docs/s':>8} {'sent/s':>8} | {'bare s':>7} {'sent/s':>8} | "
        f"{'ratio':>6} | {'seg':>6} {'enc':>6} {'write':>6} {'merge':>6} {'other':>6} s | "
        f"{'seg%':>5} {'enc%':>5} {'rest%':>5}")
  for r in range(args.rounds):
    out = os.path.join(work, f"{name}-round{r}")
    bare_first = per_shard is not None and r % 2 == 1
    if bare_first:
      bare_s, _ = run_bare(loaded, per_shard)
    job_s, phases = run_job(loaded, corpus, out, args)
    docs, got, stored = read_sentences(out)
    if per_shard is None:
      per_shard = got
    elif got != per_shard:
      raise SystemExit(f"error: round {r}: the job encoded other sentences than in round 0")
    if not bare_first:
      bare_s, vectors = run_bare(loaded, per_shard)
      if r == 0:  # the bare rows are the job's rows (stored as float16)
        for v, s in zip(vectors, stored):
          if v.shape != s.shape or not np.allclose(v.astype(np.float16), s, rtol=1e-2,
                                                   atol=1e-3 * float(np.abs(s).max())):
            raise SystemExit("error: bare encoder rows differ from the job's stored embeddings")
    shutil.rmtree(out)
    n_sent = sum(len(s) for s in per_shard)
    row = dict(job_s=job_s, docs_per_s=docs / job_s, job_sent_per_s=n_sent / job_s,
               bare_s=bare_s, bare_sent_per_s=n_sent / bare_s, ratio=bare_s / job_s,
               other=job_s - sum(phases.values()), seg_pct=100 * phases["seg"] / job_s,
               enc_pct=100 * phases["enc"] / job_s,
               rest_pct=100 * (job_s - phases["seg"] - phases["enc"]) / job_s, **phases)
    rows.append(row)
    print(_line(str(r), row), flush=True)
  med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
  print(_line("median", med))
  ratios = sorted(row["ratio"] for row in rows)
  print(f"{name}: {docs} documents, {n_sent} sentences in {len(per_shard)} shard(s), batch "
        f"{args.batch_size}, {args.threads} thread(s); job {med['docs_per_s']:,.1f} docs/s, "
        f"{med['job_sent_per_s']:,.1f} sentences/s; bare encoder {med['bare_sent_per_s']:,.1f} "
        f"sentences/s; ratio {med['ratio']:.3f} (rounds {ratios[0]:.3f}..{ratios[-1]:.3f}; "
        f"target >= 0.9)", flush=True)
  return med


def _line(label: str, row: dict[str, float]) -> str:
  return (f"{label:>6} {row['job_s']:>7.2f} {row['docs_per_s']:>8.1f} "
          f"{row['job_sent_per_s']:>8.1f} | {row['bare_s']:>7.2f} {row['bare_sent_per_s']:>8.1f} | "
          f"{row['ratio']:>6.3f} | {row['seg']:>6.2f} {row['enc']:>6.2f} {row['write']:>6.3f} "
          f"{row['merge']:>6.3f} {row['other']:>6.2f} s | {row['seg_pct']:>5.1f} "
          f"{row['enc_pct']:>5.1f} {row['rest_pct']:>5.1f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--docs", type=int, default=None,
                      help="documents, every size (default: tiny 400, bench 100, custom 100)")
  parser.add_argument("--rounds", type=int, default=3,
                      help="interleaved job/bare rounds per size; medians (default %(default)s)")
  parser.add_argument("--sizes", default="tiny,bench",
                      help=f"comma-separated SONAR sizes of {sorted(SIZES)} (default %(default)s)")
  parser.add_argument("--sonar_dim", type=int, default=None,
                      help="one custom size instead of --sizes: SONAR dim")
  parser.add_argument("--sonar_layers", type=int, default=None, help="custom size: layers (2)")
  parser.add_argument("--sonar_heads", type=int, default=None, help="custom size: heads (4)")
  parser.add_argument("--sonar_ffn", type=int, default=None, help="custom size: FFN (4 x dim)")
  parser.add_argument("--batch_size", type=int, default=256,
                      help="encoder batch, job and bare (default: the job's, %(default)s)")
  parser.add_argument("--shard_docs", type=int, default=1000,
                      help="documents per shard (default: the job's, %(default)s)")
  parser.add_argument("--threads", type=int, default=1,
                      help="torch / OpenMP threads (default %(default)s)")
  parser.add_argument("--sat_threshold", type=float, default=0.7,
                      help="SaT boundary threshold given to the job (default %(default)s; see the "
                      "docstring: the tiny random SaT at the production 0.2 cuts every ~9 chars)")
  parser.add_argument("--warmup_docs", type=int, default=32,
                      help="documents of the untimed warm-up (default %(default)s)")
  parser.add_argument("--seed", type=int, default=0, help="corpus and model seed")
  parser.add_argument("--models", default=None,
                      help="a data_prep.tiny_models directory to use instead of building sizes")
  args = parser.parse_args()
  for k in ("rounds", "batch_size", "shard_docs", "threads", "warmup_docs"):
    if getattr(args, k) < 1:
      parser.error(f"--{k}: expected >= 1, got {getattr(args, k)}")
  if args.docs is not None and args.docs < 1:
    parser.error(f"--docs: expected >= 1, got {args.docs}")

  os.environ["OMP_NUM_THREADS"] = str(args.threads)
  os.environ["HF_HUB_OFFLINE"] = "1"
  os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
  t0 = time.perf_counter()
  import torch  # pylint: disable=g-import-not-at-top
  torch_s = time.perf_counter() - t0
  torch.set_num_threads(args.threads)
  from data_prep import text_corpus, tiny_models  # pylint: disable=g-import-not-at-top

  custom = {k: getattr(args, f"sonar_{k}") for k in ("dim", "layers", "heads", "ffn")}
  if args.models:
    sizes: dict[str, dict[str, int] | None] = {"models": None}
  elif any(v is not None for v in custom.values()):
    dim = custom["dim"] or SIZES["tiny"]["dim"]
    sizes = {"custom": dict(dim=dim, layers=custom["layers"] or 2, heads=custom["heads"] or 4,
                            ffn=custom["ffn"] or 4 * dim, docs=100)}
  else:
    names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in names if s not in SIZES]
    if unknown or not names:
      parser.error(f"--sizes: unknown {unknown}; expected some of {sorted(SIZES)}")
    sizes = {s: SIZES[s] for s in names}

  print(f"torch {torch.__version__}, {args.threads} thread(s), import {torch_s:.2f} s (excluded); "
        f"SaT threshold {args.sat_threshold}; medians of {args.rounds} interleaved rounds")
  work = tempfile.mkdtemp(prefix="bench_embed-")
  try:
    results = {}
    for name, size in sizes.items():
      n_docs = args.docs or (size or {}).get("docs", 100)
      docs = text_corpus.documents(n_docs, seed=args.seed)
      corpus = os.path.join(work, f"corpus-{name}.jsonl")
      warm_corpus = os.path.join(work, f"warmup-{name}.jsonl")
      write_corpus(corpus, docs)
      write_corpus(warm_corpus, docs[:args.warmup_docs])
      if size is None:
        paths = tiny_models.paths(args.models)
      else:
        with _quiet():
          paths = tiny_models.build(os.path.join(work, f"models-{name}"), seed=args.seed,
                                    sonar_dim=size["dim"], num_layers=size["layers"],
                                    num_heads=size["heads"], ffn_dim=size["ffn"])
      info_path = os.path.join(os.path.dirname(paths["encoder"]), "tiny_sonar.json")
      info = {}
      if os.path.exists(info_path):
        with open(info_path) as f:
          info = json.load(f)
      results[name] = bench_size(name, paths, info, corpus, warm_corpus, work, args)
    print("\nsummary (medians): " + "; ".join(
        f"{n}: job {m['job_sent_per_s']:,.1f} sent/s ({m['docs_per_s']:,.1f} docs/s), bare "
        f"{m['bare_sent_per_s']:,.1f} sent/s, ratio {m['ratio']:.3f}" for n, m in results.items()))
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
