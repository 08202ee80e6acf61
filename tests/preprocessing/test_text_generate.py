"""Tests of ``python -m data_prep.text_generate``: text in, text out, end to end and offline.

  pytest tests/preprocessing/test_text_generate.py

text -> (tiny SaT + tiny SONAR) shards -> normalizer -> tiny Base-LCM and Two-Tower trained 2 steps
-> export (--workdir) -> PyTorch generate -> SONAR decode -> strings; the command's concepts are
checked against a direct :mod:`lcm_interop.torch_generate` call and a direct decode.
"""

import json
import os
import sys

import numpy as np
import pytest

from tests.helpers import main_cmd, run_cli

from data_prep import text_corpus
from data_prep import tiny_models

DIM = 32
PROMPTS = ["The cat sat on the red table. It was very happy.",
           "A dog walked to the river"]
MAX_LEN = 4
RECIPES = {"base_lcm": "configs/mse_1b6.py:tiny", "two_tower": "configs/two_tower_1b6.py:tiny"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Tiny models, an embedded corpus with its normalizer, and one 2-step workdir per family."""
  from data_prep import embed, fit_normalizer  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.mktemp("text_generate")
  flags = tiny_models.build(str(base / "models"), seed=0, sonar_dim=DIM)
  corpus = base / "corpus.jsonl"
  with open(corpus, "w", encoding="utf-8") as f:
    for i, doc in enumerate(text_corpus.documents(24, seed=3, max_sentences=6)):
      f.write(json.dumps({"id": f"d{i}", "text": doc}) + "\n")
  data = str(base / "data")
  assert embed.main([f"--input={corpus}", f"--out={data}", f"--sat_model={flags['sat_model']}",
                     f"--sat_tokenizer={flags['sat_tokenizer']}", f"--encoder={flags['encoder']}",
                     "--device=cpu"]) == 0
  fit_normalizer.fit([(data, 1.0)], os.path.join(data, "normalizer.npz"), set_manifest=True,
                     verbose=False)
  workdirs = {}
  for family, config in RECIPES.items():
    wd = str(base / family)
    r = run_cli(main_cmd(wd, data, "--config.train.num_steps=2",
                         "--config.train.checkpoint_every=2", "--config.train.eval_every=0",
                         "--config.train.log_every=1", "--config.data.seq_len=16",
                         "--config.data.max_doc_len=16", "--config.data.global_batch_size=8",
                         "--config.model.model_dim=32", "--config.model.ffn_inner_dim=64",
                         f"--config.model.sonar_embed_dim={DIM}", config=config))
    assert r.returncode == 0, r.stderr[-3000:]
    workdirs[family] = wd
  return flags, workdirs, base


def _cmd(flags, *extra):
  return [sys.executable, "-m", "data_prep.text_generate", f"--sat_model={flags['sat_model']}",
          f"--sat_tokenizer={flags['sat_tokenizer']}", f"--encoder={flags['encoder']}",
          f"--decoder={flags['decoder']}", "--device=cpu", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(RECIPES))
def test_text_to_text_end_to_end(setup, family, tmp_path):
  from data_prep import sonar  # pylint: disable=g-import-not-at-top
  from lcm_interop import export, torch_generate, torch_models  # pylint: disable=g-import-not-at-top
  from lcm_jax import diffusion  # pylint: disable=g-import-not-at-top
  from lcm_jax.generate import STOP_REASONS, GenerationConfig  # pylint: disable=g-import-not-at-top
  flags, workdirs, _ = setup
  pfile = tmp_path / "prompts.jsonl"
  with open(pfile, "w", encoding="utf-8") as f:
    f.write(json.dumps({"id": "second", "text": PROMPTS[1]}) + "\n")
  out = str(tmp_path / "gen.jsonl")
  gen_flags = [f"--max_len={MAX_LEN}", "--seed=3", "--beam_size=2", "--decode_max_len=12",
               "--sampler_steps=4", "--eta=0.5", "--temperature=0.3", "--eot_threshold=0.99"]
  r = run_cli(_cmd(flags, f"--workdir={workdirs[family]}", f"--prompt={PROMPTS[0]}",
                   f"--prompt_file={pfile}", f"--out={out}", *gen_flags))
  assert r.returncode == 0, r.stderr[-3000:]
  records = [json.loads(line) for line in open(out, encoding="utf-8")]
  assert [x["id"] for x in records] == ["prompt", "second"]
  saved = np.load(str(tmp_path / "gen.npz"))
  for b, rec in enumerate(records):
    n = int(saved["lengths"][b])
    assert 1 <= n <= MAX_LEN and len(rec["sentences"]) == n
    assert all(isinstance(s, str) for s in rec["sentences"])
    assert rec["text"] == " ".join(rec["sentences"])
    assert rec["stop_reason"] in STOP_REASONS[1:] and rec["stop_reason"] == saved["stop_reasons"][b]
    assert rec["prompt_sentences"] and all(isinstance(s, str) for s in rec["prompt_sentences"])
    assert "\n".join(rec["sentences"]) in r.stdout
  assert saved["prompt_lengths"].tolist() == [len(x["prompt_sentences"]) for x in records]

  # Independent check: encode the prompt sentences, export, generate and decode directly.
  encoder = sonar.load_text_encoder(flags["encoder"], device="cpu")
  prompts = [encoder.encode(x["prompt_sentences"], "eng_Latn") for x in records]
  for b, p in enumerate(prompts):
    np.testing.assert_allclose(saved["prompt_embeddings"][b, :len(p)], p, rtol=1e-5, atol=1e-5)
  card = str(tmp_path / "card")
  export.export_checkpoint(workdirs[family], card)
  model = torch_models.load_from_card(card)
  eot = encoder.encode(["End of text."], "eng_Latn")[0]
  res = torch_generate.generate(
      model, prompts, GenerationConfig(max_len=MAX_LEN, eot_threshold=0.99,
                                        sample_latent_variable=True, temperature=0.3),
      sampler=diffusion.SamplerConfig(num_steps=4, eta=0.5), eot_vector=eot, seed=3)
  np.testing.assert_array_equal(res.lengths, saved["lengths"])
  np.testing.assert_allclose(res.embeddings, saved["embeddings"], rtol=1e-5, atol=1e-5)
  decoder = sonar.load_text_decoder(flags["decoder"], device="cpu")
  lens = res.lengths.tolist()
  texts = decoder.decode(np.concatenate([saved["embeddings"][b, :n] for b, n in enumerate(lens)]),
                         "eng_Latn", beam_size=2, max_len=12)
  assert [s for x in records for s in x["sentences"]] == texts

  # The same through --card (the export above); same batch, so the same noise draws.
  out2 = str(tmp_path / "card.jsonl")
  r = run_cli(_cmd(flags, f"--card={card}/model_card.yaml", f"--prompt={PROMPTS[0]}",
                   f"--prompt_file={pfile}", f"--out={out2}", *gen_flags))
  assert r.returncode == 0, r.stderr[-3000:]
  assert [json.loads(line) for line in open(out2)] == records


def test_bad_input(tmp_path):
  from data_prep import text_generate  # pylint: disable=g-import-not-at-top
  missing = str(tmp_path / "nope" / "model_card.yaml")
  r = run_cli([sys.executable, "-m", "data_prep.text_generate", f"--card={missing}",
               "--prompt=Hello there.", f"--out={tmp_path / 'o.jsonl'}"])
  assert r.returncode == 2
  assert r.stderr.strip().startswith("error:") and missing in r.stderr
  assert not os.path.exists(tmp_path / "o.jsonl")
  r = run_cli([sys.executable, "-m", "data_prep.text_generate", f"--card={missing}",
               "--prompt=Hello there.", f"--out={tmp_path}"])  # --out is a directory
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --out")
  assert "is a directory" in r.stderr
  with pytest.raises(text_generate.UserError, match="no prompt"):
    text_generate.read_prompts(None, None)
  with pytest.raises(text_generate.UserError, match="empty"):
    text_generate.read_prompts("   ", None)
  (tmp_path / "p.jsonl").write_text('{"id": 1}\n')
  with pytest.raises(text_generate.UserError, match="line 1: field 'text'"):
    text_generate.read_prompts(None, str(tmp_path / "p.jsonl"))
  (tmp_path / "p.txt").write_text("one\n\ntwo\n")
  assert [t for _, t in text_generate.read_prompts("zero", str(tmp_path / "p.txt"))] == [
      "zero", "one", "two"]
