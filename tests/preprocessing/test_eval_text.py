"""Tests of ``python -m data_prep.eval_text`` (round-trip L2 and ROUGE-L) on tiny offline models.

  pytest tests/preprocessing/test_eval_text.py

Oracles: a hand-written LCS / union-LCS F-measure and hand-computed numbers for the scoring;
sonar-space's own ``TextToEmbeddingModelPipeline`` / ``EmbeddingToTextModelPipeline`` with float64
NumPy L2 for the round trip; ``rouge_score``'s scorer on the written texts for the rouge command.
"""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sonar")
pytest.importorskip("rouge_score")

from tests.helpers import perturbed_variables, run_cli  # noqa: E402

from data_prep import eval_text  # noqa: E402
from data_prep import tiny_models  # noqa: E402

DIM = 32
BEAM, MAX_LEN = 2, 10
SENTENCES = ["The cat sat on the red table.", "A dog walked to the river.",
             "She wrote a long letter to her friend.", "It was very cold that morning."]
PAIRS = [("The cat sat on the red table. It was very happy.", "The cat was happy."),
         ("A dog walked to the river", ["The dog walked.", "It saw the river."]),
         ("She wrote a long letter. Her friend read it.", "A letter\nfor a friend")]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return tiny_models.build(str(tmp_path_factory.mktemp("eval_text") / "models"), seed=0,
                           sonar_dim=DIM)


