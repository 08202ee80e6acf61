r"""Text in, text out: segment + SONAR-encode prompts, generate concepts with an exported LCM
(plain PyTorch), SONAR-decode them, print and save the result.

  python -m data_prep.text_generate (--card=DIR/model_card.yaml | --workdir=W [--step=S]) \
      (--prompt="text" | --prompt_file=F) --out=FILE.jsonl \
      [--sat_model=sat-3l] [--sat_tokenizer=DIR] [--encoder=text_sonar_basic_encoder] \
      [--decoder=text_sonar_basic_decoder] [--tokenizer=CARD_OR_PATH] [--lang=eng_Latn] \
      [--target_lang=eng_Latn] [--max_len=16] [--min_gen_len=1] [--eot_threshold=0.9] \
      [--eot_text="End of text."] [--repetition_threshold=0.9] \
      [--[no-]sample_latent_variable] [--temperature=1.0] \
      [--sampler_steps=40] [--guidance_scale=3] [--guidance_rescale=0.7] \
      [--initial_noise_scale=0.6] [--eta=0] [--seed=0] [--beam_size=5] [--decode_max_len=256] \
      [--device=cuda]
  python -m data_prep.text_generate --help

Steps, per prompt (all prompts in one batch):
  1. SaT-segment the prompt (:class:`data_prep.sat.Segmenter`, the embedding tool's settings); no
     end-of-text sentence is appended (the model continues the text);
  2. SONAR-encode the sentences (raw SONAR space; the torch model normalizes internally);
  3. generate concepts with :class:`lcm_interop.torch_generate.Generator` (any family, per
     the card), stopping at the end-of-text vector (``encode([--eot_text])``, ``--eot_lang``),
     optionally at a repetition, else at ``--max_len`` concepts;
  4. SONAR-decode every generated concept (beam search) to one sentence.

``--workdir`` exports the checkpoint (:func:`lcm_interop.export.export_checkpoint`) to a temporary
directory first and loads that card. Models: ``--sat_model``/``--encoder``/``--decoder`` take the
production names (downloaded/cached as in data_prep.embed / data_prep.decode) or the local paths
``python -m data_prep.tiny_models`` prints.

``--prompt_file``: a ``.jsonl`` file of ``{"id", "text"}`` objects (id optional), else plain text with
one prompt per non-empty line. ``--prompt`` and ``--prompt_file`` may be combined (the ``--prompt``
one first, id ``prompt``).

Output: stdout, per prompt, its generated sentences; ``--out`` (UTF-8 JSONL, atomic), one line per
prompt::

  {"id": "...", "prompt_sentences": [...], "sentences": [...], "text": "...", "stop_reason": "eot"}

and next to it ``--concepts`` (default ``FILE.npz``, atomic): ``embeddings`` (B, max_len, S)
float32 raw SONAR, zero past ``lengths``; ``lengths`` (B,); ``stop_reasons`` (B,) str; ``ids``;
``prompt_embeddings`` (B, P, S) zero-padded and ``prompt_lengths`` (B,) (data_prep.decode reads it).

Library use (``data_prep.eval_text rouge``): :func:`load_models` loads and checks everything
once; :func:`generate_texts` runs steps 1-4 on one batch of prompts and may add constant
``prefix``/``suffix`` sentences around every prompt, encoded whole in ``--eot_lang`` (never
segmented), as ``data_prep.embed`` lays out a fine-tuning pair's source; :func:`run` is the
command (both, on all prompts as one batch, then the outputs).

User errors (no prompt, a prompt without sentences, a missing card/workdir, a card whose SONAR
dimension is not the encoder's/decoder's, a model that does not load, bad settings) print one
``error: ...`` line and exit with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

import numpy as np

from lcm_jax import errors

TOOL = "data_prep.text_generate"


# A bad input or setting: one ``error:`` line, exit status 2 (the project's user-error type).
UserError = errors.UserError


def _log(msg: str) -> None:
  print(f"[{TOOL}] {msg}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
  from data_prep import sat, sonar  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(
      prog=f"python -m {TOOL}",
      description="Prompt text -> SaT + SONAR encoder -> LCM (exported card, PyTorch) -> SONAR "
                  "decoder -> generated text (printed, and saved as JSONL + .npz).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  g = p.add_argument_group("model")
  m = g.add_mutually_exclusive_group(required=True)
  m.add_argument("--card", help="exported model card (DIR/model_card.yaml or DIR)")
  m.add_argument("--workdir", help="training workdir: its checkpoint is exported to a temp dir")
  g.add_argument("--step", type=int, default=None, help="--workdir checkpoint step (latest)")
  g = p.add_argument_group("prompts and output")
  g.add_argument("--prompt", default=None, help="one prompt text")
  g.add_argument("--prompt_file", default=None,
                 help=".jsonl of {id, text}, else one prompt per non-empty line")
  g.add_argument("--out", required=True, help="output .jsonl (written atomically)")
  g.add_argument("--concepts", default=None,
                 help="the generated concepts .npz (default: --out with .npz)")
  g = p.add_argument_group("text models")
  g.add_argument("--sat_model", default=sat.DEFAULT_MODEL, help="SaT hub name or local directory")
  g.add_argument("--sat_tokenizer", default=None, help="SaT tokenizer name or local directory")
  g.add_argument("--sat_threshold", type=float, default=sat.DEFAULT_THRESHOLD,
                 help="SaT boundary threshold")
  g.add_argument("--max_chars", type=int, default=250, help="maximum characters per sentence")
  g.add_argument("--encoder", default=sonar.DEFAULT_ENCODER, help="SONAR encoder card/path")
  g.add_argument("--decoder", default=sonar.DEFAULT_DECODER, help="SONAR decoder card/path")
  g.add_argument("--tokenizer", default=None,
                 help="SONAR tokenizer card/path (default: the encoder's / decoder's own)")
  g.add_argument("--lang", default=sonar.DEFAULT_LANG, help="language of the prompts")
  g.add_argument("--target_lang", default=sonar.DEFAULT_LANG, help="language decoded to")
  g.add_argument("--eot_text", default="End of text.", help="end-of-text sentence (EOT stop)")
  g.add_argument("--eot_lang", default="eng_Latn", help="language of --eot_text")
  g.add_argument("--beam_size", type=int, default=5, help="SONAR decoder beam width")
  g.add_argument("--decode_max_len", type=int, default=256,
                 help="most TOKENS per decoded sentence (data_prep.decode's --max_len)")
  g = p.add_argument_group("generation")
  g.add_argument("--max_len", type=int, default=16, help="most concepts generated per prompt")
  g.add_argument("--min_gen_len", type=int, default=1,
                 help="the reference's min_gen_len (>= 1): an EOT/repetition stop needs this "
                 "many generated concepts before the one that triggers it (the first "
                 "generated concept never stops)")
  g.add_argument("--eot_threshold", type=float, default=0.9,
                 help="stop at cosine(concept, EOT vector) >= this; the EOT stop is off if < -1")
  g.add_argument("--repetition_threshold", type=float, default=None,
                 help="stop at cosine(concept, previous) >= this (default off; paper: 0.9)")
  g.add_argument("--sample_latent_variable", action=argparse.BooleanOptionalAction,
                 default=None,
                 help="Base-LCM: add temperature * N(0, I) (normalized space) to each "
                 "prediction (the reference generator's default is on; ours off); unset: on "
                 "exactly when --temperature > 0 is given")
  g.add_argument("--temperature", type=float, default=None,
                 help="Base-LCM latent noise std when sampling (the reference's "
                 "lcm_temperature; unset: 1.0)")
  g.add_argument("--sampler_steps", type=int, default=40, help="diffusion: DDIM steps")
  g.add_argument("--guidance_scale", type=float, default=3.0, help="diffusion: CF guidance")
  g.add_argument("--guidance_rescale", type=float, default=0.7, help="diffusion: guidance rescale")
  g.add_argument("--initial_noise_scale", type=float, default=0.6, help="diffusion: initial noise")
  g.add_argument("--eta", type=float, default=0.0, help="diffusion: DDIM eta")
  g.add_argument("--seed", type=int, default=0, help="torch noise seed")
  g.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
  return p


def read_prompts(prompt: Optional[str], prompt_file: Optional[str]) -> list[tuple[str, str]]:
  """``[(id, text)]`` from ``--prompt`` and ``--prompt_file``; UserError when there are none."""
  out: list[tuple[str, str]] = []
  if prompt is not None:
    out.append(("prompt", prompt))
  if prompt_file is not None:
    try:
      with open(prompt_file, encoding="utf-8") as f:
        lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f"--prompt_file {prompt_file}: {e}") from None
    as_jsonl = prompt_file.endswith(".jsonl")
    for n, line in enumerate(lines, 1):
      if not line.strip():
        continue
      if as_jsonl:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          raise UserError(f"--prompt_file {prompt_file}: line {n}: bad JSON ({e})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
          raise UserError(f"--prompt_file {prompt_file}: line {n}: field 'text': expected a "
                          "string")
        out.append((str(rec.get("id", f"{prompt_file}:{n}")), rec["text"]))
      else:
        out.append((f"{prompt_file}:{n}", line))
  if not out:
    raise UserError("no prompt: give --prompt and/or --prompt_file")
  for pid, text in out:
    if not text.strip():
      raise UserError(f"prompt {pid!r}: is empty")
  return out


def _save_npz_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=d)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _load_model(a: argparse.Namespace, device: Any, tmp: str) -> Any:
  from lcm_interop import reference, torch_models  # pylint: disable=g-import-not-at-top
  if a.card is not None:  # no JAX needed
    card = a.card
    path = os.path.join(card, reference.CARD_FILE) if os.path.isdir(card) else card
    if not os.path.isfile(path):
      raise UserError(f"--card {card}: {path} does not exist")
  else:
    if not os.path.isdir(a.workdir):
      raise UserError(f"--workdir {a.workdir}: is not a directory")
    from lcm_interop import export  # pylint: disable=g-import-not-at-top  (JAX + torch)
    card = os.path.join(tmp, "export")
    try:
      summary = export.export_checkpoint(a.workdir, card, step=a.step)
    except UserError as e:  # ExportError, CheckpointError
      raise UserError(f"--workdir {a.workdir}: {e}") from None
    _log(f"exported {a.workdir} step {summary.get('step')} to {card}")
  try:
    return torch_models.load_from_card(card, device=device)
  except (UserError, OSError) as e:
    raise UserError(f"--card {card}: {e}") from None


@dataclasses.dataclass
class Models:
  """Everything :func:`generate_texts` needs, loaded and checked once by :func:`load_models`."""

  model: Any
  """The torch LCM (:func:`lcm_interop.torch_models.load_from_card`)."""
  segmenter: Any
  """:class:`data_prep.sat.Segmenter`."""
  encoder: Any
  """SONAR text encoder (:func:`data_prep.sonar.load_text_encoder`)."""
  decoder: Any
  """SONAR text decoder (:func:`data_prep.sonar.load_text_decoder`)."""
  eot: Optional[np.ndarray]
  """(S,) raw-space end-of-text vector (``--eot_text`` in ``--eot_lang``); None: EOT stop off."""
  gen_cfg: Any
  """:class:`lcm_jax.generation_config.GenerationConfig` (validated)."""
  sampler: Any
  """:class:`lcm_jax.schedules.SamplerConfig` (validated for a diffusion family's model)."""
  generator: Any
  """:class:`lcm_interop.torch_generate.Generator` over ``model``, ``gen_cfg``, ``sampler``,
  ``eot``."""
  device: Any
  """The resolved torch device."""

  @property
  def config(self) -> Any:
    """The model's config (:class:`~lcm_jax.models.config.ModelConfig`)."""
    return self.model.config


def load_models(a: argparse.Namespace) -> Models:
  """Checks the generation settings and loads the LCM (``--card``, or ``--workdir`` exported to a
  temporary directory), SaT, the SONAR encoder and decoder, and encodes the end-of-text vector.
  UserError on a bad setting or a model that does not load or does not fit the LCM."""
  from data_prep import sat, sonar  # pylint: disable=g-import-not-at-top
  from lcm_interop import reference, torch_generate  # pylint: disable=g-import-not-at-top
  from lcm_jax import schedules  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from lcm_jax.generation_config import GenerationConfig, latent_sampling_from_flags
  temperature = 1.0 if a.temperature is None else a.temperature
  gen_cfg = GenerationConfig(max_len=a.max_len, min_gen_len=a.min_gen_len,
                             eot_threshold=max(a.eot_threshold, -1.0),
                             repetition_threshold=a.repetition_threshold,
                             sample_latent_variable=latent_sampling_from_flags(
                                 a.sample_latent_variable, temperature,
                                 a.temperature is not None),
                             temperature=temperature)
  sampler = schedules.SamplerConfig(num_steps=a.sampler_steps, guidance_scale=a.guidance_scale,
                                    guidance_rescale=a.guidance_rescale,
                                    initial_noise_scale=a.initial_noise_scale, eta=a.eta)
  gen_cfg.validate()
  device = sonar.resolve_device(a.device)
  os.environ.setdefault("FAIRSEQ2_NO_PROGRESS", "1")
  with tempfile.TemporaryDirectory(prefix="text_generate-") as tmp:
    model = _load_model(a, device, tmp)
  cfg = model.config
  if reference.of(cfg).samples:  # a diffusion family: the DDIM settings apply
    sampler.validate(cfg.num_diffusion_train_steps)
  try:
    segmenter = sat.Segmenter(sat.load_sat(a.sat_model, a.sat_tokenizer, device=str(device)),
                              threshold=a.sat_threshold, max_chars=a.max_chars)
  except UserError as e:  # SegmenterLoadError too
    raise UserError(f"--sat_model {a.sat_model}: {e}") from None
  try:
    encoder = sonar.load_text_encoder(a.encoder, a.tokenizer, device=a.device)
  except UserError as e:  # SonarLoadError too
    raise UserError(f"--encoder {a.encoder}: {e}") from None
  if encoder.dim != cfg.sonar_embed_dim:
    raise UserError(f"--encoder {a.encoder}: embedding dim {encoder.dim} != the model's "
                    f"sonar_embed_dim {cfg.sonar_embed_dim}")
  try:
    decoder = sonar.load_text_decoder(a.decoder, a.tokenizer, device=a.device)
  except UserError as e:  # SonarLoadError too
    raise UserError(f"--decoder {a.decoder}: {e}") from None
  if decoder.dim != cfg.sonar_embed_dim:
    raise UserError(f"--decoder {a.decoder}: embedding dim {decoder.dim} != the model's "
                    f"sonar_embed_dim {cfg.sonar_embed_dim}")
  try:
    decoder.check_lang(a.target_lang)
  except UserError as e:
    raise UserError(f"--target_lang {a.target_lang}: {e}") from None
  try:
    eot = encoder.encode([a.eot_text], a.eot_lang)[0] if a.eot_threshold >= -1.0 else None
  except UserError as e:
    raise UserError(f"--lang {a.lang} / --eot_lang {a.eot_lang}: {e}") from None
  generator = torch_generate.Generator(model, gen_cfg, sampler=sampler, eot_vector=eot)
  return Models(model=model, segmenter=segmenter, encoder=encoder, decoder=decoder, eot=eot,
                gen_cfg=gen_cfg, sampler=sampler, generator=generator, device=device)


def generate_texts(m: Models, a: argparse.Namespace, prompts: Sequence[tuple[str, str]], *,
                   prefix: Sequence[str] = (), suffix: Sequence[str] = (),
                   timings: Optional[dict[str, float]] = None
                   ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
  """Steps 1-4 of the module docstring for ``prompts`` (``[(id, text)]``), one batch.

  Each prompt is SaT-segmented and its sentences SONAR-encoded in ``a.lang``; the constant
  sentences ``prefix`` (before) and ``suffix`` (after) are never segmented and are encoded once
  per call, whole, in ``a.eot_lang`` (as :mod:`data_prep.embed` lays out a fine-tuning pair's
  source). A prompt's concepts are ``encode(prefix) + encode(its sentences) + encode(suffix)``.
  Noise is drawn from ``a.seed`` (a fresh generator per call).

  Args:
    m: :func:`load_models`'s models.
    a: the parsed flags (``lang``, ``eot_lang``, ``target_lang``, ``seed``, ``beam_size``,
      ``decode_max_len``).
    prompts: ``[(id, text)]``, at least one.
    prefix: constant sentences before every prompt's sentences.
    suffix: constant sentences after every prompt's sentences.
    timings: when given, ``timings["generate"]`` is set to the generator's seconds.

  Returns:
    ``(records, arrays)``: per prompt ``{"id", "prompt_sentences", "sentences", "text",
    "stop_reason"}``, where ``prompt_sentences`` is ``prefix + its sentences + suffix`` (one per
    prompt concept); and the ``--concepts`` arrays (module docstring), ``prompt_lengths``
    counting the prefix and suffix concepts too.

  Raises:
    UserError: no prompts, a blank constant sentence, a prompt without sentences, a language
      the encoder does not know.
  """
  from lcm_jax.generation_config import STOP_REASONS  # pylint: disable=g-import-not-at-top
  if not prompts:
    raise UserError("no prompt: give --prompt and/or --prompt_file")
  prefix, suffix = list(prefix), list(suffix)
  for what, consts in (("prefix", prefix), ("suffix", suffix)):
    for s in consts:
      if not isinstance(s, str) or not s.strip():
        raise UserError(f"{what} sentence {s!r}: expected a non-empty string")
  # 1-2. Segment and encode the prompts (no end-of-text sentence appended).
  segmented = m.segmenter.segment([t for _, t in prompts])
  for (pid, _), sents in zip(prompts, segmented):
    if not sents:
      raise UserError(f"prompt {pid!r}: no sentences after segmentation")
  flat = [s for sents in segmented for s in sents]
  dim = m.config.sonar_embed_dim
  try:
    emb = m.encoder.encode(flat, a.lang)
    consts = (m.encoder.encode(prefix + suffix, a.eot_lang) if prefix or suffix
              else np.zeros((0, dim), np.float32))
  except UserError as e:
    raise UserError(f"--lang {a.lang} / --eot_lang {a.eot_lang}: {e}") from None
  pre, suf = consts[:len(prefix)], consts[len(prefix):]
  offsets = np.cumsum([0] + [len(s) for s in segmented])
  prompt_embs = [np.concatenate([pre, emb[offsets[i]:offsets[i + 1]], suf]).astype(np.float32)
                 for i in range(len(prompts))]
  prompt_sents = [prefix + list(sents) + suffix for sents in segmented]

  # 3. Generate.
  t1 = time.time()
  res = m.generator(prompt_embs, seed=a.seed)
  if timings is not None:
    timings["generate"] = time.time() - t1

  # 4. Decode.
  lengths = [int(n) for n in res.lengths]
  concepts = np.concatenate([res.embeddings[b, :n] for b, n in enumerate(lengths)])
  texts = m.decoder.decode(concepts, a.target_lang, beam_size=a.beam_size,
                           max_len=a.decode_max_len)
  reasons = [STOP_REASONS[int(r)] for r in res.stop_reasons]
  records, k = [], 0
  for (pid, _), sents, n, reason in zip(prompts, prompt_sents, lengths, reasons):
    out_sents = texts[k:k + n]
    k += n
    records.append({"id": pid, "prompt_sentences": sents, "sentences": out_sents,
                    "text": " ".join(out_sents), "stop_reason": reason})
  plen = max(len(s) for s in prompt_sents)
  padded = np.zeros((len(prompts), plen, dim), np.float32)
  for b, e in enumerate(prompt_embs):
    padded[b, :len(e)] = e
  arrays = {
      "embeddings": res.embeddings.astype(np.float32), "lengths": res.lengths.astype(np.int32),
      "stop_reasons": np.asarray(reasons), "ids": np.asarray([p for p, _ in prompts]),
      "prompt_embeddings": padded,
      "prompt_lengths": np.asarray([len(s) for s in prompt_sents], np.int32)}
  return records, arrays


def run(a: argparse.Namespace) -> list[dict[str, Any]]:
  """Everything after flag parsing (:func:`load_models`, :func:`generate_texts` on every prompt
  as one batch, then the outputs); returns the JSONL records (also written). UserError on bad
  input."""
  from data_prep import decode  # pylint: disable=g-import-not-at-top

  from lcm_jax.fileio import check_output_file  # pylint: disable=g-import-not-at-top
  concepts_path = a.concepts or os.path.splitext(a.out)[0] + ".npz"
  check_output_file(a.out, "--out")
  check_output_file(concepts_path, "--concepts")
  if os.path.abspath(concepts_path) == os.path.abspath(a.out):
    raise UserError(f"--concepts {concepts_path}: same file as --out")
  prompts = read_prompts(a.prompt, a.prompt_file)
  t0 = time.time()
  m = load_models(a)
  timings: dict[str, float] = {}
  records, arrays = generate_texts(m, a, prompts, timings=timings)
  _save_npz_atomic(concepts_path, arrays)
  decode.write_jsonl_atomic(a.out, records)
  for r in records:
    print(f"== {r['id']} ({len(r['sentences'])} sentences, {r['stop_reason']})")
    for s in r["sentences"]:
      print(s)
  _log(f"{m.config.family}: {len(prompts)} prompts, {int(arrays['lengths'].sum())} concepts; "
       f"generate {timings['generate']:.1f} s, total {time.time() - t0:.1f} s; wrote {a.out} "
       f"and {concepts_path}")
  return records


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  a = _parser().parse_args(argv)
  try:
    run(a)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
