"""data_prep.sat: the 250-character cap, no loss, equality with SaT's own split, the fallback order,
determinism of the tiny model, and load errors. Offline, on a tiny random SaT built once."""

from __future__ import annotations

import math
import os
import random
import time
import unicodedata

import numpy as np
import pytest

from data_prep import sat as S

SEPS = ("...", "\n", "!", "?", ";", ":", ".", ",", "\t", " ")  # the reference splitter's separators, in order


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("sat") / "tiny")
  paths = S.build_tiny_sat(root, seed=0)
  return root, paths, S.load_sat(root, device="cpu")


def _squash(s: str) -> str:
  return "".join(s.split())


def _words(rng: random.Random, n: int) -> list[str]:
  letters = "abcdefghijklmnopqrstuvwxyz"
  return ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(n)]


def _long_texts() -> dict[str, str]:
  rng = random.Random(1)
  corpus = " ".join(S._tiny_corpus(7, 25))
  no_punct = " ".join(_words(rng, 700))
  return {
      "no_punct_3000": no_punct[:3000],
      "long_words": " ".join(["a" * 600, "Supercalifragilistic" * 30, "ok.", "b" * 260 + "!"]),
      "only_spaces": " " * 1000,
      "empty": "",
      "newlines": "\n".join([corpus[:400], "", corpus[400:700], "\n\n", no_punct[:900], " \n "]),
      "crlf_tabs": "\r\n".join(["\t".join(_words(rng, 80)), " ".join(_words(rng, 90))]),
      "cjk": "".join(rng.choice("漢字仮名交じり文日本語中文") for _ in range(1200)),
      "emoji": "🙂👍🏽👨‍👩‍👧‍👦🇫🇷" * 90 + " end",
      "combining": "e\u0301" * 400 + " Ｆｕｌｌｗｉｄｔｈ ﬁne",
      "dots": "word... " * 80 + "." * 400 + " tail" + "!!!???" * 50,
      "corpus": corpus,
  }


def _check_sentences(text: str, sents: list[str], max_chars: int) -> None:
  for s in sents:
    assert s and s == s.strip(), repr(s)
    assert len(s) <= max_chars, (len(s), s[:40])
  assert _squash("".join(sents)) == _squash(text)  # nothing lost or duplicated
  pos = 0
  for s in sents:  # disjoint slices of the text, in order
    found = text.find(s, pos)
    assert found >= 0, s[:40]
    assert text[pos:found].strip() == ""
    pos = found + len(s)
  assert text[pos:].strip() == ""


@pytest.mark.parametrize("threshold,max_chars,floor", [
    (0.2, 250, 0.01), (0.01, 250, 0.0), (0.99, 250, 0.01), (0.99, 40, 1.0), (0.5, 1, 0.01)])
def test_cap_and_no_loss_on_varied_inputs(tiny, threshold, max_chars, floor):
  texts = _long_texts()
  seg = S.Segmenter(tiny[2], threshold=threshold, max_chars=max_chars, min_boundary_prob=floor,
                    text_batch_size=4)
  out = seg.segment(list(texts.values()))
  assert len(out) == len(texts)
  for (name, text), sents in zip(texts.items(), out):
    _check_sentences(text, sents, max_chars)
    if not text.strip():
      assert sents == [], name
  assert seg.stats.over_cap > 0 and seg.stats.texts == len(texts)
  assert seg.stats.sentences == sum(map(len, out))
  cuts = seg.stats.sat_cuts + seg.stats.total_separator_cuts + seg.stats.hard_cuts
  assert seg.stats.sentences == seg.stats.sat_sentences + cuts
  flat = dict(seg.stats)
  assert flat["sentences"] == seg.stats.sentences and flat["hard_cuts"] == seg.stats.hard_cuts
  per_sep = [flat[f"separator_cuts_{n}"] for n in S.SEPARATOR_NAMES.values()]
  assert flat["separator_cuts"] == sum(per_sep) == seg.stats.total_separator_cuts
  assert all(type(v) is int for v in flat.values())
  if floor >= 1.0:
    assert seg.stats.sat_cuts == 0 and seg.stats.total_separator_cuts > 0
  assert seg.stats.hard_cuts > 0  # the CJK text and long words leave nothing else
  # The cap's cuts keep accents with their letters where max_chars leaves room (SaT's own
  # split may cut there: the tiny tokenizer ends tokens before accents).
  text = texts["combining"]
  sat_cuts = set((np.flatnonzero(tiny[2].predict_proba(text, stride=64) > threshold) + 1).tolist())
  pos = 0
  for s in out[list(texts).index("combining")]:
    pos = text.find(s, pos)
    if max_chars > 1 and pos not in sat_cuts:
      assert unicodedata.category(s[0]) != "Mn", pos
    pos += len(s)