@pytest.fixture(scope="module")
def card(tmp_path_factory):
  """A random (perturbed) tiny Base-LCM exported to a PyTorch card: no training needed."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lcm_interop import export  # pylint: disable=g-import-not-at-top
  from lcm_jax.models.base_lcm import BaseLCM  # pylint: disable=g-import-not-at-top
  from lcm_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(family="base_lcm", model_dim=32, num_layers=2, num_heads=4, ffn_inner_dim=64,
                    sonar_embed_dim=DIM, dropout=0.0, dtype="float32")
  v = BaseLCM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, DIM)),
                        jnp.ones((1, 4), jnp.int32), jnp.arange(4)[None])
  v = perturbed_variables(v, 1)
  out = str(tmp_path_factory.mktemp("eval_text_card") / "card")
  export.export_weights(v["params"], v["buffers"], cfg, out)
  return os.path.join(out, "model_card.yaml")


def _cmd(*args):
  return [sys.executable, "-m", "data_prep.eval_text", *args]


def _error_line(stderr: str) -> str:
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, stderr
  return errors[0]


# ----------------------------------------------------------------------------------------------
# ROUGE-L scoring against an independent LCS

def _tokens(text: str) -> list[str]:
  return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs_table(a, b):
  t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i in range(1, len(a) + 1):
    for j in range(1, len(b) + 1):
      t[i][j] = t[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(t[i - 1][j], t[i][j - 1])
  return t


def _lcs_positions(ref, cand) -> set[int]:
  """Indices of ``ref`` tokens on one LCS with ``cand``."""
  t = _lcs_table(ref, cand)
  i, j, out = len(ref), len(cand), set()
  while i and j:
    if ref[i - 1] == cand[j - 1]:
      out.add(i - 1)
      i, j = i - 1, j - 1
    elif t[i - 1][j] >= t[i][j - 1]:
      i -= 1
    else:
      j -= 1
  return out


def _prf(hits, n_pred, n_ref):
  p, r = hits / n_pred, hits / n_ref
  return 100 * p, 100 * r, (0.0 if hits == 0 else 100 * 2 * p * r / (p + r))


def _oracle_rouge_l(pred: str, ref: str):
  a, b = _tokens(ref), _tokens(pred)
  return _prf(_lcs_table(a, b)[-1][-1], len(b), len(a))


def _oracle_rouge_lsum(pred_sents, ref_sents):
  """Lin (2004) summary-level LCS: per reference sentence, the union of its LCS tokens with every
  candidate sentence (the examples have no repeated tokens, so no count clipping is needed)."""
  refs = [_tokens(s) for s in ref_sents]
  preds = [_tokens(s) for s in pred_sents]
  hits = sum(len(set().union(*[_lcs_positions(r, c) for c in preds])) for r in refs)
  return _prf(hits, sum(map(len, preds)), sum(map(len, refs)))


ORACLE_CASES = [
    (["the cat sat on the mat"], "the cat lay on a mat"),
    (["A b c x.", "B d e g!"], ["a b c d", "e f g"]),
    (["Alpha beta, gamma.", "Delta epsilon"], "delta alpha\ngamma zeta beta"),
    (["nothing in common"], "entirely different words"),
    (["The quick brown fox.", "It jumps"], "the fox"),  # P 40, R 100: catches swapped arguments
]


@pytest.mark.parametrize("pred, target", ORACLE_CASES)
def test_score_pair_matches_lcs_oracle(pred, target):
  got = eval_text.score_pair(eval_text.make_scorer(use_stemmer=False), pred, target)
  ref_l = target if isinstance(target, str) else " ".join(target)
  ref_sents = target.split("\n") if isinstance(target, str) else target
  for kind, want in (("rougeL", _oracle_rouge_l(" ".join(pred), ref_l)),
                     ("rougeLsum", _oracle_rouge_lsum(pred, ref_sents))):
    np.testing.assert_allclose([got[kind]["precision"], got[kind]["recall"],
                                got[kind]["fmeasure"]], want, rtol=1e-12, atol=1e-12)


def test_score_pair_hand_computed_with_stemmer():
  # "the cat sat on the mat" vs "the cat lay on a mat": LCS "the cat on mat" = 4 of 6 and 6.
  s = eval_text.score_pair(eval_text.make_scorer(), ["the cat sat on the mat"],
                           "the cat lay on a mat")
  np.testing.assert_allclose(s["rougeL"]["fmeasure"], 400 / 6)
  s = eval_text.score_pair(eval_text.make_scorer(), ["The quick brown fox."], "the fox")
  assert (s["rougeL"]["precision"], s["rougeL"]["recall"]) == (50.0, 100.0)
  # Porter stemming: cats -> cat, running/runs -> run; LCS "cat run" = 2 of 3 and 3.
  s = eval_text.score_pair(eval_text.make_scorer(), ["Cats were running."], "The cat runs")
  np.testing.assert_allclose([s["rougeL"][m] for m in ("precision", "recall", "fmeasure")],
                             [200 / 3] * 3)
  assert eval_text.score_pair(eval_text.make_scorer(use_stemmer=False), ["Cats were running."],
                              "The cat runs")["rougeL"]["fmeasure"] == 0.0
  # rougeLsum: a list target is one sentence per element; a string target splits at newlines.
  s = eval_text.score_pair(eval_text.make_scorer(), ["a c x", "b d e g"], ["a b c d", "e f g"])
  np.testing.assert_allclose(s["rougeLsum"]["fmeasure"], 600 / 7)
  np.testing.assert_allclose(s["rougeL"]["fmeasure"], 500 / 7)  # LCS "a c d e g" = 5 of 7, 7


# ----------------------------------------------------------------------------------------------
# Round trip

def test_roundtrip_matches_sonar_pipelines(models, tmp_path):
  from data_prep import sonar  # pylint: disable=g-import-not-at-top
  from sonar.inference_pipelines.text import (  # pylint: disable=g-import-not-at-top
      EmbeddingToTextModelPipeline, TextToEmbeddingModelPipeline)
  enc = sonar.load_text_encoder(models["encoder"], device="cpu")
  own = enc.encode(SENTENCES, "eng_Latn")
  rng = np.random.default_rng(0)
  pred = np.concatenate([own, rng.normal(size=(3, DIM)) * 0.3]).astype(np.float32)
  targets = (pred + rng.normal(size=pred.shape) * 0.1).astype(np.float32)
  n = len(pred)
  np.savez(tmp_path / "pred.npz", predictions=pred, targets=targets,
           doc_index=np.arange(n, dtype=np.int32) // 2, position=np.arange(n) % 2)
  out, texts = tmp_path / "m" / "rt.json", tmp_path / "rt.jsonl"
  r = run_cli(_cmd("roundtrip", f"--predictions={tmp_path / 'pred.npz'}",
                   f"--encoder={models['encoder']}", f"--decoder={models['decoder']}",
                   f"--out={out}", f"--texts={texts}", f"--beam_size={BEAM}",
                   f"--decode_max_len={MAX_LEN}", "--batch_size=3", "--device=cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(out.read_text())
  lines = [json.loads(x) for x in texts.read_text().splitlines()]
  assert res["count"] == n and len(lines) == n and res["has_targets"]

  # Oracle: sonar's pipelines on the same models, float64 L2s.
  dec = sonar.load_text_decoder(models["decoder"], device="cpu")
  want_texts = EmbeddingToTextModelPipeline(dec.model, dec.tokenizer).predict(
      torch.from_numpy(pred), target_lang="eng_Latn", batch_size=n, beam_size=BEAM,
      max_seq_len=MAX_LEN, max_gen_len=(0, MAX_LEN))
  assert [x["text"] for x in lines] == want_texts
  re_enc = TextToEmbeddingModelPipeline(enc.model, enc.tokenizer).predict(
      want_texts, source_lang="eng_Latn").numpy().astype(np.float64)
  p64, t64 = pred.astype(np.float64), targets.astype(np.float64)
  want = {"roundtrip_l2": np.sqrt(((re_enc - p64) ** 2).sum(1)),
          "l2_to_target": np.sqrt(((p64 - t64) ** 2).sum(1)),
          "roundtrip_l2_to_target": np.sqrt(((re_enc - t64) ** 2).sum(1))}
  for k, v in want.items():
    assert np.isfinite(v).all() and v.max() > 0
    np.testing.assert_allclose([x[k] for x in lines], v, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res["metrics"][k]["mean"], v.mean(), rtol=1e-4)
    np.testing.assert_allclose(res["metrics"][k]["median"], np.median(v), rtol=1e-4)
    np.testing.assert_allclose(res["metrics"][k]["max"], v.max(), rtol=1e-4)
  assert [x["doc_index"] for x in lines] == (np.arange(n) // 2).tolist()
  assert [x["position"] for x in lines] == (np.arange(n) % 2).tolist()
  assert "roundtrip_l2" in r.stdout and f"count {n}" in r.stdout

  # generate's layout (B, T, S) + lengths, and --max: the same vectors give the same L2s.
  emb = np.zeros((2, 4, DIM), np.float32)
  emb[0, :3], emb[1, :2] = pred[:3], pred[3:5]
  np.savez(tmp_path / "gen.npz", embeddings=emb, lengths=np.array([3, 2], np.int32),
           ids=np.array(["a", "b"]))
  r = run_cli(_cmd("roundtrip", f"--predictions={tmp_path / 'gen.npz'}", "--max=4",
                   f"--encoder={models['encoder']}", f"--decoder={models['decoder']}",
                   f"--texts={tmp_path / 'gen.jsonl'}", f"--beam_size={BEAM}",
                   f"--decode_max_len={MAX_LEN}", "--device=cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  g = [json.loads(x) for x in (tmp_path / "gen.jsonl").read_text().splitlines()]
  assert [(x["id"], x["concept"]) for x in g] == [("a", 0), ("a", 1), ("a", 2), ("b", 0)]
  np.testing.assert_allclose([x["roundtrip_l2"] for x in g], want["roundtrip_l2"][:4],
                             rtol=1e-4, atol=1e-5)
  assert "l2_to_target" not in g[0]


@pytest.mark.parametrize("case, field", [
    ("no_predictions", "predictions"),
    ("wrong_dim", "predictions"),
    ("targets_shape", "targets"),
    ("not_finite", "predictions"),
    ("empty", "predictions"),
    ("doc_index_float", "doc_index"),
])
def test_roundtrip_bad_input_exits_2(models, tmp_path, capsys, case, field):
  path = tmp_path / "in.npz"
  x = np.random.default_rng(1).normal(size=(3, DIM)).astype(np.float32)
  arrays = {"predictions": x}
  if case == "no_predictions":
    arrays = {"preds": x}
  elif case == "wrong_dim":
    arrays = {"predictions": x[:, :DIM // 2]}
  elif case == "targets_shape":
    arrays["targets"] = x[:2]
  elif case == "not_finite":
    x[2, 5] = np.inf
  elif case == "empty":
    arrays = {"predictions": x[:0]}
  else:
    arrays["doc_index"] = np.zeros(3, np.float32)
  np.savez(path, **arrays)
  out = tmp_path / "o.json"
  rc = eval_text.main(["roundtrip", f"--predictions={path}", f"--out={out}",
                       f"--encoder={models['encoder']}", f"--decoder={models['decoder']}",
                       "--device=cpu"])
  assert rc == 2
  err = _error_line(capsys.readouterr().err)
  assert str(path) in err and f"'{field}'" in err, err
  if case == "not_finite":
    assert "row 2" in err
  assert os.listdir(tmp_path) == ["in.npz"]


# ----------------------------------------------------------------------------------------------
# ROUGE end to end

def _write_pairs(path, pairs, drop_target_at=None):
  with open(path, "w", encoding="utf-8") as f:
    for i, (src, tgt) in enumerate(pairs):
      rec = {"id": f"ex{i}", "doc": {"source": src}, "target": tgt}
      if i == drop_target_at:
        del rec["target"]
      f.write(json.dumps(rec) + "\n")
      if i == 0:
        f.write("\n")  # blank lines are skipped


def _rouge_flags(models, card):
  return [f"--card={card}", f"--sat_model={models['sat_model']}",
          f"--sat_tokenizer={models['sat_tokenizer']}", f"--encoder={models['encoder']}",
          f"--decoder={models['decoder']}", "--max_len=3", f"--beam_size={BEAM}",
          f"--decode_max_len={MAX_LEN}", "--eot_threshold=0.99", "--device=cpu"]


def _segment(models, texts):
  """The tiny SaT with text_generate's defaults (threshold, 250-char cap)."""
  from data_prep import sat  # pylint: disable=g-import-not-at-top
  return sat.Segmenter(sat.load_sat(models["sat_model"], models["sat_tokenizer"], device="cpu"),
                       threshold=sat.DEFAULT_THRESHOLD, max_chars=250).segment(texts)


