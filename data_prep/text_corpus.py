"""Deterministic English-like text for tests, demos and benchmarks (no downloads).

``documents(num_docs, seed)`` returns documents of 1-12 sentences built from a small vocabulary;
about 1 sentence in 12 is long (300-700 characters, a run-on list) so that the 250-character cap
has work to do. ``training_text(seed)`` is one long text (sentences joined by spaces and newlines)
for training tiny sentencepiece tokenizers. Same arguments, same strings.
"""

from __future__ import annotations

import numpy as np

_SUBJECTS = ("the committee", "a young engineer", "my grandmother", "the old river", "our team",
             "the city council", "a small bird", "the new library", "every student", "the storm",
             "this experiment", "the museum", "a quiet neighbour", "the orchestra", "the market")
_VERBS = ("announced", "discovered", "remembered", "crossed", "built", "painted", "measured",
          "ignored", "celebrated", "questioned", "described", "repaired", "visited", "followed")
_OBJECTS = ("a bridge of stone", "the morning train", "an unexpected result", "the northern hills",
            "three wooden boxes", "a letter from Paris", "the quarterly report", "a silver key",
            "the hidden garden", "forty green lanterns", "a map of the coast", "the final chapter")
_TAILS = ("before dawn", "after the long winter", "with great care", "in nineteen ninety-two",
          "without a word", "near the station", "for the first time", "despite the rain",
          "during the festival", "at the end of the day", "", "", "")
_ENDS = (".", ".", ".", "!", "?", ".", "...")
_WORDS = tuple(sorted({w for group in (_SUBJECTS, _VERBS, _OBJECTS, _TAILS) for p in group
                       for w in p.split()}))


def sentence(rng: np.random.Generator, long: bool = False) -> str:
  """One sentence; ``long`` gives a 300-700 character run-on sentence with commas only."""
  if long:
    target = int(rng.integers(300, 700))
    parts = []
    while sum(len(p) + 2 for p in parts) < target:
      parts.append(" ".join(rng.choice(_WORDS, size=int(rng.integers(3, 9)))))
    return (", ".join(parts)).capitalize() + "."
  s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
  tail = str(rng.choice(_TAILS))
  if tail:
    s += f" {tail}"
  return s[0].upper() + s[1:] + str(rng.choice(_ENDS))


def documents(num_docs: int, seed: int = 0, min_sentences: int = 1,
              max_sentences: int = 12) -> list[str]:
  """``num_docs`` documents; sentences are joined by a space, sometimes by a newline."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_docs):
    n = int(rng.integers(min_sentences, max_sentences + 1))
    sents = [sentence(rng, long=bool(rng.random() < 1 / 12)) for _ in range(n)]
    text = sents[0]
    for s in sents[1:]:
      text += ("\n" if rng.random() < 0.15 else " ") + s
    out.append(text)
  return out


def training_text(seed: int = 0, num_docs: int = 400) -> str:
  """About 250 KB of text (400 documents, one per line) for training a tiny tokenizer."""
  return "\n".join(d.replace("\n", " ") for d in documents(num_docs, seed))
