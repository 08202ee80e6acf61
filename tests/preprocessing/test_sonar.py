"""data_prep.sonar: tiny random SONAR cards through fairseq2's production loaders, and encoding.

The oracle is sonar-space itself: ``TextToEmbeddingModelPipeline.predict`` on the same model, and
the pipelines built from card NAMES in a fresh process (``FAIRSEQ2_USER_ASSET_DIR``), never
data_prep.sonar's own code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sonar")
pytest.importorskip("sentencepiece")

from sonar.inference_pipelines.text import TextToEmbeddingModelPipeline  # noqa: E402

from data_prep import sonar  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHORT = ["Hello world.", "The cat sat on the mat.", "Le chat est noir.", "Der Hund ist alt.",
         "x", "End of text.", "A big red car drove quickly through the old city at night."]


def _env(**extra: str) -> dict[str, str]:
  return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", FAIRSEQ2_NO_PROGRESS="1",
              **extra)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
  return sonar.build_tiny_sonar(str(tmp_path_factory.mktemp("sonar") / "tiny"), seed=0)


@pytest.fixture(scope="module")
def encoder(tiny) -> sonar.SentenceEncoder:
  return sonar.SentenceEncoder.load(tiny["encoder"], device="cpu")


def _long_sentence(n_words: int) -> str:
  return " ".join(["cat", "dog", "house", "river"][i % 4] for i in range(n_words))


def _state(path: str) -> dict[str, torch.Tensor]:
  return torch.load(path, map_location="cpu", weights_only=True)["model"]


# ----------------------------------------------------------------------------------------------
# Building

def test_tiny_build_layout_and_cards(tiny):
  import yaml
  d = tiny["card_dir"]
  names = sorted(os.listdir(d))
  assert names == sorted(["tiny_sonar_encoder.yaml", "tiny_sonar_encoder.pt",
                          "tiny_sonar_decoder.yaml", "tiny_sonar_decoder.pt",
                          "tiny_sonar_tokenizer.model", "tiny_sonar.json"])
  assert sum(os.path.getsize(os.path.join(d, n)) for n in names) < 10 * 2**20
  parent = os.path.dirname(d)
  assert not [n for n in os.listdir(parent) if n.startswith(".tmp-")]
  for kind, family in (("encoder", "transformer_encoder"), ("decoder", "transformer_decoder")):
    with open(tiny[kind], encoding="utf-8") as f:
      card = yaml.safe_load(f)
    assert card["name"] == tiny[f"{kind}_card"]
    assert card["model_family"] == family and card["model_arch"] == "basic"
    assert card["tokenizer_family"] == "nllb"
    assert os.path.isfile(os.path.join(d, card["checkpoint"]))
    assert os.path.isfile(os.path.join(d, card["tokenizer"]))
    langs = card["tokenizer_config"]["_set_"]["langs"]
    assert {"eng_Latn", "fra_Latn", "deu_Latn"} <= set(langs)
    assert card["model_config"]["_set_"]["model_dim"] == 32


def test_tiny_build_is_deterministic_per_seed(tiny, tmp_path):
  again = sonar.build_tiny_sonar(str(tmp_path / "again"), seed=0)
  other = sonar.build_tiny_sonar(str(tmp_path / "other"), seed=1)
  for name in ("tiny_sonar_tokenizer.model", "tiny_sonar_encoder.yaml", "tiny_sonar_decoder.yaml"):
    with open(os.path.join(tiny["card_dir"], name), "rb") as f, \
        open(os.path.join(again["card_dir"], name), "rb") as g:
      assert f.read() == g.read(), name
  for kind in ("encoder", "decoder"):
    a = _state(tiny[kind].replace(".yaml", ".pt"))
    b = _state(again[kind].replace(".yaml", ".pt"))
    c = _state(other[kind].replace(".yaml", ".pt"))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[f"{kind}_frontend.embed.weight"], c[f"{kind}_frontend.embed.weight"])
  with pytest.raises(ValueError, match="not empty"):
    sonar.build_tiny_sonar(again["card_dir"], seed=0)
  sonar.build_tiny_sonar(again["card_dir"], seed=2, overwrite=True)
  assert json.load(open(again["info"], encoding="utf-8"))["seed"] == 2


def test_dim_is_as_configured(tiny, encoder, tmp_path):
  assert encoder.dim == 32
  x = encoder.encode(SHORT[:2], "eng_Latn")
  assert x.shape == (2, 32) and x.dtype == np.float32
  wide = sonar.build_tiny_sonar(str(tmp_path / "wide"), seed=0, dim=48, num_layers=1)
  enc48 = sonar.SentenceEncoder.load(wide["encoder"], device="cpu")
  assert enc48.dim == 48
  assert enc48.encode(SHORT, "eng_Latn").shape == (len(SHORT), 48)
  assert sonar.EmbeddingDecoder.load(wide["decoder"], device="cpu").dim == 48


# ----------------------------------------------------------------------------------------------
# Loading

def test_cards_load_by_name_through_production_path(tiny, encoder):
  """A fresh process finds the cards by NAME (FAIRSEQ2_USER_ASSET_DIR) and sonar loads them."""
  script = textwrap.dedent("""
      import json, sys
      from fairseq2.data.tokenizers import load_tokenizer
      from fairseq2.models import load_model
      from sonar.inference_pipelines.text import (EmbeddingToTextModelPipeline,
                                                  TextToEmbeddingModelPipeline)
      sents = json.loads(sys.argv[1])
      enc_model = load_model("tiny_sonar_encoder")
      tok = load_tokenizer("tiny_sonar_encoder")
      t2v = TextToEmbeddingModelPipeline("tiny_sonar_encoder", "tiny_sonar_encoder")
      x = t2v.predict(sents, source_lang="eng_Latn")
      v2t = EmbeddingToTextModelPipeline("tiny_sonar_decoder", "tiny_sonar_decoder")
      texts = v2t.predict(x, target_lang="eng_Latn", beam_size=2, max_seq_len=8,
                          max_gen_len=(0, 8))
      print(json.dumps({"emb": x.tolist(), "texts": texts, "vocab": tok.vocab_info.size,
                        "model": type(enc_model).__name__}))
  """)
  r = subprocess.run([sys.executable, "-c", script, json.dumps(SHORT)], cwd=ROOT,
                     env=_env(FAIRSEQ2_USER_ASSET_DIR=tiny["card_dir"]), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got["model"] == "SonarTextTransformerEncoderModel"
  assert got["vocab"] == json.load(open(tiny["info"], encoding="utf-8"))["model_vocab_size"]
  by_name = np.asarray(got["emb"], np.float32)
  np.testing.assert_allclose(encoder.encode(SHORT, "eng_Latn"), by_name, atol=1e-6, rtol=0)
  dec = sonar.EmbeddingDecoder.load(tiny["decoder"], device="cpu")
  assert dec.decode(by_name, "eng_Latn", beam_size=2, max_len=8) == got["texts"]


def test_path_loaded_weights_are_the_checkpoint(tiny, encoder):
  want = _state(tiny["encoder"].replace(".yaml", ".pt"))
  have = encoder.model.state_dict()
  assert set(want) == set(have)
  for k, v in want.items():
    assert torch.equal(have[k], v), k


def test_card_directory_tokenizer_model_and_base_card(tiny, encoder, tmp_path):
  import yaml
  want = encoder.encode(SHORT, "eng_Latn")
  from_dir = sonar.SentenceEncoder.load(tiny["card_dir"], device="cpu")
  np.testing.assert_array_equal(from_dir.encode(SHORT, "eng_Latn"), want)
  with_spm = sonar.SentenceEncoder.load(tiny["encoder"], tokenizer=tiny["tokenizer"], device="cpu")
  np.testing.assert_array_equal(with_spm.encode(SHORT, "eng_Latn"), want)
  # A local card that inherits the production card (base:) and points at local files.
  with open(tiny["encoder"], encoding="utf-8") as f:
    tiny_card = yaml.safe_load(f)
  d = tiny["card_dir"]
  card = dict(name="my_local_encoder", base=sonar.DEFAULT_ENCODER,
              model_config=tiny_card["model_config"],
              checkpoint="file://" + os.path.join(d, tiny_card["checkpoint"]),
              tokenizer="file://" + os.path.join(d, tiny_card["tokenizer"]))
  path = tmp_path / "elsewhere" / "local.yaml"
  path.parent.mkdir()
  path.write_text(yaml.safe_dump(card), encoding="utf-8")
  based = sonar.SentenceEncoder.load(str(path), device="cpu")
  np.testing.assert_array_equal(based.encode(SHORT, "eng_Latn"), want)


def test_device_and_dtype_flags_on_cpu(tiny, encoder):
  assert encoder.device == torch.device("cpu") and encoder.dtype == torch.float32
  assert sonar.resolve_dtype(None, torch.device("cpu")) == torch.float32
  assert sonar.resolve_dtype(None, torch.device("cuda")) == torch.float16
  if not torch.cuda.is_available():
    assert sonar.resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
      sonar.resolve_device("cuda")
  with pytest.raises(ValueError, match="dtype"):
    sonar.resolve_dtype("float8", torch.device("cpu"))
  f32 = sonar.SentenceEncoder.load(tiny["encoder"], device="cpu", dtype="float32")
  assert next(f32.model.parameters()).dtype == torch.float32
  bf16 = sonar.SentenceEncoder.load(tiny["encoder"], device="cpu", dtype="bfloat16")
  assert next(bf16.model.parameters()).dtype == torch.bfloat16
  x16, x32 = bf16.encode(SHORT, "eng_Latn"), f32.encode(SHORT, "eng_Latn")
  assert x16.dtype == np.float32
  np.testing.assert_allclose(x16, x32, atol=0.1)
  assert np.abs(x16 - x32).max() > 0  # really ran in bfloat16


def test_load_errors_name_what_was_tried(tiny, tmp_path):
  import yaml
  how_to = ("tiny_models", "FAIRSEQ2_USER_ASSET_DIR", "file://")
  with pytest.raises(sonar.SonarLoadError) as e:
    sonar.load_text_encoder("no_such_sonar_card", device="cpu")
  assert "no_such_sonar_card" in str(e.value) and all(s in str(e.value) for s in how_to)
  with pytest.raises(sonar.SonarLoadError, match="model_family"):  # fails before any download
    sonar.load_text_encoder(sonar.DEFAULT_DECODER, device="cpu")
  with pytest.raises(sonar.SonarLoadError, match="no such file"):
    sonar.load_text_decoder(str(tmp_path / "missing.yaml"), device="cpu")
  with open(tiny["encoder"], encoding="utf-8") as f:
    card = yaml.safe_load(f)
  for i, ckpt in enumerate(["missing_weights.pt", "https://sonar-weights.invalid/enc.pt"]):
    card.update(name=f"broken_{i}", checkpoint=ckpt, tokenizer=tiny["tokenizer"])
    path = tmp_path / f"broken_{i}.yaml"
    path.write_text(yaml.safe_dump(card), encoding="utf-8")
    with pytest.raises(sonar.SonarLoadError) as e:
      sonar.load_text_encoder(str(path), device="cpu")
    msg = str(e.value)
    assert f"broken_{i}" in msg and ckpt.split("/")[-1] in msg, msg
    assert all(s in msg for s in how_to)
  with pytest.raises(sonar.SonarLoadError, match="exactly one"):
    sonar.load_text_encoder(str(tmp_path), device="cpu")  # two encoder cards in one directory
  with pytest.raises(sonar.SonarLoadError, match="not a SONAR text decoder|exactly one"):
    sonar.load_text_decoder(tiny["encoder"], device="cpu")


# ----------------------------------------------------------------------------------------------
# Encoding

def test_encode_matches_sonar_predict_in_input_order(encoder):
  rng = np.random.default_rng(0)
  long = _long_sentence(700)  # ~700+ tokens: truncated to 514 by sonar
  sents = SHORT + [long, long + " and then a different ending", _long_sentence(60),
                   "Fin du texte.", SHORT[1]]
  sents = [sents[i] for i in rng.permutation(len(sents))]
  direct_pipe = TextToEmbeddingModelPipeline(encoder.model, encoder.tokenizer)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the truncation warnings
    direct = direct_pipe.predict(sents, source_lang="eng_Latn", batch_size=4).numpy()
    ours = encoder.encode(sents, "eng_Latn")
    small = encoder.encode(sents, "eng_Latn", batch_size=3, max_tokens=64)
    fra = encoder.encode(sents, "fra_Latn")
    direct_fra = direct_pipe.predict(sents, source_lang="fra_Latn").numpy()
  assert ours.shape == (len(sents), 32) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, direct, atol=1e-6, rtol=0)
  np.testing.assert_allclose(small, direct, atol=1e-6, rtol=0)
  np.testing.assert_allclose(fra, direct_fra, atol=1e-6, rtol=0)
  assert np.abs(fra - ours).max() > 1e-3  # the language tag matters
  i, j = sents.index(long), sents.index(long + " and then a different ending")
  np.testing.assert_allclose(ours[i], ours[j], atol=1e-6)  # both cut at 514 tokens
  assert len(encoder.tokenize([long], "eng_Latn")[0]) == encoder.max_seq_len == 514
  dup = [k for k, s in enumerate(sents) if s == SHORT[1]]
  assert len(dup) == 2
  np.testing.assert_allclose(ours[dup[0]], ours[dup[1]], atol=1e-6)
  one = direct_pipe.predict([sents[3]], source_lang="eng_Latn").numpy()
  np.testing.assert_allclose(ours[3], one[0], atol=1e-6, rtol=0)


def test_batches_are_sorted_and_bounded(encoder):
  rng = np.random.default_rng(1)
  lengths = rng.integers(1, 60, size=200)
  batches = encoder.batches(lengths, batch_size=16, max_tokens=300)
  flat = np.concatenate(batches)
  assert sorted(flat.tolist()) == list(range(200))
  assert np.all(np.diff(lengths[flat]) <= 0)  # longest first
  for b in batches:
    assert len(b) <= 16 and (len(b) == 1 or len(b) * lengths[b].max() <= 300)


def test_encode_edge_cases(encoder):
  assert encoder.encode([], "eng_Latn").shape == (0, 32)
  with pytest.raises(TypeError):
    encoder.encode("one string", "eng_Latn")
  with pytest.raises(ValueError, match="lang"):
    encoder.encode(SHORT, "xx_Nope")
  with pytest.raises(ValueError, match="batch_size"):
    encoder.encode(SHORT, "eng_Latn", batch_size=0)


def test_tiny_models_cli_bad_out_exits_2_before_building(tmp_path):
  """An --out that is a file (or under one): one 'error: --out ...' line and exit 2 before any
  model is built (the old tool died in os.makedirs with a traceback)."""
  (tmp_path / "file").write_text("x")
  env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
  for out in (tmp_path / "file", tmp_path / "file" / "models"):
    r = subprocess.run([sys.executable, "-m", "data_prep.tiny_models", f"--out={out}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out"), r.stderr
    assert str(tmp_path / "file") in lines[0]
  assert os.listdir(tmp_path) == ["file"]
  # Load failures are user errors (one line in every tool), and still RuntimeErrors.
  from lcm_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  assert issubclass(sonar.SonarLoadError, UserError)
  assert issubclass(sonar.SonarLoadError, RuntimeError)
