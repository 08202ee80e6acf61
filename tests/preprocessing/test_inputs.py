"""data_prep.inputs: every format round-trips, counts/sizes match an independent computation,
ranges equal slices of a full read, and bad input raises InputError naming file, line/row, field."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import inputs
from data_prep.inputs import InputError
from lcm_jax.errors import UserError


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
  return str(path)


def _full_and_ranges(source):
  """Full read; and every range read equals the slice of the full read."""
  docs = list(source.read())
  n = source.num_docs()
  assert len(docs) == n and len(source) == n
  rng = np.random.default_rng(0)
  for _ in range(12):
    a, b = sorted(rng.integers(0, n + 1, size=2).tolist())
    assert list(source.read(a, b)) == docs[a:b]
  assert list(source.read(n, n)) == []
  with pytest.raises(ValueError):
    source.read(0, n + 1)
  return docs


# Independent oracles for the line-based formats: Python's own line splitting.

def _lines(data: bytes):
  """(lineno, start offset, bytes without the final newline) for every line."""
  out, off = [], 0
  for i, line in enumerate(data.split(b"\n"), start=1):
    out.append((i, off, line))
    off += len(line) + 1
  if data.endswith(b"\n"):
    out.pop()
  return out


def _nonblank_lines(data: bytes):
  return [(i, line) for i, _, line in _lines(data) if line.strip()]


def _paragraphs(data: bytes):
  """(first lineno, raw bytes of the paragraph) for runs of non-blank lines."""
  paras, cur = [], None
  for i, _, line in _lines(data):
    if line.strip():
      if cur is None:
        cur = [i, [line]]
        paras.append(cur)
      else:
        cur[1].append(line)
    else:
      cur = None
  return [(i, b"\n".join(ls)) for i, ls in paras]


TEXT = ("  First line, with café.\r\n"
        "second line\n"
        "\n"
        "   \t \n"
        "third paragraph line one\n"
        "third paragraph line two — ünïcode 日本語\n"
        "\n\n"
        "last line without newline  ")


# ---------------------------------------------------------------------------------------------
# Plain text


def test_text_file_unit(tmp_path):
  a = _write(tmp_path / "d" / "b.txt", TEXT)
  b = _write(tmp_path / "d" / "a.md", "\ufeffHello world.\n")
  sources = inputs.open_sources([str(tmp_path / "d" / "*")])
  assert [s.name for s in sources] == [b, a]  # the glob is sorted
  for s, path in zip(sources, [b, a]):
    assert isinstance(s, inputs.TextSource) and s.num_docs() == 1
    np.testing.assert_array_equal(s.doc_sizes(), [os.path.getsize(path)])
    [doc] = _full_and_ranges(s)
    text = open(path, encoding="utf-8-sig").read().strip()
    assert doc == inputs.RawDoc(id=path, text=text, source=None, target=None, where=path,
                                lang="eng_Latn")


@pytest.mark.parametrize("unit", ["line", "paragraph"])
@pytest.mark.parametrize("chunk", [None, 16])
def test_text_line_and_paragraph(tmp_path, monkeypatch, unit, chunk):
  if chunk is not None:  # Block boundaries everywhere, and lines longer than a block.
    monkeypatch.setattr(inputs, "_CHUNK", chunk)
  path = _write(tmp_path / "t.txt", TEXT)
  [s] = inputs.open_sources([path], text_unit=unit, lang="fra_Latn")
  data = TEXT.encode()
  expected = _nonblank_lines(data) if unit == "line" else _paragraphs(data)
  assert s.num_docs() == len(expected)
  np.testing.assert_array_equal(s.doc_sizes(), [len(raw) for _, raw in expected])
  assert s.doc_sizes().dtype == np.int64
  docs = _full_and_ranges(s)
  for doc, (lineno, raw) in zip(docs, expected):
    assert doc.id == f"t.txt:{lineno}"
    assert doc.where == f"{path}:line {lineno}"
    assert doc.text == raw.decode().strip().replace("\r\n", "\n")
    assert doc.lang == "fra_Latn" and doc.source is None and doc.target is None
  if unit == "paragraph":
    assert docs[1].text == ("third paragraph line one\n"
                            "third paragraph line two — ünïcode 日本語")


def test_scan_is_independent_of_block_size(tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  pieces = [b"\n", b"  \n", b"word ", b"\xc3\xa9t\xc3\xa9 ", b"\r\n", b"x" * 100]
  data = b"".join(pieces[i] for i in rng.integers(0, len(pieces), size=3000))
  path = _write(tmp_path / "r.txt", data)
  ref = inputs._scan_lines(path)
  for chunk in (1, 7, 64, 1000):
    monkeypatch.setattr(inputs, "_CHUNK", chunk)
    for a, b in zip(inputs._scan_lines(path), ref):
      np.testing.assert_array_equal(a, b)
  starts, ends, linenos, _ = ref
  expected = _nonblank_lines(data)
  assert linenos.tolist() == [i for i, _ in expected]
  assert [data[a:b] for a, b in zip(starts, ends)] == [raw for _, raw in expected]


# ---------------------------------------------------------------------------------------------
# JSONL


def _jsonl_records():
  return [
      {"id": "doc-a", "text": "Alpha. Beta.", "meta": {"id": "m0"}},
      {"text": "No id here, \"quoted\" and ünïcode.", "meta": {"id": "m1"}},
      {"id": 17, "text": "Integer id.", "meta": {"id": "m2"}},
      {"id": "doc-d", "text": "Line\nbreak inside.", "extra": [1, 2], "meta": {"id": "m3"}},
  ]


def test_jsonl_round_trip(tmp_path):
  recs = _jsonl_records()
  lines = [json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(recs)]
  data = ("\n".join(lines[:2]) + "\n\n   \n" + "\n".join(lines[2:]) + "\n").encode()
  path = _write(tmp_path / "x.jsonl", data)
  [s] = inputs.open_sources([path])
  assert isinstance(s, inputs.JsonlSource)
  expected = _nonblank_lines(data)
  assert s.num_docs() == 4
  np.testing.assert_array_equal(s.doc_sizes(), [len(raw) for _, raw in expected])
  docs = _full_and_ranges(s)
  assert [d.text for d in docs] == [r["text"] for r in recs]
  assert [d.id for d in docs] == ["doc-a", f"x.jsonl:{expected[1][0]}", "17", "doc-d"]
  assert [d.where for d in docs] == [f"{path}:line {i}" for i, _ in expected]
  # Nested id field with dots; no id field at all.
  [s] = inputs.open_sources([path], id_field="meta.id")
  assert [d.id for d in s.read()] == ["m0", "m1", "m2", "m3"]
  [s] = inputs.open_sources([path], id_field=None)
  assert [d.id for d in s.read()] == [f"x.jsonl:{i}" for i, _ in expected]


def test_jsonl_nested_text_and_fine_tuning_pairs(tmp_path):
  recs = [{"q": {"body": "What is 2+2?"}, "a": "Four.", "uid": "p0"},
          {"q": {"body": "Name a colour."}, "a": "Blue.", "uid": "p1"}]
  path = _write(tmp_path / "ft.json", "".join(json.dumps(r) + "\n" for r in recs))
  [s] = inputs.open_sources([path], source_field="q.body", target_field="a", id_field="uid")
  docs = _full_and_ranges(s)
  assert [(d.id, d.source, d.target, d.text, d.is_pair) for d in docs] == [
      ("p0", "What is 2+2?", "Four.", None, True), ("p1", "Name a colour.", "Blue.", None, True)]
  [s] = inputs.open_sources([path], text_field="q.body")
  assert [d.text for d in s.read()] == ["What is 2+2?", "Name a colour."]
  with pytest.raises(InputError, match="source_field and target_field go together"):
    inputs.open_sources([path], source_field="q.body")


def test_jsonl_read_throughput(tmp_path):
  path = str(tmp_path / "big.jsonl")
  with open(path, "w") as f:
    for i in range(100_000):
      f.write(json.dumps({"id": f"d{i}", "text": f"Short document {i}. Two sentences."}) + "\n")
  t0 = time.perf_counter()
  [s] = inputs.open_sources([path])
  n = s.num_docs()
  docs = list(s.read())
  seconds = time.perf_counter() - t0
  assert n == len(docs) == 100_000 and docs[-1].id == "d99999"
  assert seconds < 10, f"100k JSONL docs took {seconds:.2f} s"  # ~0.4 s on one core


# ---------------------------------------------------------------------------------------------
# Globs, ordering, languages


def test_globs_sort_inputs_keep_order_and_lang_suffix(tmp_path):
  for name in ("c", "a", "b"):
    _write(tmp_path / "en" / f"{name}.jsonl", json.dumps({"text": f"doc {name}"}) + "\n")
  _write(tmp_path / "fr" / "z.jsonl", json.dumps({"text": "doc fr"}) + "\n")
  odd = _write(tmp_path / "odd@dir" / "me@home.txt", "at sign in the path")
  sources = inputs.open_sources([f"{tmp_path}/fr/*.jsonl@fra_Latn", f"{tmp_path}/en/*.jsonl",
                                 odd], lang="deu_Latn")
  assert [os.path.relpath(s.name, tmp_path) for s in sources] == [
      "fr/z.jsonl", "en/a.jsonl", "en/b.jsonl", "en/c.jsonl", "odd@dir/me@home.txt"]
  assert [s.lang for s in sources] == ["fra_Latn"] + ["deu_Latn"] * 4
  assert [next(s.read()).lang for s in sources] == [s.lang for s in sources]
  assert inputs.split_lang("x/*.jsonl@zho_Hans", "eng_Latn") == ("x/*.jsonl", "zho_Hans")
  assert inputs.split_lang("user@host.txt", "eng_Latn") == ("user@host.txt", "eng_Latn")
  # Recursive globs.
  assert len(inputs.open_sources([f"{tmp_path}/**/*.jsonl"])) == 4


def test_missing_paths_globs_and_formats(tmp_path):
  with pytest.raises(InputError, match=r"nothing/\*\.jsonl: the glob matches no file"):
    inputs.open_sources([str(tmp_path / "nothing" / "*.jsonl")])
  with pytest.raises(InputError, match=r"missing\.jsonl: no such file"):
    inputs.open_sources([str(tmp_path / "missing.jsonl")])
  p = _write(tmp_path / "data.csv", "a,b\n")
  with pytest.raises(InputError, match=r"data\.csv: cannot tell the format"):
    inputs.open_sources([p])
  [s] = inputs.open_sources([p], fmt="text", text_unit="line")  # an explicit format wins
  assert s.num_docs() == 1
  with pytest.raises(InputError, match="is a directory"):
    inputs.open_sources([str(tmp_path)])
  j = _write(tmp_path / "j.jsonl", '{"text": "x"}\n')
  with pytest.raises(InputError, match=r"j\.jsonl: listed twice"):
    inputs.open_sources([j, str(tmp_path / "*.jsonl")])


# ---------------------------------------------------------------------------------------------
# Bad documents and files


@pytest.mark.parametrize("line2, message", [
    ('{"id": "b"}', "line 2: field 'text': missing"),
    ('{"text": null}', r"line 2: field 'text': missing \(null\)"),
    ('{"text": 42}', "line 2: field 'text': expected a string, got int"),
    ('{"text": "   "}', "line 2: field 'text': empty text"),
    ('{"text": "x", "id": [1]}',
     "line 2: field 'id': expected a string or an integer id, got list"),
    ('{"text": "unterminated}', r"line 2: invalid JSON \(Unterminated string"),
    ('["text"]', "line 2: expected a JSON object, got list"),
])
def test_jsonl_bad_documents(tmp_path, line2, message):
  path = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n' + line2 + '\n{"text": "fine"}\n')
  [s] = inputs.open_sources([path])
  assert s.num_docs() == 3  # counting never parses JSON
  with pytest.raises(InputError, match=f"bad\\.jsonl:{message}"):
    list(s.read())
  assert [d.text for d in s.read(2, 3)] == ["fine"]  # other ranges still read


def test_invalid_utf8_names_line_and_byte_offset(tmp_path):
  data = b'{"text": "ok"}\n{"text": "caf\xe9"}\n'
  path = _write(tmp_path / "u.jsonl", data)
  [s] = inputs.open_sources([path])
  with pytest.raises(InputError, match=r"u\.jsonl:line 2: invalid UTF-8 at byte offset 28 in"):
    list(s.read())
  assert data[28] == 0xE9
  data = b"good line\n\nbad \xff\xfe line\n"
  path = _write(tmp_path / "u.txt", data)
  [s] = inputs.open_sources([path], text_unit="line")
  with pytest.raises(InputError, match=r"u\.txt:line 3: invalid UTF-8 at byte offset 15 in"):
    list(s.read())
  [s] = inputs.open_sources([path])  # file unit: the line is still named
  with pytest.raises(InputError, match=r"u\.txt:line 3: invalid UTF-8 at byte offset 15 in"):
    list(s.read())


def test_empty_files(tmp_path):
  for name in ("e.jsonl", "e.txt", "e.parquet"):
    p = _write(tmp_path / name, b"")
    with pytest.raises(InputError, match=f"{name}: empty file"):
      inputs.open_sources([p])
  p = _write(tmp_path / "blank.jsonl", "\n  \n\t\n")
  [s] = inputs.open_sources([p])
  with pytest.raises(InputError, match=r"blank\.jsonl: zero documents"):
    s.num_docs()
  p = _write(tmp_path / "blank.txt", "\n  \n")
  [s] = inputs.open_sources([p], text_unit="paragraph")
  with pytest.raises(InputError, match=r"blank\.txt: zero documents"):
    s.num_docs()
  [s] = inputs.open_sources([p])  # one document per file: whitespace only is an empty document
  with pytest.raises(InputError, match=r"blank\.txt: empty text"):
    list(s.read())
  pq.write_table(pa.table({"text": pa.array([], pa.string())}), str(tmp_path / "rows0.parquet"))
  with pytest.raises(InputError, match=r"rows0\.parquet: zero documents"):
    inputs.open_sources([str(tmp_path / "rows0.parquet")])


def test_skip_mode_counts_and_logs(tmp_path, caplog):
  lines = ['{"text": "a"}', '{"id": "x"}', '{"text": "b"}', "not json", b'{"text": "\xff"}',
           '{"text": "c"}']
  data = b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines)
  path = _write(tmp_path / "s.jsonl", data)
  [s] = inputs.open_sources([path], on_error="skip")
  with caplog.at_level(logging.WARNING, logger="data_prep.inputs"):
    docs = list(s.read())
  assert [d.text for d in docs] == ["a", "b", "c"]
  assert s.num_skipped == 3
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 3
  assert "s.jsonl:line 2: field 'text': missing" in warnings[0]
  assert "s.jsonl:line 4: invalid JSON" in warnings[1]
  assert "s.jsonl:line 5: invalid UTF-8" in warnings[2]
  list(s.read(0, 2))
  assert s.num_skipped == 4  # cumulative over reads


# ---------------------------------------------------------------------------------------------
# Parquet


def _parquet(path, n=30, row_group_size=7):
  texts = [f"Row {i}: " + "wörds " * (i % 5 + 1) for i in range(n)]
  table = pa.table({
      "text": texts,
      "doc_id": [f"r{i}" for i in range(n)],
      "meta": [{"id": f"m{i}", "n": i} for i in range(n)],
      "prompt": [f"Q{i}?" for i in range(n)],
      "answer": [f"A{i}." for i in range(n)],
      "num": list(range(n)),
  })
  pq.write_table(table, path, row_group_size=row_group_size)
  return texts


def test_parquet_round_trip_and_sizes(tmp_path):
  path = str(tmp_path / "p.parquet")
  texts = _parquet(path)
  [s] = inputs.open_sources([path], id_field="doc_id", lang="spa_Latn")
  assert isinstance(s, inputs.ParquetSource) and s.num_docs() == 30
  docs = _full_and_ranges(s)
  assert [(d.id, d.text, d.where, d.lang) for d in docs] == [
      (f"r{i}", t, f"{path}:row {i}", "spa_Latn") for i, t in enumerate(texts)]
  # Metadata estimate: each row group's uncompressed 'text' column bytes, spread evenly.
  meta = pq.ParquetFile(path).metadata
  expected = []
  for g in range(meta.num_row_groups):
    rg = meta.row_group(g)
    total = [rg.column(c).total_uncompressed_size for c in range(rg.num_columns)
             if rg.column(c).path_in_schema == "text"][0]
    share = [total // rg.num_rows + (k < total % rg.num_rows) for k in range(rg.num_rows)]
    assert sum(share) == total
    expected += share
  np.testing.assert_array_equal(s.doc_sizes(), expected)
  [s] = inputs.open_sources([path], exact_sizes=True)
  np.testing.assert_array_equal(s.doc_sizes(), [len(t.encode()) for t in texts])
  # Default ids (no 'id' column), nested id column, fine-tuning pairs.
  assert [d.id for d in s.read(0, 2)] == ["p.parquet:0", "p.parquet:1"]
  [s] = inputs.open_sources([path], id_field="meta.id", source_field="prompt",
                            target_field="answer", exact_sizes=True)
  docs = _full_and_ranges(s)
  assert [(d.id, d.source, d.target, d.text) for d in docs[5:7]] == [
      ("m5", "Q5?", "A5.", None), ("m6", "Q6?", "A6.", None)]
  np.testing.assert_array_equal(s.doc_sizes(), [len(f"Q{i}?A{i}.") for i in range(30)])


def test_parquet_errors(tmp_path):
  path = str(tmp_path / "p.parquet")
  _parquet(path)
  with pytest.raises(InputError, match=r"p\.parquet: field 'body': no such column"):
    inputs.open_sources([path], text_field="body")
  with pytest.raises(InputError, match=r"p\.parquet: field 'meta\.x': no such column"):
    inputs.open_sources([path], text_field="meta.x")
  with pytest.raises(InputError, match=r"p\.parquet: field 'num': expected a string column"):
    inputs.open_sources([path], text_field="num")
  bad = _write(tmp_path / "junk.parquet", b"this is not parquet at all" * 10)
  with pytest.raises(InputError, match=r"junk\.parquet: not a readable Parquet file"):
    inputs.open_sources([bad])
  whole = open(path, "rb").read()
  trunc = _write(tmp_path / "trunc.parquet", whole[:len(whole) // 2])
  with pytest.raises(InputError, match=r"trunc\.parquet: not a readable Parquet file"):
    inputs.open_sources([trunc])
  # Null and empty texts are per-row errors: raised, or skipped and counted.
  pq.write_table(pa.table({"text": ["a", None, "b", "", "c"]}), str(tmp_path / "n.parquet"),
                 row_group_size=2)
  [s] = inputs.open_sources([str(tmp_path / "n.parquet")])
  with pytest.raises(InputError, match=r"n\.parquet:row 1: field 'text': missing \(null\)"):
    list(s.read())
  [s] = inputs.open_sources([str(tmp_path / "n.parquet")], on_error="skip")
  assert [d.text for d in s.read()] == ["a", "b", "c"] and s.num_skipped == 2
  # Binary column with bad UTF-8: the row and the byte are named.
  pq.write_table(pa.table({"text": pa.array([b"ok", b"caf\xe9"], pa.binary())}),
                 str(tmp_path / "b.parquet"))
  [s] = inputs.open_sources([str(tmp_path / "b.parquet")])
  with pytest.raises(InputError, match=r"b\.parquet:row 1: field 'text': invalid UTF-8 at byte 3"):
    list(s.read())


def test_fingerprint_changes_with_the_file(tmp_path):
  path = _write(tmp_path / "f.jsonl", '{"text": "a"}\n')
  [s] = inputs.open_sources([path])
  fp = s.fingerprint()
  assert fp["path"] == os.path.abspath(path) and fp["size"] == 14
  json.dumps(fp)
  _write(tmp_path / "f.jsonl", '{"text": "a"}\n{"text": "b"}\n')
  [s2] = inputs.open_sources([path])
  assert s2.fingerprint() != fp
  ppath = str(tmp_path / "p.parquet")
  _parquet(ppath)
  [p] = inputs.open_sources([ppath])
  assert p.fingerprint()["num_rows"] == 30


# ---------------------------------------------------------------------------------------------
# TFDS (array_record, prepared and read without TensorFlow)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyDocs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A tiny text dataset with two configs, a nested feature and a split with an empty text."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="en"), tfds.core.BuilderConfig(name="fr")]

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "id": tfds.features.Text(), "text": tfds.features.Text(),
          "prompt": tfds.features.Text(), "answer": tfds.features.Text(),
          "meta": {"title": tfds.features.Text(), "n": tfds.features.Scalar(np.int32)}}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(12, False),
              "bad": self._generate_examples(3, True)}

    def _generate_examples(self, n, bad):
      lang = self.builder_config.name
      for i in range(n):
        text = "" if bad and i == 1 else f"{lang} document {i}. " * (i + 1)
        yield i, {"id": f"{lang}-{i}", "text": text, "prompt": f"P{i}", "answer": f"A{i}",
                  "meta": {"title": f"T{i}", "n": i}}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  for config in ("en", "fr"):
    TinyDocs(config=config, data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_round_trip(tfds_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  [s] = inputs.open_sources(["tfds:tiny_docs/en:train"], tfds_data_dir=tfds_dir)
  assert isinstance(s, inputs.TfdsSource) and s.num_docs() == 12
  docs = _full_and_ranges(s)
  # Storage order is TFDS's (shuffled at preparation); compare with tfds itself.
  ref = tfds.data_source("tiny_docs/en", split="train", data_dir=tfds_dir, download=False)
  assert [d.id for d in docs] == [ref[i]["id"].decode() for i in range(12)]
  assert sorted(d.id for d in docs) == sorted(f"en-{i}" for i in range(12))
  for i, d in enumerate(docs):
    k = int(d.id.split("-")[1])
    assert d.text == f"en document {k}. " * (k + 1)
    assert d.where == f"tfds tiny_docs/en:train[{i}]" and d.lang == "eng_Latn"
  # Sizes: exact UTF-8 bytes of the text; the default is the split's bytes per example.
  [ex] = inputs.open_sources(["tfds:tiny_docs/en:train"], tfds_data_dir=tfds_dir,
                             exact_sizes=True)
  np.testing.assert_array_equal(ex.doc_sizes(), [len(d.text.encode()) for d in docs])
  split = ref.dataset_info.splits["train"]
  np.testing.assert_array_equal(s.doc_sizes(),
                                [round(int(split.num_bytes) / split.num_examples)] * 12)
  assert s.fingerprint()["num_examples"] == 12


def test_tfds_slices_configs_fields_and_lang(tfds_dir):
  [full] = inputs.open_sources(["tfds:tiny_docs/fr:train"], tfds_data_dir=tfds_dir)
  docs = list(full.read())
  [part] = inputs.open_sources(["tfds:tiny_docs/fr:1.0.0:train[3:7]@fra_Latn"],
                               tfds_data_dir=tfds_dir)
  got = list(part.read())
  assert [d.id for d in got] == [d.id for d in docs[3:7]] and part.num_docs() == 4
  assert {d.lang for d in got} == {"fra_Latn"} and got[0].where.endswith(":train[3:7][0]")
  assert len(part.doc_sizes()) == 4
  [pairs] = inputs.open_sources(["tfds:tiny_docs/fr:train"], tfds_data_dir=tfds_dir,
                                source_field="prompt", target_field="answer", id_field="meta.title")
  p = list(pairs.read())
  assert [(x.source[1:], x.target[1:], x.id[1:]) for x in p] == [
      (d.id.split("-")[1],) * 3 for d in docs]
  [nested] = inputs.open_sources(["tfds:tiny_docs/fr:train"], tfds_data_dir=tfds_dir,
                                 text_field="meta.title")
  assert [d.text for d in nested.read()] == [x.id for x in p]


def test_tfds_errors(tfds_dir):
  with pytest.raises(InputError, match=r"tfds:no_such_dataset:train: cannot open the TFDS dataset"):
    inputs.open_sources(["tfds:no_such_dataset:train"], tfds_data_dir=tfds_dir)
  with pytest.raises(InputError, match=r"tfds:tiny_docs/en:validation: cannot open .*split"):
    inputs.open_sources(["tfds:tiny_docs/en:validation"], tfds_data_dir=tfds_dir)
  with pytest.raises(InputError, match=r"tfds:tiny_docs/en:train: field 'body': no such feature"):
    inputs.open_sources(["tfds:tiny_docs/en:train"], tfds_data_dir=tfds_dir, text_field="body")
  with pytest.raises(InputError, match=r"expected tfds:NAME"):
    inputs.open_sources(["tfds:tiny_docs"], tfds_data_dir=tfds_dir)
  # A dataset prepared as tfrecord (faked here: tfrecord writing needs TensorFlow).
  fake = os.path.join(os.path.dirname(tfds_dir), "tfds_tfrecord")
  shutil.copytree(os.path.join(tfds_dir, "tiny_docs", "en"), os.path.join(fake, "tiny_docs", "en"))
  for name in glob.glob(os.path.join(fake, "tiny_docs", "en", "1.0.0", "*")):
    os.rename(name, name.replace("array_record", "tfrecord"))
  info = os.path.join(fake, "tiny_docs", "en", "1.0.0", "dataset_info.json")
  with open(info) as f:
    text = f.read().replace('"array_record"', '"tfrecord"')
  with open(info, "w") as f:
    f.write(text)
  with pytest.raises(InputError, match=r"tfds:tiny_docs/en:train: cannot open .*TFRECORD is not "
                                       r"supported.*file_format='array_record'"):
    inputs.open_sources(["tfds:tiny_docs/en:train"], tfds_data_dir=fake)
  [s] = inputs.open_sources(["tfds:tiny_docs/en:bad"], tfds_data_dir=tfds_dir)
  with pytest.raises(InputError, match=r"tfds tiny_docs/en:bad\[\d\]: field 'text': empty text"):
    list(s.read())
  [s] = inputs.open_sources(["tfds:tiny_docs/en:bad"], tfds_data_dir=tfds_dir, on_error="skip")
  assert len(list(s.read())) == 2 and s.num_skipped == 1


def test_derived_ids_are_unique_across_files_with_one_basename(tmp_path):
  """en/part.jsonl and fr/part.jsonl without ids: the old 'part.jsonl:1' twice; now the path
  relative to the common directory. A file whose basename is unique keeps it."""
  for d in ("en", "fr"):
    (tmp_path / d).mkdir()
    (tmp_path / d / "part.jsonl").write_text(
        json.dumps({"text": f"{d} one"}) + "\n" + json.dumps({"text": f"{d} two"}) + "\n")
    (tmp_path / d / "notes.txt").write_text("a line\n")
  (tmp_path / "en" / "solo.jsonl").write_text(json.dumps({"text": "solo"}) + "\n")
  sources = inputs.open_sources([str(tmp_path / "*" / "*.jsonl"), str(tmp_path / "*" / "*.txt")],
                                text_unit="line")
  ids = [d.id for s in sources for d in s.read()]
  assert ids == ["en/part.jsonl:1", "en/part.jsonl:2", "solo.jsonl:1", "fr/part.jsonl:1",
                 "fr/part.jsonl:2", "en/notes.txt:1", "fr/notes.txt:1"]
  assert inputs.check_unique_ids(sources) == 7


def test_check_unique_ids_names_both_records(tmp_path, caplog):
  a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
  a.write_text("".join(json.dumps({"id": i, "text": "t"}) + "\n" for i in ("x", "y", "z")))
  b.write_text(json.dumps({"id": "q", "text": "t"}) + "\n" + json.dumps({"id": "y", "text": "u"}))
  with pytest.raises(InputError, match=(rf"{re.escape(str(b))}:line 2: duplicate document id "
                                        rf"'y', already used by {re.escape(str(a))}:line 2")):
    inputs.check_unique_ids(inputs.open_sources([str(a), str(b)]))
  # Integer and string ids that read the same are the same id; a bad document is passed over
  # here without a log line (read() reports it), and does not count.
  c = tmp_path / "c.jsonl"
  c.write_text(json.dumps({"id": 7, "text": "t"}) + "\n" + json.dumps({"id": "8"}) + "\n"
               + json.dumps({"id": "7", "text": "t"}) + "\n")
  [src] = inputs.open_sources([str(c)], on_error="skip")
  with caplog.at_level("WARNING"):
    with pytest.raises(InputError, match=r"c\.jsonl:line 3: duplicate document id '7'"):
      inputs.check_unique_ids([src])
  assert not caplog.records and src.num_skipped == 0
  c.write_text(json.dumps({"id": 7, "text": "t"}) + "\n" + json.dumps({"id": "7"}) + "\n")
  [src] = inputs.open_sources([str(c)], on_error="skip")
  assert inputs.check_unique_ids([src]) == 1
  assert issubclass(InputError, UserError)
