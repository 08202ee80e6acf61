"""SaT sentence segmentation with a character cap ("SaT capped"), and a tiny random SaT model.

A concept is one sentence, so every document is cut into sentences by
wtpsplit's SaT model before SONAR encodes them. SONAR round trips degrade past ~250 characters,
so no output sentence may be longer than ``max_chars`` (default 250): ``len(s) <= max_chars``
holds for every sentence :meth:`Segmenter.segment` returns.

Loading (:func:`load_sat`)
  ``model`` is a hub name (``sat-3l``, resolved under ``segment-any-text/``; or ``org/name``) or a
  local directory. A local directory is either a model directory (``config.json`` + weights) or
  the root written by :func:`build_tiny_sat` (holding ``model/`` and ``tokenizer/``). With
  ``tokenizer=None`` the tokenizer is, in order: the model directory itself if it holds
  tokenizer files, a ``tokenizer`` directory next to it, else SaT's default
  (``facebookAI/xlm-roberta-base`` from the hub cache). Every failure (no cached model offline, a
  missing directory, broken files, wtpsplit not installed) raises :class:`SegmenterLoadError`,
  whose message names what was tried and how to provide a segmenter. There is no fallback to any
  other splitter. The model runs on the GPU when one is available, unless ``device`` says
  otherwise; weights stay float32.

Segmentation (:class:`Segmenter`), per text
  1. SaT probabilities: ``sat.predict_proba`` once per batch of ``text_batch_size`` texts (one
     call, SaT batches the 512-token blocks itself), with ``sat.split``'s stride/block size so the
     probabilities are the ones ``split`` would use. Texts with no non-whitespace character give
     ``[]`` and are not sent to the model.
  2. SaT split, exactly as ``sat.split(texts, threshold=t)`` with its defaults: cut after every
     character whose boundary probability is ``> threshold``, and (``split_on_newlines``, as
     ``split``'s ``split_on_input_newlines``) at every ``"\\n"``. Pieces are whitespace-stripped and
     empty pieces dropped. With a huge ``max_chars`` the output equals ``sat.split``'s after that
     normalisation.
  3. The cap: a sentence longer than ``max_chars`` is cut in two, and each half again while it is
     too long (an explicit stack, no recursion limit). Where to cut, first rule that applies:
     a. SaT: the character with the highest boundary probability inside the sentence (cut after
        it), among those with probability ``> min_boundary_prob`` (default 0.01) and not
        followed by a combining mark, variation selector or zero-width joiner (nor preceded by
        a joiner: no rule cuts there except, unavoidably, a hard cut). The floor keeps
        cuts at token ends a trained model thinks are not boundaries at all (e.g. inside a word)
        out of play; below it the separators are the better guess. Every such candidate is below
        ``threshold`` (else step 2 had cut there); ``min_boundary_prob >= threshold`` disables
        this rule.
     b. Separators, in this order: ``...``, newline, ``!``, ``?``, ``;``, ``:``, ``.``, ``,``,
        tab, space: the first one that occurs inside the sentence with text after it (and no
        combining mark or joiner right after it). The cut goes
        after the whole run of the separator's last character (``"a.....b"`` cuts before ``b``,
        ``"a!!! b"`` after the third ``!``).
     c. Hard cuts every ``max_chars`` characters from the left (each moved back over combining
        marks, variation selectors and zero-width joiners, so a grapheme is not torn apart where
        avoidable).
     Between equally good candidates (equal probability, or several occurrences of the same
     separator) the one nearest to ``len * (k // 2) / k`` characters from the start wins, where
     ``k = ceil(len / max_chars)`` is the least number of pieces (ties: the earlier one). So a
     too-long sentence tends to become ``k`` pieces of similar length rather than full pieces
     and a crumb, and the cuts form a balanced tree (O(n log n) work on an n-character sentence).
  Nothing is lost or duplicated: the output sentences are disjoint slices of the text that cover
  it up to whitespace, so ``"".join("".join(out).split()) == "".join(text.split())``.

Statistics (:class:`SegmentStats`, ``Segmenter.stats``) add up over calls: texts, SaT sentences,
how many were over the cap, the cuts made by each rule (per separator too) and the sentences
returned, for a job summary (``dict(stats)`` gives flat integer counters).

:func:`build_tiny_sat` writes a tiny RANDOM-weight SaT (a 2-layer
``SubwordXLMForTokenClassification`` and an XLM-R-style tokenizer from a sentencepiece model
trained on the spot on generated English-like text) for tests and offline runs; it loads with
``load_sat(dir)``. Its boundary probabilities are meaningless but spread out (the classifier is
calibrated on the corpus: median ~4% at token ends, about 12% of them above 0.2 and 2% above
0.5), so thresholds between 0.01 and 0.5 give different splits.

This module is PyTorch-side (data_prep); torch, transformers, sentencepiece and wtpsplit are
imported inside the functions that need them, so importing it is cheap and runs nothing.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import io
import math
import os
import random
import shutil
import tempfile
import unicodedata
from typing import Any, Iterator, Sequence

import numpy as np

from lcm_jax import normalizer as normalizer_lib
from lcm_jax import schema
from lcm_jax.errors import UserError

DEFAULT_MODEL = "sat-3l"
HUB_PREFIX = "segment-any-text"
# The reference's Wikipedia recipe; wtpsplit's own default for sat-3l is 0.025.
DEFAULT_THRESHOLD = 0.2
DEFAULT_MAX_CHARS = 250
DEFAULT_MIN_BOUNDARY_PROB = 0.01
SEPARATORS = ("...", "\n", "!", "?", ";", ":", ".", ",", "\t", " ")
SEPARATOR_NAMES = {"...": "ellipsis", "\n": "newline", "!": "exclamation", "?": "question",
                   ";": "semicolon", ":": "colon", ".": "period", ",": "comma", "\t": "tab",
                   " ": "space"}
# sat.split's defaults (predict_proba's differ: stride 256), so the probabilities are split's.
SPLIT_STRIDE = 64
SPLIT_BLOCK_SIZE = 512
_TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model", "tokenizer_config.json")
_JOINERS = {"\u200d", "\ufe0e", "\ufe0f"}  # zero-width joiner, text/emoji variation selectors

HOW_TO_PROVIDE = (
    "Provide a SaT segmenter in one of these ways:\n"
    "  * a local directory: --sat_model=DIR (config.json + weights of a SaT model) and,\n"
    "    unless DIR or a 'tokenizer' directory next to it holds the tokenizer,\n"
    "    --sat_tokenizer=TOKDIR;\n"
    "  * for tests and offline runs, a tiny random one: python -m data_prep.tiny_models --out=DIR\n"
    "    (or data_prep.sat.build_tiny_sat(DIR)), then --sat_model pointing at it;\n"
    "  * download the real model (e.g. segment-any-text/sat-3l and facebookAI/xlm-roberta-base)\n"
    "    on a machine with hub access and point HF_HOME at that cache here (HF_HUB_OFFLINE=1\n"
    "    then loads it without network).")


class SegmenterLoadError(UserError, RuntimeError):
  """The SaT model or tokenizer could not be loaded; the message says what was tried and how to
  provide a segmenter. A user error (the flags name the model); still a RuntimeError for callers
  that caught it as one."""


# ---------------------------------------------------------------------------------------------
# Loading

def _looks_like_path(name: str) -> bool:
  """True for names that can only be a local path (a hub id is ``name`` or ``org/name``)."""
  return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _has_tokenizer_files(path: str) -> bool:
  return any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)


def resolve_sat_paths(model: str, tokenizer: str | None = None) -> tuple[str, str | None, bool]:
  """Returns ``(model_to_load, tokenizer_to_load, is_local)`` for :func:`load_sat`.

  ``tokenizer_to_load`` is None where SaT's default applies. Raises :class:`SegmenterLoadError`
  for a path that does not exist (without asking the hub about it).
  """
  model = os.fspath(model)
  expanded = os.path.expanduser(model)
  if os.path.isdir(expanded):
    model_dir = os.path.abspath(expanded)
    if (not os.path.isfile(os.path.join(model_dir, "config.json"))
        and os.path.isfile(os.path.join(model_dir, "model", "config.json"))):
      model_dir = os.path.join(model_dir, "model")  # the root written by build_tiny_sat
    if tokenizer is None:
      sibling = os.path.join(os.path.dirname(model_dir), "tokenizer")
      if _has_tokenizer_files(model_dir):
        tokenizer = model_dir
      elif os.path.isdir(sibling):
        tokenizer = sibling
    return model_dir, tokenizer, True
  if _looks_like_path(model) or os.path.exists(expanded):
    raise SegmenterLoadError(
        f"SaT model directory {model!r} does not exist (or is not a directory).\n{HOW_TO_PROVIDE}")
  return model, tokenizer, False


def load_sat(model: str = DEFAULT_MODEL, tokenizer: str | None = None,
             device: str | None = None) -> Any:
  """Loads a wtpsplit ``SaT`` model (see the module docstring for how names are resolved).

  Args:
    model: hub name (``sat-3l``, ``segment-any-text/sat-3l``) or local directory.
    tokenizer: hub name or local directory; None = the model directory's own tokenizer files, a
      ``tokenizer`` directory next to it, else SaT's default (``facebookAI/xlm-roberta-base``).
    device: torch device; None = ``cuda`` when available, else ``cpu``.

  Raises:
    SegmenterLoadError: on any failure, naming the model and tokenizer tried and how to provide a
      segmenter. Never falls back to another splitter.
  """
  model_name, tok_name, is_local = resolve_sat_paths(model, tokenizer)
  if is_local:
    fetched = model_name
  else:
    fetched = model_name if "/" in model_name else f"{HUB_PREFIX}/{model_name}"
  tok_desc = tok_name if tok_name is not None else "facebookAI/xlm-roberta-base (SaT's default)"
  tried = f"model {fetched!r}, tokenizer {tok_desc!r}"
  try:
    import torch
    from wtpsplit import SaT
  except ImportError as e:
    raise SegmenterLoadError(
        f"Could not load SaT ({tried}): {type(e).__name__}: {e}. The PyTorch-side tools need the "
        f"data extra (torch, wtpsplit).\n{HOW_TO_PROVIDE}") from e
  kwargs: dict[str, Any] = {"hub_prefix": None}
  if tok_name is not None:
    kwargs["tokenizer_name_or_path"] = tok_name
  try:
    sat = SaT(fetched, **kwargs)
    if device is None:
      device = "cuda" if torch.cuda.is_available() else "cpu"
    sat.model.model.to(device)
    sat.model.model.eval()
  except Exception as e:  # noqa: BLE001 - every failure is reported the same way.
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    note = " (HF_HUB_OFFLINE is set: only the local hub cache was searched)" if offline else ""
    raise SegmenterLoadError(
        f"Could not load SaT ({tried}){note}: {type(e).__name__}: {e}\n{HOW_TO_PROVIDE}") from e
  return sat


# ---------------------------------------------------------------------------------------------
# Segmentation

@dataclasses.dataclass
class SegmentStats(collections.abc.Mapping):
  """Counters over every :meth:`Segmenter.segment` call (see the module docstring).

  Also a read-only mapping of flat integer counters (:meth:`as_dict`: the fields, the total
  ``separator_cuts`` and ``separator_cuts_<name>`` per separator), so ``dict(stats)`` and
  differences between two snapshots work for a job summary.
  """

  texts: int = 0  # texts seen (blank ones included)
  sat_sentences: int = 0  # sentences after the SaT split, before the cap
  over_cap: int = 0  # of those, the ones longer than max_chars (re-split)
  sentences: int = 0  # sentences returned
  sat_cuts: int = 0  # cuts made at SaT boundaries by the cap
  hard_cuts: int = 0  # cuts at max_chars
  separator_cuts: dict[str, int] = dataclasses.field(  # per separator name (SEPARATOR_NAMES)
      default_factory=lambda: dict.fromkeys(SEPARATOR_NAMES.values(), 0))

  @property
  def total_separator_cuts(self) -> int:
    return sum(self.separator_cuts.values())

  def as_dict(self) -> dict[str, int]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
         if f.name != "separator_cuts"}
    d["separator_cuts"] = self.total_separator_cuts
    d.update((f"separator_cuts_{name}", n) for name, n in self.separator_cuts.items())
    return d

  def __getitem__(self, key: str) -> int:
    return self.as_dict()[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self.as_dict())

  def __len__(self) -> int:
    return len(self.as_dict())


class Segmenter:
  """SaT sentence splitting with a hard character cap (see the module docstring).

  Args:
    sat: a loaded wtpsplit ``SaT`` (:func:`load_sat`).
    threshold: SaT boundary probability above which a sentence ends (the reference's recipe: 0.2 for sat-3l).
    max_chars: every output sentence has at most this many characters.
    min_boundary_prob: the cap uses SaT boundaries only above this probability, else separators.
    text_batch_size: texts per SaT call.
    batch_size: 512-token blocks per model forward pass (SaT's ``batch_size``).
    stride, block_size: SaT's sliding window (``sat.split``'s defaults).
    split_on_newlines: also cut at every input newline, as ``sat.split`` does by default.
  """

  def __init__(self, sat: Any, threshold: float = DEFAULT_THRESHOLD,
               max_chars: int = DEFAULT_MAX_CHARS,
               min_boundary_prob: float = DEFAULT_MIN_BOUNDARY_PROB, text_batch_size: int = 256,
               batch_size: int = 32, stride: int = SPLIT_STRIDE,
               block_size: int = SPLIT_BLOCK_SIZE, split_on_newlines: bool = True):
    if not 0.0 <= threshold <= 1.0:
      raise UserError(f"threshold must be in [0, 1], got {threshold}")
    if max_chars < 1:
      raise UserError(f"max_chars must be >= 1, got {max_chars}")
    if not 0.0 <= min_boundary_prob <= 1.0:
      raise UserError(f"min_boundary_prob must be in [0, 1], got {min_boundary_prob}")
    for name, v in (("text_batch_size", text_batch_size), ("batch_size", batch_size),
                    ("stride", stride), ("block_size", block_size)):
      if v < 1:
        raise UserError(f"{name} must be >= 1, got {v}")
    self.sat = sat
    self.threshold = float(threshold)
    self.max_chars = int(max_chars)
    self.min_boundary_prob = float(min_boundary_prob)
    self.text_batch_size = int(text_batch_size)
    self.batch_size = int(batch_size)
    self.stride = int(stride)
    self.block_size = int(block_size)
    self.split_on_newlines = bool(split_on_newlines)
    self.stats = SegmentStats()

  def probabilities(self, texts: Sequence[str]) -> Iterator[np.ndarray]:
    """SaT's per-character boundary probabilities, one array of ``len(text)`` per text, from one
    ``predict_proba`` call (texts must contain non-whitespace)."""
    return self.sat.predict_proba(
        list(texts), stride=self.stride, block_size=self.block_size, batch_size=self.batch_size,
        outer_batch_size=max(1, len(texts)))

  def segment(self, texts: Sequence[str]) -> list[list[str]]:
    """Returns one list of sentences per text (see the module docstring)."""
    if isinstance(texts, str):
      raise TypeError("segment() takes a sequence of texts, not one string (wrap it in a list)")
    texts = list(texts)
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise TypeError(f"texts[{i}] is a {type(t).__name__}, not a str")
    out: list[list[str]] = [[] for _ in texts]
    for start in range(0, len(texts), self.text_batch_size):
      idx = [i for i in range(start, min(start + self.text_batch_size, len(texts)))
             if texts[i].strip()]
      if idx:
        probs_iter = self.probabilities([texts[i] for i in idx])
        for i, probs in zip(idx, probs_iter):
          out[i] = self._segment_one(texts[i], np.asarray(probs))
    self.stats.texts += len(texts)
    self.stats.sentences += sum(len(s) for s in out)
    return out

  # Internals: spans are [start, end) character ranges of the text, stripped of whitespace.

  def _segment_one(self, text: str, probs: np.ndarray) -> list[str]:
    if probs.shape != (len(text),):
      raise ValueError(f"SaT returned {probs.shape} probabilities for a text of {len(text)} chars")
    sentences = []
    for s, e in self._sat_spans(text, probs):
      self.stats.sat_sentences += 1
      if e - s <= self.max_chars:
        sentences.append(text[s:e])
      else:
        self.stats.over_cap += 1
        sentences.extend(text[a:b] for a, b in self._cap(text, probs, s, e))
    return sentences

  def _sat_spans(self, text: str, probs: np.ndarray) -> list[tuple[int, int]]:
    cuts = set((np.flatnonzero(probs > self.threshold) + 1).tolist())
    if self.split_on_newlines:
      i = text.find("\n")
      while i != -1:
        cuts.update((i, i + 1))
        i = text.find("\n", i + 1)
    bounds = [0] + sorted(c for c in cuts if 0 < c < len(text)) + [len(text)]
    spans = []
    for a, b in zip(bounds[:-1], bounds[1:]):
      span = _strip(text, a, b)
      if span is not None:
        spans.append(span)
    return spans

  def _cap(self, text: str, probs: np.ndarray, s: int, e: int) -> list[tuple[int, int]]:
    done: list[tuple[int, int]] = []
    glued = np.fromiter((_tears_grapheme(text, c) for c in range(s, e)), bool, e - s)
    stack = [(s, e)]
    while stack:  # Left pieces first: ``done`` stays in text order.
      a, b = stack.pop()
      if b - a <= self.max_chars:
        done.append((a, b))
        continue
      c = self._cut(text, probs, glued[a - s:b - s], a, b)
      if c is None:
        done.extend(self._hard_cuts(text, a, b))
        continue
      left, right = _strip(text, a, c), _strip(text, c, b)
      assert left is not None and right is not None, (a, c, b)
      stack.append(right)
      stack.append(left)
    return done

  def _cut(self, text: str, probs: np.ndarray, glued: np.ndarray, s: int, e: int) -> int | None:
    """Where to cut the stripped span [s, e) longer than max_chars by rule a or b (None: neither
    applies). s < cut < e, so both sides keep a non-whitespace character (text[s] and
    text[e - 1] are not whitespace); ``glued[c - s]`` marks cuts that would tear a grapheme."""
    k = math.ceil((e - s) / self.max_chars)
    target = s + (e - s) * (k // 2) / k
    # a. SaT: cutting after character j means cut = j + 1, with j in [s, e - 2].
    inner = probs[s:e - 1]
    usable = (inner > self.min_boundary_prob) & ~glued[1:]
    if usable.any():
      best = inner[usable].max()
      cuts = np.flatnonzero(usable & (inner == best)) + s + 1
      self.stats.sat_cuts += 1
      return int(cuts[np.argmin(np.abs(cuts - target))])
    # b. Separators in spec order; the cut goes after the run of the separator's last character.
    for sep in SEPARATORS:
      cuts = [c for c in _separator_cuts(text, sep, s, e) if not glued[c - s]]
      if cuts:
        self.stats.separator_cuts[SEPARATOR_NAMES[sep]] += 1
        return min(cuts, key=lambda c: abs(c - target))
    return None

  def _hard_cuts(self, text: str, s: int, e: int) -> list[tuple[int, int]]:
    """c. Pieces of max_chars from the left, each cut moved back so that a combining mark or
    joiner stays with what it modifies. Neither rule a nor b applies inside a span where they do
    not apply to the whole, so the span is chunked in one go."""
    pieces = []
    while e - s > self.max_chars:
      c = s + self.max_chars
      while c - 1 > s and _tears_grapheme(text, c):
        c -= 1
      self.stats.hard_cuts += 1
      left, right = _strip(text, s, c), _strip(text, c, e)
      assert left is not None and right is not None, (s, c, e)
      pieces.append(left)
      s, e = right
    pieces.append((s, e))
    return pieces


def _strip(text: str, a: int, b: int) -> tuple[int, int] | None:
  """[a, b) without leading/trailing whitespace; None if nothing is left."""
  while a < b and text[a].isspace():
    a += 1
  while b > a and text[b - 1].isspace():
    b -= 1
  return (a, b) if a < b else None


def _separator_cuts(text: str, sep: str, s: int, e: int) -> list[int]:
  """Cut positions c with s < c < e right after an occurrence of ``sep`` inside [s, e) and after
  the whole run of ``sep[-1]`` that ends it."""
  cuts = []
  i = text.find(sep, s, e)
  while i != -1:
    c = i + len(sep)
    while c < e and text[c] == sep[-1]:
      c += 1
    if c < e:
      cuts.append(c)
    i = text.find(sep, c, e)
  return cuts


def _tears_grapheme(text: str, c: int) -> bool:
  """True if a cut before text[c] separates a combining mark, variation selector or zero-width
  joiner from what it attaches to (a cheap approximation of grapheme cluster boundaries)."""
  return 0 < c < len(text) and (text[c] in _JOINERS or text[c - 1] == "\u200d"
                                or unicodedata.category(text[c]) in ("Mn", "Mc", "Me"))


# ---------------------------------------------------------------------------------------------
# A tiny random SaT model

_COMMON_WORDS = (
    "the of and to in is was for on that with as by it at from his her an were are which this be "
    "or has had not first one their its new after who they have two been also but all other she "
    "more into time during most some over only year years city world people state made between "
    "under school known until where while part then high such war second later many these since "
    "would three could there both through about century family river team life work early began "
    "north south east west small large long old great house music film book game season village "
    "church water land name number group system public national company government held found "
    "used called became several own area around against however because each before when "
    "what").split()
_ONSETS = ("b c d f g h j k l m n p r s t v w y z br ch cl cr dr fl gr pl pr sh sl st str th tr "
           "wh").split()
_NUCLEI = "a e i o u ai ea ee ie oa oo ou ay".split()
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "ck", "rt", "sh", "th")
_ENDINGS = (".", ".", ".", ".", "!", "?", "...", ";")
_TINY_LOGIT_MEAN, _TINY_LOGIT_STD = -3.2, 2.0


def _tiny_corpus(seed: int, num_sentences: int = 3000) -> list[str]:
  """Generated English-like sentences: common English words mixed with pronounceable made-up words,
  capitalised names, numbers, commas, colons, parentheses and various sentence ends."""
  rng = random.Random(seed)
  made_up = ["".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
                     for _ in range(rng.randint(1, 3))) for _ in range(2500)]
  lines = []
  for _ in range(num_sentences):
    words = []
    for _ in range(rng.randint(3, 22)):
      r = rng.random()
      if r < 0.5:
        w = rng.choice(_COMMON_WORDS)
      elif r < 0.9:
        w = rng.choice(made_up)
      elif r < 0.96:
        w = rng.choice(made_up).capitalize()
      else:
        w = str(rng.randint(0, 2100))
      if words and rng.random() < 0.08:
        w += rng.choice((",", ",", ",", ":", ")"))
      words.append(w)
    words[0] = words[0].capitalize()
    if rng.random() < 0.05:
      words[rng.randrange(len(words))] = "(" + rng.choice(made_up)
    lines.append(" ".join(words) + rng.choice(_ENDINGS))
  return lines


def build_tiny_sat(out_dir: str, seed: int = 0, overwrite: bool = False) -> dict[str, str]:
  """Writes a tiny random-weight SaT model and its tokenizer; returns ``{"model", "tokenizer"}``.

  Layout: ``out_dir/model/`` (``config.json`` + ``model.safetensors`` of a 2-layer, hidden-32
  ``SubwordXLMForTokenClassification``, lookahead 48, one label) and ``out_dir/tokenizer/``
  (``XLMRobertaTokenizerFast`` with XLM-R's special tokens ``<s> <pad> </s> <unk> <mask>``, from a
  1000-piece unigram sentencepiece model trained here on :func:`_tiny_corpus`). Loads with
  ``load_sat(out_dir)`` or ``SaT(model_dir, tokenizer_name_or_path=tok_dir, hub_prefix=None)``.
  Byte-identical for a given ``seed`` (it drives the corpus and the weights; sentencepiece trains
  single-threaded); about 1 MB; a couple of seconds. Written into a temporary sibling directory
  renamed into place at the end, so a failure leaves nothing behind.

  Raises:
    lcm_jax.errors.UserError: if ``out_dir`` exists, is not empty and ``overwrite`` is False.
  """
  import sentencepiece as spm
  import torch
  from transformers import XLMRobertaTokenizerFast
  from wtpsplit.configs import SubwordXLMConfig
  from wtpsplit.models import SubwordXLMForTokenClassification

  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)) \
      and not overwrite:
    raise UserError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp: str | None = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out_dir)}-", dir=parent)
  try:
    corpus = _tiny_corpus(seed)
    sp_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=sp_bytes, vocab_size=1000,
        model_type="unigram", character_coverage=1.0, num_threads=1, minloglevel=2)
    sp_path = os.path.join(tmp, "sentencepiece.bpe.model")
    with open(sp_path, "wb") as f:
      f.write(sp_bytes.getvalue())
    tok = XLMRobertaTokenizerFast(vocab_file=sp_path)
    tok.save_pretrained(os.path.join(tmp, "tokenizer"))
    os.remove(sp_path)

    config = SubwordXLMConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=514, type_vocab_size=1,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, num_labels=1, lookahead=48, lookahead_split_layers=1,
        architectures=["SubwordXLMForTokenClassification"])
    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(seed)
      model = SubwordXLMForTokenClassification(config)
    model.eval()
    with torch.no_grad():
      # Calibrate the classifier on the corpus: boundary logits with mean -3.2 and spread 2 in
      # one block. SaT averages overlapping blocks, and on other generated text this gives a
      # median probability of ~4% at token ends, ~80% of them above 0.01, ~12% above 0.2 and
      # ~2% above 0.5.
      ids = tok(" ".join(corpus[:300]), truncation=True, max_length=512,
                return_tensors="pt")["input_ids"]
      hidden = model.roberta(ids, attention_mask=torch.ones_like(ids))[0][0, 1:-1]
      wh = (hidden @ model.classifier.weight[0]).double()
      # Rounded, so that last-bit differences of the forward pass (thread counts) cannot change
      # the saved bytes.
      scale = float(f"{float(_TINY_LOGIT_STD / wh.std()):.3g}")
      model.classifier.weight.mul_(scale)
      model.classifier.bias.fill_(round(_TINY_LOGIT_MEAN - float(wh.mean()) * scale, 3))
    model.save_pretrained(os.path.join(tmp, "model"))
    normalizer_lib.apply_umask_permissions(tmp)
    schema.move_dir_into_place(tmp, out_dir)
    tmp = None
  finally:
    if tmp is not None and os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return {"model": os.path.join(out_dir, "model"), "tokenizer": os.path.join(out_dir, "tokenizer")}

