"""Tiny random SaT and SONAR models built offline, in the layouts the production flags accept.

Run:
  python -m data_prep.tiny_models --out=M [--seed=0] [--sonar_dim=32] [--overwrite]

Writes
  * ``M/sat/model/`` + ``M/sat/tokenizer/``: a 2-layer random SaT (:func:`data_prep.sat.build_tiny_sat`),
    for ``--sat_model=M/sat/model`` (its tokenizer is found next to it);
  * ``M/sonar/``: tiny random SONAR encoder + decoder with fairseq2 cards and a locally trained
    sentencepiece tokenizer (:func:`data_prep.sonar.build_tiny_sonar`), for
    ``--encoder=M/sonar/tiny_sonar_encoder.yaml`` / ``--decoder=M/sonar/tiny_sonar_decoder.yaml``
    (or the card names ``tiny_sonar_encoder`` / ``tiny_sonar_decoder`` with
    ``FAIRSEQ2_USER_ASSET_DIR=M/sonar``).

The weights are random: the sentences and texts they produce are meaningless, but every code path
(segmentation, capping, SONAR's tokenizer, encoder and beam-search decoder) is the real one. Same
seed, same bytes. Nothing is downloaded.

Bad input (an ``--out`` that is a file or cannot be created, existing models without
``--overwrite``, a bad size) prints one ``error: ...`` line and exits with status 2, before
anything is written; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from lcm_jax import fileio
from lcm_jax.errors import UserError


def paths(out: str) -> dict[str, str]:
  """The flag values for a tiny-model directory ``out`` (whether or not it exists yet)."""
  out = os.path.abspath(out)
  return {"sat_model": os.path.join(out, "sat", "model"),
          "sat_tokenizer": os.path.join(out, "sat", "tokenizer"),
          "encoder": os.path.join(out, "sonar", "tiny_sonar_encoder.yaml"),
          "decoder": os.path.join(out, "sonar", "tiny_sonar_decoder.yaml"),
          "tokenizer": os.path.join(out, "sonar", "tiny_sonar_tokenizer.model")}


def build(out: str, seed: int = 0, sonar_dim: int = 32, overwrite: bool = False,
          **sonar_kwargs) -> dict[str, str]:
  """Builds both models under ``out`` (each written atomically); returns :func:`paths`."""
  from data_prep import sat, sonar  # pylint: disable=g-import-not-at-top
  sat.build_tiny_sat(os.path.join(out, "sat"), seed=seed, overwrite=overwrite)
  sonar.build_tiny_sonar(os.path.join(out, "sonar"), seed=seed, dim=sonar_dim,
                         overwrite=overwrite, **sonar_kwargs)
  return paths(out)


def ensure(out: str, seed: int = 0, sonar_dim: int = 32, **sonar_kwargs) -> dict[str, str]:
  """:func:`build` unless ``out`` already holds both models (tests and demos reuse them)."""
  p = paths(out)
  if not all(os.path.exists(v) for v in p.values()):
    build(out, seed=seed, sonar_dim=sonar_dim, overwrite=True, **sonar_kwargs)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m data_prep.tiny_models", description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--out", required=True, help="output directory (M)")
  p.add_argument("--seed", type=int, default=0, help="seed of weights and tokenizer corpora")
  p.add_argument("--sonar_dim", type=int, default=32, help="SONAR embedding (model) dimension")
  p.add_argument("--sonar_layers", type=int, default=2, help="SONAR encoder/decoder layers")
  p.add_argument("--overwrite", action="store_true", help="replace existing models in --out")
  a = p.parse_args(argv)
  try:
    fileio.check_output_path(a.out, "--out", directory=True)
    if not a.overwrite:  # as both builders would, before any is built
      for sub in ("sat", "sonar"):
        d = os.path.join(a.out, sub)
        if os.path.exists(d) and not (os.path.isdir(d) and not os.listdir(d)):
          raise UserError(f"--out {a.out}: {d} exists and is not empty (pass --overwrite to "
                          "replace it)")
    if a.sonar_layers < 1:
      raise UserError(f"--sonar_layers must be >= 1, got {a.sonar_layers}")
    got = build(a.out, seed=a.seed, sonar_dim=a.sonar_dim, overwrite=a.overwrite,
                num_layers=a.sonar_layers)
  except UserError as e:  # only the input checks; any other exception is a bug (traceback)
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("built; use these flags:")
  print(f"  data_prep.embed:  --sat_model={got['sat_model']} --encoder={got['encoder']}")
  print(f"  data_prep.decode: --decoder={got['decoder']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
