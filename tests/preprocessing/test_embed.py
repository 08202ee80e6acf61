"""data_prep.embed end to end with the tiny offline SaT + SONAR models: text in every format ->
shards -> lcm_jax's Grain pipeline; SIGKILL + rerun; 1 vs 2 workers; bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("sonar")
pytest.importorskip("wtpsplit")

from configs import base  # pylint: disable=g-import-not-at-top
from data_prep import embed, text_corpus, tiny_models
from lcm_jax import data as data_lib
from lcm_jax import schema
from tests import helpers

NUM_DOCS = 24


@pytest.fixture(name="models", scope="module")
def fixture_models(tmp_path_factory):
  return tiny_models.build(str(tmp_path_factory.mktemp("tiny_models")))


@pytest.fixture(name="docs", scope="module")
def fixture_docs():
  return text_corpus.documents(NUM_DOCS, seed=11, max_sentences=6)


def _model_flags(models):
  return [f"--sat_model={models['sat_model']}", f"--encoder={models['encoder']}"]


def _write_inputs(root, docs):
  """The same documents as plain-text files, JSONL and Parquet."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(root, "txt"))
  for i, d in enumerate(docs):
    with open(os.path.join(root, "txt", f"doc{i:03d}.txt"), "w") as f:
      f.write(d)
  with open(os.path.join(root, "docs.jsonl"), "w") as f:
    for i, d in enumerate(docs):
      f.write(json.dumps({"id": f"doc{i:03d}", "text": d}) + "\n")
  pq.write_table(pa.table({"id": [f"doc{i:03d}" for i in range(len(docs))], "text": docs}),
                 os.path.join(root, "docs.parquet"), row_group_size=7)
  return {"text": os.path.join(root, "txt", "*.txt"), "jsonl": os.path.join(root, "docs.jsonl"),
          "parquet": os.path.join(root, "docs.parquet")}


def _read_dataset(path):
  m = schema.read_manifest(path)
  return m, [d for p in schema.shard_paths(path, m) for d in schema.read_shard(p)]


def _grain_counts(path, dim):
  """Documents and concepts of a dataset as lcm_jax's eval pipeline yields them."""
  c = base.get_config()
  c.model.sonar_embed_dim = dim
  c.data.train = path
  c.data.eval = path
  c.data.seq_len = 1024
  c.data.max_doc_len = 1024
  c.data.global_batch_size = 2
  c.data.worker_count = 0
  docs = concepts = 0
  rows = []
  for b in data_lib.make_eval_iterator(c, process_index=0, process_count=1):
    seg = b["segment_ids"]
    concepts += int((seg > 0).sum())
    docs += int(((b["positions"] == 0) & (seg > 0)).sum())
    rows.append(b["embeddings"][seg > 0])
  return docs, concepts, np.concatenate(rows)


def test_every_format_gives_the_same_capped_shards_as_direct_sonar(tmp_path, models, docs):
  from data_prep import sonar  # pylint: disable=g-import-not-at-top
  paths = _write_inputs(str(tmp_path / "in"), docs)
  results = {}
  for fmt, pattern in paths.items():
    out = str(tmp_path / f"out_{fmt}")
    assert embed.main([f"--input={pattern}", f"--out={out}", "--shard_docs=10",
                       *_model_flags(models)]) == 0
    results[fmt] = _read_dataset(out)
  m, recs = results["jsonl"]
  assert m["num_documents"] == NUM_DOCS == len(recs) and len(m["shards"]) == 3
  assert m["num_concepts"] == sum(len(r.embeddings) for r in recs)
  assert [r.id for r in recs] == [f"doc{i:03d}" for i in range(NUM_DOCS)]
  # The cap, no lost text, the end-of-text sentence last.
  for r, d in zip(recs, docs):
    assert r.texts[-1] == "End of text." and all(0 < len(s) <= 250 for s in r.texts)
    assert "".join(r.texts[:-1]).replace(" ", "").replace("\n", "") == (
        d.replace(" ", "").replace("\n", ""))
  assert any(len(s) > 250 for d in docs for s in d.split(". ")), "the corpus exercises the cap"
  # Embeddings equal a direct sonar pipeline call on the same sentences (stored as float16).
  enc = sonar.load_text_encoder(models["encoder"])
  sentences = [s for r in recs for s in r.texts]
  direct = enc.pipeline.predict(sentences, source_lang="eng_Latn", batch_size=7).numpy()
  stored = np.concatenate([r.embeddings for r in recs]).astype(np.float32)
  np.testing.assert_allclose(stored, direct.astype(np.float16).astype(np.float32),
                             rtol=2e-3, atol=2e-3)
  # Every format: same sentences, same vectors (ids differ only for plain text files).
  for fmt in ("text", "parquet"):
    m2, recs2 = results[fmt]
    assert m2["num_concepts"] == m["num_concepts"]
    assert [r.texts for r in recs2] == [r.texts for r in recs]
    np.testing.assert_array_equal(np.concatenate([r.embeddings for r in recs2]),
                                  np.concatenate([r.embeddings for r in recs]))
  # Read back through the training data pipeline.
  gdocs, gconcepts, rows = _grain_counts(str(tmp_path / "out_jsonl"), m["dim"])
  assert (gdocs, gconcepts) == (m["num_documents"], m["num_concepts"])
  np.testing.assert_array_equal(np.sort(rows, axis=0), np.sort(stored, axis=0))