def test_rouge_end_to_end(models, card, tmp_path):
  from data_prep import sonar, text_generate  # pylint: disable=g-import-not-at-top
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  data = tmp_path / "pairs.jsonl"
  _write_pairs(data, PAIRS)
  out, preds = tmp_path / "rouge.json", tmp_path / "preds.jsonl"
  flags = [*_rouge_flags(models, card), "--temperature=0.5", "--seed=7"]
  r = run_cli(_cmd("rouge", f"--data={data}", "--source_field=doc.source", f"--out={out}",
                   f"--predictions_out={preds}", "--batch_size=2", *flags))
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(out.read_text())
  recs = [json.loads(x) for x in preds.read_text().splitlines()]
  assert res["count"] == len(PAIRS) == len(recs)
  assert [x["id"] for x in recs] == ["ex0", "ex1", "ex2"] and [x["line"] for x in recs] == [1, 3, 4]
  assert res["settings"]["card"] == card and res["settings"]["max_len"] == 3
  assert res["settings"]["source_suffix"] == "[MODEL]:"
  assert sum(res["stop_reasons"].values()) == len(PAIRS)

  # The prompt: the source's own SaT sentences, then the default suffix as ONE concept. The tiny
  # SaT would cut "[MODEL]:" apart if it were segmented with the source (the old behaviour).
  sources = [src for src, _ in PAIRS]
  segs = _segment(models, sources)
  assert any(s[-1] != "[MODEL]:" for s in _segment(models, [x + "\n[MODEL]:" for x in sources]))
  for rec, seg in zip(recs, segs):
    assert seg and rec["prompt_sentences"] == seg + ["[MODEL]:"]
    assert len(rec["prompt_sentences"]) == len(seg) + 1

  scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
  for rec, (_, tgt) in zip(recs, PAIRS):
    assert 1 <= len(rec["sentences"]) <= 3 and rec["text"] == " ".join(rec["sentences"])
    assert rec["target"] == tgt
    t_l = tgt if isinstance(tgt, str) else " ".join(tgt)
    t_sum = tgt if isinstance(tgt, str) else "\n".join(tgt)
    want_l = scorer.score(t_l, " ".join(rec["sentences"]))["rougeL"]
    want_sum = scorer.score(t_sum, "\n".join(rec["sentences"]))["rougeLsum"]
    for kind, want in (("rougeL", want_l), ("rougeLsum", want_sum)):
      np.testing.assert_allclose([rec[kind]["precision"], rec[kind]["recall"],
                                  rec[kind]["fmeasure"]],
                                 [100 * want.precision, 100 * want.recall, 100 * want.fmeasure],
                                 rtol=1e-12)
  for kind in ("rougeL", "rougeLsum"):
    for m in ("precision", "recall", "fmeasure"):
      assert 0.0 <= res["metrics"][kind][m] <= 100.0
      np.testing.assert_allclose(res["metrics"][kind][m], np.mean([x[kind][m] for x in recs]),
                                 rtol=1e-12)
  assert "rougeL" in r.stdout and f"count {len(PAIRS)}" in r.stdout

  # The prompt concepts, against the encoder called directly: source sentences in --lang, the
  # suffix encoded whole (in --eot_lang); and per-batch seeding: the command's batches [0, 1]
  # and [2] are generate_texts calls on those batches, each seeded with --seed.
  g = eval_text._generation_args(flags)  # pylint: disable=protected-access
  m = text_generate.load_models(g)
  enc = sonar.load_text_encoder(models["encoder"], device="cpu")
  suffix_vec = enc.encode(["[MODEL]:"], "eng_Latn")[0]
  for batch in ([0, 1], [2]):
    got, arrays = text_generate.generate_texts(
        m, g, [(f"{data}:{recs[i]['line']}", sources[i]) for i in batch], suffix=["[MODEL]:"])
    assert [x["sentences"] for x in got] == [recs[i]["sentences"] for i in batch]
    assert arrays["prompt_lengths"].tolist() == [len(segs[i]) + 1 for i in batch]
    for b, i in enumerate(batch):
      n = len(segs[i])
      want = np.concatenate([enc.encode(segs[i], "eng_Latn"), suffix_vec[None]])
      np.testing.assert_allclose(arrays["prompt_embeddings"][b, :n + 1], want, rtol=1e-5,
                                 atol=1e-6)
      assert not arrays["prompt_embeddings"][b, n + 1:].any()