def test_equals_sat_split_when_the_cap_is_huge(tiny):
  sat = tiny[2]
  texts = [t[:1500] for t in _long_texts().values()] + [
      "Hello world. This is fine!\n\nNew para here.\r\n a\n", "  \n\t ", "x"]
  counts = []
  for t in (0.01, 0.05, 0.2, 0.5):
    ref = [[s.strip() for s in r if s.strip()] for r in sat.split(texts, threshold=t)]
    got = S.Segmenter(sat, threshold=t, max_chars=10**9).segment(texts)
    assert got == ref
    counts.append(sum(map(len, got)))
  assert counts == sorted(counts, reverse=True) and len(set(counts)) == 4  # thresholds matter
  capped = S.Segmenter(sat, threshold=0.5).segment(texts)
  assert capped != got


def test_one_sat_call_per_batch(tiny):
  class Counting:
    def __init__(self, sat):
      self.sat, self.calls = sat, []

    def predict_proba(self, texts, **kw):
      self.calls.append(list(texts))
      return self.sat.predict_proba(texts, **kw)

  wrapped = Counting(tiny[2])
  texts = ["One. Two three.", "   ", "Four five six.", "Seven!", "", "Eight nine."]
  out = S.Segmenter(wrapped, text_batch_size=2).segment(texts)
  assert wrapped.calls == [["One. Two three."], ["Four five six.", "Seven!"], ["Eight nine."]]
  assert out[1] == [] and out[4] == [] and all(out[i] for i in (0, 2, 3, 5))
  with pytest.raises(TypeError):
    S.Segmenter(wrapped).segment("not a list")


def test_cap_cuts_at_the_most_probable_sat_boundary(tiny):
  sat = tiny[2]
  text = " ".join(S._tiny_corpus(11, 40))[:700].strip()
  probs = np.asarray(sat.predict_proba(text, stride=S.SPLIT_STRIDE))
  assert probs.max() < 0.99
  n = len(text)
  # One cut is enough with max_chars = n - 1: after the most probable character in [0, n - 2],
  # ties broken towards the middle (target n / 2, as k = 2), then towards the start.
  cands = [j + 1 for j in range(n - 1) if probs[j] > 0.01]
  best = max(probs[c - 1] for c in cands)
  cut = min((c for c in cands if probs[c - 1] == best), key=lambda c: abs(c - n / 2))
  seg = S.Segmenter(sat, threshold=0.99, max_chars=n - 1)
  assert seg.segment([text]) == [[text[:cut].strip(), text[cut:].strip()]]
  assert seg.stats.sat_cuts == 1 and seg.stats.hard_cuts == 0
  # Every cut of a finer cap lands on a usable SaT boundary (there are plenty in this text).
  seg = S.Segmenter(sat, threshold=0.99, max_chars=60)
  sents = seg.segment([text])[0]
  _check_sentences(text, sents, 60)
  pos = 0
  for s in sents[:-1]:
    end = text.find(s, pos) + len(s)
    assert probs[end - 1] > 0.01
    pos = end
  assert seg.stats.sat_cuts == len(sents) - 1


# An independent reference of the fallback (SaT boundaries disabled): separators in spec order,
# after the whole run of the separator's last character, nearest to len * (k // 2) / k with
# k = ceil(len / max); else a hard cut at max_chars, moved back before combining marks and joiners.