def _embed_cmd(inp, out, models, *extra):
  return [sys.executable, "-m", "data_prep.embed", f"--input={inp}", f"--out={out}",
          "--shard_docs=3", *_model_flags(models), *extra]


def _shard_records(out):
  m = schema.read_manifest(out)
  return m, {s["file"]: [schema.encode_document(d) for d in schema.read_shard(os.path.join(out, s["file"]))]
             for s in m["shards"]}


@pytest.mark.slow
def test_sigkill_rerun_and_worker_count_give_identical_shards(tmp_path, models, docs):
  inp = _write_inputs(str(tmp_path / "in"), docs)["jsonl"]
  env = dict(os.environ, OMP_NUM_THREADS="1")
  # Reference: one uninterrupted worker (in process).
  ref = str(tmp_path / "ref")
  assert embed.main([f"--input={inp}", f"--out={ref}", "--shard_docs=3", *_model_flags(models)]) == 0
  ref_manifest, ref_records = _shard_records(ref)
  assert len(ref_records) == NUM_DOCS // 3
  # Killed with SIGKILL after its first finished shard, then rerun.
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(_embed_cmd(inp, killed, models), cwd=helpers.ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  parts = os.path.join(killed, embed.PARTS_DIR)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(parts) and any(f.endswith(".json") for f in os.listdir(parts)):
      break
    time.sleep(0.01)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  done = [f for f in os.listdir(parts) if f.endswith(".json")]
  assert 1 <= len(done) < len(ref_records), f"kill did not land mid-run ({len(done)} parts)"
  assert not os.path.exists(os.path.join(killed, schema.MANIFEST_NAME))
  assert embed.main([f"--input={inp}", f"--out={killed}", "--shard_docs=3",
                     *_model_flags(models)]) == 0
  assert not [f for f in os.listdir(killed) if f.startswith(".tmp")], "temporary files left"
  m, records = _shard_records(killed)
  assert records == ref_records
  assert (m["num_documents"], m["num_concepts"]) == (ref_manifest["num_documents"],
                                                     ref_manifest["num_concepts"])
  # Two workers: disjoint shards, the union equals one worker's; the second one merges.
  two = str(tmp_path / "two")
  for w in range(2):
    assert embed.main([f"--input={inp}", f"--out={two}", "--shard_docs=3", "--num_workers=2",
                       f"--worker_index={w}", *_model_flags(models)]) == 0
    if w == 0:
      assert not os.path.exists(os.path.join(two, schema.MANIFEST_NAME))
      written = sorted(f for f in os.listdir(two) if f.endswith(schema.SHARD_SUFFIX))
      assert written == sorted(list(ref_records)[0::2])
  m2, records2 = _shard_records(two)
  assert records2 == ref_records and m2["num_concepts"] == ref_manifest["num_concepts"]
  # A rerun of a finished job does nothing and changes nothing.
  assert embed.main([f"--input={inp}", f"--out={two}", "--shard_docs=3", "--num_workers=2",
                     "--worker_index=1", *_model_flags(models)]) == 0
  assert _shard_records(two)[1] == ref_records
  # Other settings into the same --out are refused.
  assert embed.main([f"--input={inp}", f"--out={two}", "--shard_docs=4",
                     *_model_flags(models)]) == 2


def test_bad_input_names_file_and_line_and_leaves_other_shards(tmp_path, models, docs, capsys):
  root = tmp_path / "in"
  root.mkdir()
  with open(root / "a.jsonl", "w") as f:
    for i in range(6):
      f.write(json.dumps({"id": f"a{i}", "text": docs[i]}) + "\n")
  with open(root / "b.jsonl", "w") as f:
    f.write(json.dumps({"id": "b0", "text": docs[6]}) + "\n")
    f.write(json.dumps({"id": "b1", "body": docs[7]}) + "\n")  # line 2: no 'text'
  out = str(tmp_path / "out")
  assert embed.main([f"--input={root}/*.jsonl", f"--out={out}", "--shard_docs=3",
                     *_model_flags(models)]) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("error:") and "b.jsonl" in err and "line 2" in err and "text" in err
  # Shards 0 and 1 (a.jsonl) are finished and valid; shard 2 was not written; no manifest.
  files = sorted(os.listdir(out))
  assert [f for f in files if f.endswith(schema.SHARD_SUFFIX)] == [
      schema.shard_name(0, 3), schema.shard_name(1, 3)]
  assert not [f for f in files if f.startswith(".tmp")] and schema.MANIFEST_NAME not in files
  assert len(schema.read_shard(os.path.join(out, schema.shard_name(1, 3)))) == 3
  # Skipping: counted in the manifest.
  out2 = str(tmp_path / "out2")
  assert embed.main([f"--input={root}/*.jsonl", f"--out={out2}", "--shard_docs=3",
                     "--on_error=skip", *_model_flags(models)]) == 0
  m = schema.read_manifest(out2)
  assert m["num_documents"] == 7 and m["stats"]["skipped"] == 1 and m["stats"]["documents_in"] == 8

  def fails(path, *flags):
    out = tmp_path / f"out_{os.path.basename(path)}"
    rc = embed.main([f"--input={path}", f"--out={out}", *_model_flags(models), *flags])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and line.startswith("error:"), line
    return line

  (root / "bad.txt").write_bytes(b"fine line\nbad \xff\xfe bytes\n")
  line = fails(root / "bad.txt", "--text_unit=line")
  assert "bad.txt" in line and "line 2" in line
  (root / "empty.jsonl").write_text("")
  assert "empty.jsonl" in fails(root / "empty.jsonl")
  (root / "broken.parquet").write_bytes(b"PAR1 not really parquet")
  assert "broken.parquet" in fails(root / "broken.parquet")
  (root / "blank.jsonl").write_text(json.dumps({"id": "z", "text": "   "}) + "\n")
  line = fails(root / "blank.jsonl")
  assert "blank.jsonl" in line and "line 1" in line


def _run_embed(*args):
  env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
  return subprocess.run([sys.executable, "-m", "data_prep.embed", *args], cwd=helpers.ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def _one_error_line(r):
  assert r.returncode == 2, (r.stdout, r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  return lines[0]


def test_duplicate_ids_are_refused_before_anything_is_written(tmp_path, models, docs):
  root = tmp_path / "in"
  root.mkdir()
  with open(root / "a.jsonl", "w") as f:
    for i, doc_id in enumerate(["a0", "dup", "a2", "a3"]):
      f.write(json.dumps({"id": doc_id, "text": docs[i]}) + "\n")
  with open(root / "b.jsonl", "w") as f:
    f.write(json.dumps({"id": "b0", "text": docs[4]}) + "\n")
    f.write("\n")
    f.write(json.dumps({"id": "dup", "text": docs[5]}) + "\n")  # line 3 (line 2 is blank)
  out = tmp_path / "out"
  # Across files and workers: worker 1 of 2 would only see shard 1 (b.jsonl), still refused.
  for extra in ([], ["--num_workers=2", "--worker_index=1"]):
    err = _one_error_line(_run_embed(f"--input={root}/*.jsonl", f"--out={out}", "--shard_docs=2",
                                     *_model_flags(models), *extra))
    assert "duplicate document id 'dup'" in err, err
    assert f"{root}/b.jsonl:line 3" in err and f"{root}/a.jsonl:line 2" in err, err
    assert err.index("b.jsonl:line 3") < err.index("a.jsonl:line 2")
    assert not out.exists()
  # Within one Parquet file: rows named (0-based).
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  pq.write_table(pa.table({"id": ["p0", "p1", "p0"], "text": docs[:3]}), root / "p.parquet")
  err = _one_error_line(_run_embed(f"--input={root}/p.parquet", f"--out={out}",
                                   *_model_flags(models)))
  assert "'p0'" in err and "p.parquet:row 2" in err and "p.parquet:row 0" in err, err
  assert not out.exists()


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, models, docs):
  inp = _write_inputs(str(tmp_path / "in"), docs[:2])["jsonl"]
  (tmp_path / "file").write_text("x")
  for out in (tmp_path / "file", tmp_path / "file" / "data"):
    err = _one_error_line(_run_embed(f"--input={inp}", f"--out={out}", *_model_flags(models)))
    assert "--out" in err and str(tmp_path / "file") in err, err
  assert sorted(os.listdir(tmp_path)) == ["file", "in"]


def test_a_bug_keeps_its_traceback(tmp_path, models, docs, monkeypatch):
  """A ValueError or FileNotFoundError that is not a UserError (a planted bug in the planner)
  propagates from main instead of becoming one 'error:' line and exit status 2 (the old main
  turned every FileNotFoundError into one line)."""
  inp = _write_inputs(str(tmp_path / "in"), docs[:2])["jsonl"]
  for exc in (FileNotFoundError, ValueError):
    def broken(*args, exc=exc, **kwargs):
      raise exc("planted bug")
    monkeypatch.setattr(embed, "plan_shards", broken)
    with pytest.raises(exc, match="planted bug"):
      embed.main([f"--input={inp}", f"--out={tmp_path / 'out'}", *_model_flags(models)])