def test_generate_texts_prefix_suffix_layout(models, card):
  """prefix + sentences + suffix, constants once per call in --eot_lang, records and arrays."""
  from data_prep import sonar, text_generate  # pylint: disable=g-import-not-at-top
  g = eval_text._generation_args(  # pylint: disable=protected-access
      [*_rouge_flags(models, card), "--eot_lang=fra_Latn"])
  m = text_generate.load_models(g)
  sources = [PAIRS[0][0], PAIRS[2][0]]
  segs = _segment(models, sources)
  prefix, suffix = ["Summarize: the text.", "[USER]:"], ["[MODEL]:"]
  recs, arrays = text_generate.generate_texts(m, g, [("a", sources[0]), ("b", sources[1])],
                                              prefix=prefix, suffix=suffix)
  enc = sonar.load_text_encoder(models["encoder"], device="cpu")
  consts = enc.encode(prefix + suffix, "fra_Latn")
  assert not np.allclose(consts, enc.encode(prefix + suffix, "eng_Latn"))  # the language counts
  for b, (rec, seg) in enumerate(zip(recs, segs)):
    assert rec["prompt_sentences"] == prefix + seg + suffix
    n = len(rec["prompt_sentences"])
    assert arrays["prompt_lengths"][b] == n == len(seg) + 3
    want = np.concatenate([consts[:2], enc.encode(seg, "eng_Latn"), consts[2:]])
    np.testing.assert_allclose(arrays["prompt_embeddings"][b, :n], want, rtol=1e-5, atol=1e-6)
  assert arrays["ids"].tolist() == ["a", "b"]
  with pytest.raises(text_generate.UserError, match="suffix sentence ' '"):
    text_generate.generate_texts(m, g, [("a", sources[0])], suffix=[" "])