def _glued(text: str, c: int) -> bool:
  return (unicodedata.category(text[c])[0] == "M" or text[c] in "\u200d\ufe0e\ufe0f"
          or text[c - 1] == "\u200d")


def _ref_cut(text: str, m: int) -> tuple[int, str]:
  n = len(text)
  k = math.ceil(n / m)
  target = n * (k // 2) / k
  for sep in SEPS:
    cands = [c for c in range(1, n)
             if text[:c].endswith(sep) and text[c] != sep[-1] and not _glued(text, c)]
    if cands:
      return min(cands, key=lambda c: abs(c - target)), sep
  c = m
  while c > 1 and _glued(text, c):
    c -= 1
  return c, "hard"


def _ref_cap(text: str, m: int) -> list[str]:
  text = text.strip()
  if not text:
    return []
  if len(text) <= m:
    return [text]
  c, _ = _ref_cut(text, m)
  return _ref_cap(text[:c], m) + _ref_cap(text[c:], m)


def _separator_text(rng: random.Random, level: int, n: int = 300) -> str:
  """About n chars of words with separators of priority >= level (level's at least once)."""
  words = _words(rng, n)
  pieces, length = [], 0
  for w in words:
    pieces.append(w)
    length += len(w) + 1
    if length > n:
      break
  out = pieces[0]
  for w in pieces[1:]:
    sep = SEPS[rng.randint(level, len(SEPS) - 1)] if rng.random() < 0.3 else " "
    out += (sep + " " if sep not in ("\n", "\t", " ") else sep) + w
  k = rng.randint(1, len(pieces) - 2)
  i = out.find(pieces[k], len(pieces[0]))
  return out[:i] + SEPS[level] + " " + out[i:]


@pytest.mark.parametrize("level", range(len(SEPS)))
def test_separator_fallback_order(tiny, level):
  rng = random.Random(100 + level)
  seg = S.Segmenter(tiny[2], threshold=1.0, min_boundary_prob=1.0, split_on_newlines=False,
                    max_chars=250)
  texts = [_separator_text(rng, level) for _ in range(4)]
  out = seg.segment(texts)
  for text, sents in zip(texts, out):
    t = text.strip()
    # Exactly one cut when max_chars = len - 1: it must be the reference's.
    one = S.Segmenter(tiny[2], threshold=1.0, min_boundary_prob=1.0, split_on_newlines=False,
                      max_chars=len(t) - 1)
    c, sep = _ref_cut(t, len(t) - 1)
    assert sep == SEPS[level]
    assert one.segment([text]) == [[t[:c].strip(), t[c:].strip()]]
    assert one.stats.total_separator_cuts == 1
    assert one.stats.separator_cuts[S.SEPARATOR_NAMES[sep]] == 1
    # The full cap agrees with the reference.
    assert sents == _ref_cap(text, 250)
    _check_sentences(text, sents, 250)
  assert seg.stats.sat_cuts == 0


def test_hard_cut_when_nothing_else_applies(tiny):
  seg = S.Segmenter(tiny[2], threshold=1.0, min_boundary_prob=1.0, max_chars=250)
  text = "abc" * 100 + "d"
  assert seg.segment([text]) == [[text[:250], text[250:]]]
  text2 = "x" + "e\u0301" * 200  # a cut at 250 would separate an accent from its letter
  assert seg.segment([text2]) == [[text2[:249], text2[249:]]]
  assert _ref_cap(text2, 250) == [text2[:249], text2[249:]]
  text3 = "漢字" * 400 + "。"
  got = seg.segment([text3])[0]
  assert got == _ref_cap(text3, 250) and [len(s) for s in got] == [250, 250, 250, 51]
  assert seg.stats.hard_cuts == 1 + 1 + 3 and seg.stats.total_separator_cuts == 0


def test_random_fallback_texts_match_the_reference(tiny):
  rng = random.Random(5)
  alphabet = "ab c.,;:!?\t\n漢é" + "\u0301"
  texts = ["".join(rng.choice(alphabet) if rng.random() < 0.3 else rng.choice("xyz")
                   for _ in range(rng.randint(200, 1500))) for _ in range(30)]
  seg = S.Segmenter(tiny[2], threshold=1.0, min_boundary_prob=1.0, split_on_newlines=False,
                    max_chars=37)
  for text, sents in zip(texts, seg.segment(texts)):
    assert sents == _ref_cap(text, 37)
    _check_sentences(text, sents, 37)


def test_tiny_model_is_deterministic_and_small(tiny, tmp_path):
  root, paths, sat = tiny
  again = S.build_tiny_sat(str(tmp_path / "again"), seed=0)
  other = S.build_tiny_sat(str(tmp_path / "other"), seed=1)

  def files(d):
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(d) for f in fs}

  a, b, c = files(root), files(str(tmp_path / "again")), files(str(tmp_path / "other"))
  assert set(a) >= {"model/config.json", "model/model.safetensors", "tokenizer/tokenizer.json"}
  assert a == b
  assert a["model/model.safetensors"] != c["model/model.safetensors"]
  assert sum(map(len, a.values())) < 5 * 2**20
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
  assert again == {"model": str(tmp_path / "again" / "model"),
                   "tokenizer": str(tmp_path / "again" / "tokenizer")}
  with pytest.raises(ValueError, match="not empty"):
    S.build_tiny_sat(str(tmp_path / "again"), seed=0)
  # XLM-R's special tokens, and probabilities with spread.
  tok = sat.tokenizer
  assert [tok.convert_ids_to_tokens(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
  assert tok.mask_token == "<mask>" and tok.mask_token_id == len(tok) - 1
  texts = list(_long_texts().values())
  seg = S.Segmenter(sat)
  first = seg.segment(texts)
  assert seg.segment(texts) == first
  assert S.Segmenter(S.load_sat(again["model"], device="cpu")).segment(texts) == first


def test_load_sat_resolution_and_errors(tiny, tmp_path, monkeypatch):
  root, paths, _ = tiny
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  import huggingface_hub
  import transformers.utils.hub as tf_hub
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
  monkeypatch.setattr(tf_hub, "_is_offline_mode", True, raising=False)
  monkeypatch.setattr(tf_hub, "TRANSFORMERS_CACHE", str(tmp_path / "empty_cache"), raising=False)

  assert S.resolve_sat_paths(root) == (paths["model"], paths["tokenizer"], True)
  assert S.resolve_sat_paths(paths["model"]) == (paths["model"], paths["tokenizer"], True)
  assert S.resolve_sat_paths(paths["model"], "tok") == (paths["model"], "tok", True)
  assert S.resolve_sat_paths("sat-3l") == ("sat-3l", None, False)
  sat = S.load_sat(paths["model"], device="cpu")
  assert sat.model.model.config.num_hidden_layers == 2

  def fails(*args, **kwargs):
    t0 = time.time()
    with pytest.raises(S.SegmenterLoadError) as e:
      S.load_sat(*args, **kwargs)
    assert time.time() - t0 < 10  # no hub retries
    msg = str(e.value)
    for how in ("--sat_model", "--sat_tokenizer", "data_prep.tiny_models", "HF_HOME"):
      assert how in msg
    return msg

  assert str(tmp_path / "missing") in fails(str(tmp_path / "missing"))
  msg = fails("sat-3l")
  assert "segment-any-text/sat-3l" in msg and "xlm-roberta-base" in msg
  assert "segment-any-text/sat-3l" in fails("segment-any-text/sat-3l", tokenizer=paths["tokenizer"])
  # A model directory without a tokenizer next to it gets SaT's default tokenizer: offline, fails.
  lone = tmp_path / "lone" / "m"
  lone.mkdir(parents=True)
  for f in os.listdir(paths["model"]):
    (lone / f).write_bytes(open(os.path.join(paths["model"], f), "rb").read())
  assert "xlm-roberta-base" in fails(str(lone))
  assert S.load_sat(str(lone), tokenizer=paths["tokenizer"], device="cpu") is not None
  # Broken files.
  (lone / "config.json").write_text("{not json")
  assert str(lone) in fails(str(lone), tokenizer=paths["tokenizer"])
