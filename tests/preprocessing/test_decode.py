"""data_prep.sonar.EmbeddingDecoder and the ``python -m data_prep.decode`` CLI on tiny SONAR models.

The oracle is sonar-space's ``EmbeddingToTextModelPipeline.predict`` on the same decoder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sonar")
pytest.importorskip("sentencepiece")

from sonar.inference_pipelines.text import EmbeddingToTextModelPipeline  # noqa: E402

from data_prep import decode as decode_cli  # noqa: E402
from data_prep import sonar  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIM = 32
BEAM, MAX_LEN = 3, 10  # short beams keep the random decoder fast


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
  return sonar.build_tiny_sonar(str(tmp_path_factory.mktemp("sonar") / "tiny"), seed=0)


@pytest.fixture(scope="module")
def decoder(tiny) -> sonar.EmbeddingDecoder:
  return sonar.EmbeddingDecoder.load(tiny["decoder"], device="cpu")


def _direct(decoder: sonar.EmbeddingDecoder, x: np.ndarray, lang: str = "eng_Latn",
            batch_size: int = 1) -> list[str]:
  """sonar's own pipeline on the same model, with the generator settings the module documents."""
  pipe = EmbeddingToTextModelPipeline(decoder.model, decoder.tokenizer)
  return pipe.predict(torch.from_numpy(np.asarray(x, np.float32)), target_lang=lang,
                      batch_size=batch_size, beam_size=BEAM, max_seq_len=MAX_LEN,
                      max_gen_len=(0, MAX_LEN))