@pytest.mark.parametrize("case, needle", [
    ("empty", "no source/target pairs"),
    ("no_target", ":4: field 'target'"),
    ("missing_card", "--card"),
    ("reserved_flag", "--prompt"),
    ("blank_suffix", "--source_suffix ' '"),
])
def test_rouge_bad_input_exits_2(models, card, tmp_path, capsys, case, needle):
  data = tmp_path / "pairs.jsonl"
  if case == "empty":
    data.write_text("\n \n")
  else:
    _write_pairs(data, PAIRS, drop_target_at=2 if case == "no_target" else None)
  card = str(tmp_path / "nope" / "model_card.yaml")
  extra = {"reserved_flag": ["--prompt=hello"], "blank_suffix": ["--source_suffix= "]}.get(case, [])
  out = tmp_path / "o.json"
  rc = eval_text.main(["rouge", f"--data={data}", "--source_field=doc.source", f"--out={out}",
                       *extra, *_rouge_flags(models, card)])
  assert rc == 2
  err = _error_line(capsys.readouterr().err)
  assert needle in err, err
  if case in ("empty", "no_target"):
    assert str(data) in err
  if case == "missing_card":
    assert card in err
  assert os.listdir(tmp_path) == ["pairs.jsonl"]


def test_roundtrip_bad_out_exits_2_before_any_work(models, tmp_path):
  """--out / --texts under a file: refused before the models load (the old tool decoded and
  re-encoded everything, then died with a traceback); a missing --predictions names the flag."""
  path = tmp_path / "in.npz"
  np.savez(path, predictions=np.zeros((2, DIM), np.float32))
  (tmp_path / "file").write_text("x")
  bad = str(tmp_path / "file" / "sub" / "o.json")
  for args, needles in (([f"--predictions={path}", f"--out={bad}"], ["--out", "file"]),
                        ([f"--predictions={path}", f"--texts={bad}"], ["--texts", "file"]),
                        ([f"--predictions={tmp_path / 'none.npz'}"],
                         ["--predictions", "none.npz", "no such file"])):
    r = run_cli(_cmd("roundtrip", *args, f"--encoder={models['encoder']}",
                     f"--decoder={models['decoder']}", "--device=cpu"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    err = _error_line(r.stderr)
    assert all(n in err for n in needles), err
  assert sorted(os.listdir(tmp_path)) == ["file", "in.npz"]