def _vectors(n: int, seed: int = 0) -> np.ndarray:
  return (np.random.default_rng(seed).normal(size=(n, DIM)) * 0.3).astype(np.float32)


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
  return subprocess.run([sys.executable, "-m", "data_prep.decode", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _read_jsonl(path) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------
# EmbeddingDecoder

def test_decode_matches_sonar_pipeline_row_by_row(decoder):
  x = _vectors(7)
  ours = decoder.decode(x, "eng_Latn", beam_size=BEAM, max_len=MAX_LEN, batch_size=3)
  assert len(ours) == 7 and all(isinstance(t, str) for t in ours)
  assert len(set(ours)) >= 3  # the random decoder's text depends on the embedding
  assert ours == [_direct(decoder, x[i:i + 1])[0] for i in range(7)]
  assert ours[::-1] == decoder.decode(x[::-1], "eng_Latn", beam_size=BEAM, max_len=MAX_LEN)
  fra = decoder.decode(x, "fra_Latn", beam_size=BEAM, max_len=MAX_LEN)
  assert fra == _direct(decoder, x, "fra_Latn", batch_size=7)


def test_decode_checks_its_input(decoder):
  assert decoder.dim == DIM
  assert decoder.decode(np.zeros((0, DIM), np.float32), "eng_Latn") == []
  with pytest.raises(ValueError, match=r"\(n, 32\)"):
    decoder.decode(np.zeros((2, 16), np.float32), "eng_Latn")
  with pytest.raises(ValueError, match=r"\(n, 32\)"):
    decoder.decode(np.zeros((DIM,), np.float32), "eng_Latn")
  bad = _vectors(3)
  bad[1, 4] = np.nan
  with pytest.raises(ValueError, match="row 1"):
    decoder.decode(bad, "eng_Latn")
  with pytest.raises(ValueError, match="lang"):
    decoder.decode(_vectors(1), "xx_Nope")
  with pytest.raises(ValueError, match="max_len"):
    decoder.decode(_vectors(1), "eng_Latn", max_len=2)
  with pytest.raises(ValueError, match="beam_size"):
    decoder.decode(_vectors(1), "eng_Latn", beam_size=0)


# ----------------------------------------------------------------------------------------------
# CLI

def _generate_npz(path, lengths, max_len: int = 4, dim: int = DIM, drop: tuple = ()) -> dict:
  """A file in ``python -m lcm_jax.generate``'s documented output layout."""
  b = len(lengths)
  emb = np.zeros((b, max_len, dim), np.float32)
  rng = np.random.default_rng(3)
  for i, n in enumerate(lengths):
    emb[i, :min(n, max_len)] = rng.normal(size=(min(n, max_len), dim)) * 0.3
  arrays = dict(ids=np.array([f"doc-{i}" for i in range(b)]), embeddings=emb,
                lengths=np.asarray(lengths, np.int32),
                stop_reasons=np.array(["eot", "max_len", "repetition", "eot", "max_len"][:b]),
                prompt_lengths=np.arange(1, b + 1, dtype=np.int32), step=np.int64(7))
  for k in drop:
    arrays.pop(k)
  np.savez(path, **arrays)
  return arrays


def test_cli_decodes_generate_output(tiny, decoder, tmp_path):
  arrays = _generate_npz(tmp_path / "gen.npz", [3, 0, 4, 1, 2])
  out = tmp_path / "out" / "gen.jsonl"
  r = _run(f"--embeddings={tmp_path / 'gen.npz'}", f"--out={out}", f"--decoder={tiny['card_dir']}",
           f"--beam_size={BEAM}", f"--max_len={MAX_LEN}", "--batch_size=4", "--device=cpu")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "wrote" in r.stderr
  lines = _read_jsonl(out)
  lengths = arrays["lengths"]
  assert [d["id"] for d in lines] == arrays["ids"].tolist()
  assert [len(d["sentences"]) for d in lines] == lengths.tolist()
  assert [d["stop_reason"] for d in lines] == arrays["stop_reasons"].tolist()
  flat = np.concatenate([arrays["embeddings"][i, :n] for i, n in enumerate(lengths)])
  want = _direct(decoder, flat, batch_size=4)
  got = [s for d in lines for s in d["sentences"]]
  assert got == want
  assert all(d["text"] == " ".join(d["sentences"]) for d in lines)
  assert lines[1] == {"id": "doc-1", "sentences": [], "text": "", "stop_reason": "max_len"}
  assert os.listdir(out.parent) == ["gen.jsonl"]  # no temporary files left


def test_cli_decodes_plain_npy_rows(tiny, decoder, tmp_path):
  x = _vectors(3, seed=5)
  np.save(tmp_path / "flat.npy", x)
  out = tmp_path / "flat.jsonl"
  r = _run(f"--embeddings={tmp_path / 'flat.npy'}", f"--out={out}", f"--decoder={tiny['decoder']}",
           f"--beam_size={BEAM}", f"--max_len={MAX_LEN}", "--target_lang=deu_Latn")
  assert r.returncode == 0, r.stderr[-3000:]
  lines = _read_jsonl(out)
  want = _direct(decoder, x, "deu_Latn")
  assert [d["id"] for d in lines] == [0, 1, 2]
  assert [d["sentences"] for d in lines] == [[t] for t in want]
  assert all(d["stop_reason"] is None and d["text"] == d["sentences"][0] for d in lines)


def test_read_input_accepts_2d_npz(tmp_path):
  x = _vectors(4)
  np.savez(tmp_path / "x.npz", embeddings=x)
  inp = decode_cli.read_input(str(tmp_path / "x.npz"))
  assert inp.ids == [0, 1, 2, 3] and inp.lengths.tolist() == [1, 1, 1, 1]
  np.testing.assert_array_equal(inp.concepts, x)


@pytest.mark.parametrize("case, field", [
    ("missing_lengths", "lengths"),
    ("missing_embeddings", "embeddings"),
    ("lengths_too_long", "lengths"),
    ("wrong_dim", "embeddings"),
    ("missing_file", "nothere.npz"),
])
def test_cli_bad_input_exits_2_without_output(tiny, tmp_path, case, field):
  path = tmp_path / "in.npz"
  if case == "missing_lengths":
    _generate_npz(path, [1, 2], drop=("lengths",))
  elif case == "missing_embeddings":
    _generate_npz(path, [1, 2], drop=("embeddings",))
  elif case == "lengths_too_long":
    _generate_npz(path, [1, 6], max_len=4)
  elif case == "wrong_dim":
    _generate_npz(path, [1, 2], dim=DIM // 2)
  else:
    path = tmp_path / "nothere.npz"
  out = tmp_path / "out.jsonl"
  r = _run(f"--embeddings={path}", f"--out={out}", f"--decoder={tiny['decoder']}")
  assert r.returncode == 2, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and field in errors[0] and str(path) in errors[0], r.stderr
  assert sorted(os.listdir(tmp_path)) == ([] if case == "missing_file" else ["in.npz"])


def test_cli_bad_out_exits_2_before_decoding(tiny, tmp_path):
  """An --out under a file (its directory cannot exist): refused before the input is read or the
  decoder loaded; the old tool decoded everything, then died with a traceback. A missing
  --embeddings names the flag."""
  path = tmp_path / "in.npz"
  _generate_npz(path, [1, 2])
  (tmp_path / "file").write_text("x")
  for args, needles in (
      ([f"--embeddings={path}", f"--out={tmp_path / 'file' / 'o.jsonl'}"],
       ["--out", str(tmp_path / "file")]),
      ([f"--embeddings={tmp_path / 'none.npz'}", f"--out={tmp_path / 'o.jsonl'}"],
       ["--embeddings", str(tmp_path / "none.npz"), "no such file"])):
    r = _run(*args, f"--decoder={tiny['decoder']}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), r.stderr
    assert sorted(os.listdir(tmp_path)) == ["file", "in.npz"]
