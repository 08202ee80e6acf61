"""SONAR text encoding and decoding through sonar-space's pipelines, and tiny random SONAR models.

  from data_prep import sonar
  enc = sonar.SentenceEncoder.load()                      # text_sonar_basic_encoder (1024-d)
  x = enc.encode(["Hello world.", "End of text."], lang="eng_Latn")     # (2, 1024) float32
  dec = sonar.EmbeddingDecoder.load()                     # text_sonar_basic_decoder
  texts = dec.decode(x, target_lang="eng_Latn")           # beam 5, up to 256 tokens

Loading: :func:`load_text_encoder` -> :class:`SentenceEncoder` and :func:`load_text_decoder` ->
:class:`EmbeddingDecoder` (also ``SentenceEncoder.load``/``EmbeddingDecoder.load``; the sonar
pipelines are their ``.pipeline``). ``encoder``/``decoder``/``tokenizer`` each take one of:

* a fairseq2 asset-card NAME (``text_sonar_basic_encoder``, the production default): looked up
  in fairseq2's asset store and loaded by ``fairseq2.models.load_model`` /
  ``fairseq2.data.tokenizers.load_tokenizer``, exactly what sonar's pipelines do with a name. The
  store holds the cards shipped with sonar-space and fairseq2 plus every ``*.yaml`` card under
  the directory named by ``FAIRSEQ2_USER_ASSET_DIR`` (default ``~/.config/fairseq2/assets``) and
  ``FAIRSEQ2_ASSET_DIR`` (default ``/etc/fairseq2/assets``). fairseq2 reads these variables once,
  when it initialises in a process (at the first load), so set them before starting Python:
  ``FAIRSEQ2_USER_ASSET_DIR=DIR python ... --encoder=tiny_sonar_encoder``.
* a local card PATH: a card ``.yaml`` file, or a directory of cards (the one card of the wanted
  model family is picked: ``transformer_encoder`` for an encoder, ``transformer_decoder`` for a
  decoder). The file is parsed by fairseq2's own YAML card loader into an ``AssetCard`` that is
  handed to the same ``load_model`` / ``load_tokenizer``, so it works at any time in any process
  (no environment variable needed). ``checkpoint:`` and ``tokenizer:`` may be ``file://`` URIs or
  paths relative to the card's directory. A local card may name a ``base:`` card from the global
  store, e.g. to use production weights downloaded by hand::

      name: sonar_encoder_local
      base: text_sonar_basic_encoder
      checkpoint: file:///models/sonar/sonar_text_encoder.pt
      tokenizer: file:///models/sonar/sentencepiece.source.256000.model

* for ``tokenizer`` only, also a local sentencepiece ``.model`` file: loaded with fairseq2's NLLB
  tokenizer loader and SONAR's 202 language codes (what the production cards declare).

``tokenizer=None`` uses the model's own card (the production cards and the tiny cards carry
their tokenizer). Device: ``None`` = CUDA when ``torch.cuda.is_available()``, else CPU. dtype:
``float32 | float16 | bfloat16``; ``None`` = float32 on CPU and float16 on CUDA (SONAR's usual
inference precision; fp16 matmuls on CPU are slow or unsupported). A model that cannot be loaded
(offline model hub, unknown card, missing file) raises :class:`SonarLoadError`; its message names
what was tried and how to provide local cards.

Encoding (:class:`SentenceEncoder`, the hot loop of the embedding job). Each sentence is tokenized
as sonar does (``__lang__ ... </s>``, fairseq2's NLLB tokenizer, source mode) and truncated
exactly as ``TextToEmbeddingModelPipeline.predict`` truncates: to the encoder's position-encoder
length, which for SONAR's ``basic`` architecture is 512 + 2 = 514 tokens, language tag included
(the fairseq ``_from_fairseq`` offset; a truncated sentence loses its ``</s>``). Then:

* sonar's ``predict`` sorts a list by CHARACTER length and buckets it through a fairseq2 data
  pipeline that it rebuilds on every call (a new token encoder, a prefetch thread). Here the
  token encoder is made once per language and the whole call is sorted by TOKEN count (longest
  first, so an out-of-memory error shows at the first batch), then cut into batches of at most
  ``batch_size`` sentences and, if ``max_tokens`` is set, at most ``max_tokens`` PADDED tokens
  (rows x longest row, the real memory bound; a single longer sentence still forms its own
  batch). Sorting by tokens minimises padding exactly; results come back in input order.
* the model call is sonar's encoder ``forward`` on the padded batch under ``inference_mode`` and
  sonar's matmul-precision context; rows equal ``predict``'s to float rounding (tests: 1e-6).
* on a CPU shared with other jobs, torch's OpenMP threads spin and small models slow down by
  10-50x; run with ``OMP_NUM_THREADS=1`` (or ``OMP_WAIT_POLICY=passive``) there.

Decoding (:class:`EmbeddingDecoder`) calls ``EmbeddingToTextModelPipeline.predict`` batch by
batch (beam search, fairseq2's ``BeamSearchSeq2SeqGenerator``). ``max_len`` is the most tokens in
a decoded sequence, its 2-token prefix (``</s> __lang__``) and final ``</s>`` included: it is
passed as the generator's ``max_seq_len``, with ``max_gen_len=(0, max_len)`` so that fairseq2's
default length rule (1 x source length + 128 = 129 tokens for a single embedding) does not cut
sentences shorter. Values above the decoder's own limit (512 for SONAR) are capped by fairseq2.

Tiny models (:func:`build_tiny_sonar`): a sentencepiece model trained on the spot on a small
generated English/French/German corpus (unk/bos/eos like NLLB's, no pad: fairseq2's NLLB loader
inserts ``<pad>`` at 0 and the ``__lang__`` symbols), and a SONAR text encoder and decoder with
RANDOM weights made by sonar's own factories from the ``basic`` architecture with a few fields
overridden (``model_dim``, layers, heads, FFN size, vocabulary; ``max_seq_len`` 512, mean
pooling and the fairseq position offset are kept, so truncation works as in production). One
change to the factory's initialisation: the decoder's cross-attention value and output
projections are scaled by 8 each, otherwise a random decoder ignores its input and writes the
same text for every embedding. Written to ``out_dir`` (a temporary sibling directory renamed
into place)::

    tiny_sonar_encoder.yaml  tiny_sonar_encoder.pt     # card + checkpoint {"model": state_dict}
    tiny_sonar_decoder.yaml  tiny_sonar_decoder.pt
    tiny_sonar_tokenizer.model                          # sentencepiece
    tiny_sonar.json                                     # the build arguments

The cards have the production cards' form (``model_family``, ``model_arch: basic``,
``model_config`` overrides, ``checkpoint``, ``tokenizer``, ``tokenizer_family: nllb``,
``tokenizer_config`` with SONAR's 202 languages), with ``checkpoint``/``tokenizer`` given
relative to the card so that the directory can be moved or copied. Same seed and dim, same
weights and tokenizer. Outputs are random text, useful only to test the plumbing.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from lcm_jax import normalizer as normalizer_lib
from lcm_jax import schema
from lcm_jax.errors import UserError

if TYPE_CHECKING:
  import torch
  from fairseq2.assets import AssetCard
  from sonar.inference_pipelines.text import (EmbeddingToTextModelPipeline,
                                              TextToEmbeddingModelPipeline)

DEFAULT_ENCODER = "text_sonar_basic_encoder"
DEFAULT_DECODER = "text_sonar_basic_decoder"
TINY_ENCODER = "tiny_sonar_encoder"
TINY_DECODER = "tiny_sonar_decoder"
TINY_TOKENIZER_FILE = "tiny_sonar_tokenizer.model"
TINY_INFO_FILE = "tiny_sonar.json"
ENCODER_FAMILY = "transformer_encoder"  # sonar.models.sonar_text.SONAR_TEXT_ENCODER_FAMILY
DECODER_FAMILY = "transformer_decoder"  # sonar.models.sonar_text.SONAR_TEXT_DECODER_FAMILY
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_LANG = "eng_Latn"
TINY_DEFAULTS: dict[str, int] = dict(dim=32, num_layers=2, num_heads=4, vocab_size=1000)

HOW_TO_LOCAL = (
    "To load local files, pass a card .yaml (or a directory of cards) whose 'checkpoint:' and "
    "'tokenizer:' fields are file:// URIs or paths relative to the card (e.g. a copy of sonar's "
    "text_sonar_basic_encoder card, or a card with 'base: text_sonar_basic_encoder' and only "
    "those two fields), or put such cards in the directory named by FAIRSEQ2_USER_ASSET_DIR "
    "(set before Python starts) and pass the card name. The production cards download from "
    "https://dl.fbaipublicfiles.com/SONAR/ (needs network, or the files already in the fairseq2 "
    "cache, FAIRSEQ2_CACHE_DIR). Tiny random models for tests: python -m data_prep.tiny_models "
    "--out=DIR, then pass DIR/tiny_sonar_encoder.yaml or DIR/tiny_sonar_decoder.yaml.")


class SonarLoadError(UserError, RuntimeError):
  """A SONAR model or tokenizer cannot be loaded; the message says what was tried and what to do.
  A user error (the flags name the model); still a RuntimeError for callers that caught it as one.
  """


# ----------------------------------------------------------------------------------------------
# Devices and dtypes

def resolve_device(device: str | None = None) -> "torch.device":
  """``None`` -> ``cuda`` if available else ``cpu``; otherwise ``torch.device(device)``."""
  import torch
  if device is None:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
  try:
    dev = torch.device(device)
  except (RuntimeError, TypeError) as e:
    raise UserError(f"device: cannot parse {device!r} ({e})") from None
  if dev.type == "cuda" and not torch.cuda.is_available():
    raise UserError(f"device: {device!r} requested but CUDA is not available")
  return dev


def resolve_dtype(dtype: str | None, device: "torch.device") -> "torch.dtype":
  """``None`` -> float32 on CPU, float16 on CUDA; else one of :data:`DTYPES`."""
  import torch
  if dtype is None:
    dtype = "float16" if device.type == "cuda" else "float32"
  if dtype not in DTYPES:
    raise UserError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
  return getattr(torch, dtype)


# ----------------------------------------------------------------------------------------------
# Asset cards

def sonar_languages() -> list[str]:
  """SONAR's language codes, as listed by sonar-space's ``text_sonar_basic_encoder`` card (202)."""
  import importlib.resources
  import yaml
  text = importlib.resources.files("sonar.cards").joinpath(
      f"{DEFAULT_ENCODER}.yaml").read_text(encoding="utf-8")
  return list(yaml.safe_load(text)["tokenizer_config"]["_set_"]["langs"])


def _is_path_spec(spec: str) -> bool:
  """Whether ``spec`` names a local path rather than an asset-card name."""
  return (os.path.exists(spec) or os.sep in spec or spec.startswith(".")
          or spec.endswith((".yaml", ".yml", ".model")))


def _fallback_provider(exclude: set[str]) -> Any:
  """An asset-metadata provider that serves the GLOBAL store's cards (for ``base:`` look-ups)."""
  from fairseq2.assets import AssetMetadataProvider, get_asset_store

  store = get_asset_store()

  class GlobalStoreProvider(AssetMetadataProvider):
    """Serves the global store's plain (environment-free) cards except ``exclude``."""

    def maybe_get_metadata(self, name: str) -> dict[str, object] | None:
      if name in exclude or not name.endswith("@"):
        return None
      card = store.maybe_retrieve_card(name)
      return None if card is None else dict(card.metadata)

    @property
    def asset_names(self) -> set[str]:
      return {n for n in store.asset_names if n.endswith("@") and n not in exclude}

    @property
    def source(self) -> str:
      return "global asset store"

  return GlobalStoreProvider()


def _load_card_file(path: str, kind: str) -> "AssetCard":
  """Reads the card for ``kind`` (encoder | decoder | tokenizer) from a YAML file or directory."""
  from fairseq2.assets import FileAssetMetadataLoader, StandardAssetStore
  from fairseq2.runtime.dependency import get_dependency_resolver

  loader = get_dependency_resolver().resolve(FileAssetMetadataLoader)
  local = loader.load(Path(path))
  names = sorted(n[:-1] for n in local.asset_names if n.endswith("@"))
  store = StandardAssetStore([local, _fallback_provider(set(local.asset_names))])
  cards = [store.retrieve_card(n) for n in names]
  if kind == "tokenizer":
    fits = [c for c in cards if c.has_field("tokenizer_family")]
    uris = {str(c.field("tokenizer").as_uri()) for c in fits if c.has_field("tokenizer")}
    if len(uris) == 1:  # several cards sharing one tokenizer (encoder + decoder): any will do
      fits = fits[:1]
  else:
    family = ENCODER_FAMILY if kind == "encoder" else DECODER_FAMILY
    fits = [c for c in cards
            if c.has_field("model_family") and c.field("model_family").value == family]
  if len(fits) != 1:
    what = f"a {kind} card" if kind == "tokenizer" else f"a model_family: {family} card"
    found = ", ".join(names) or "no cards"
    raise UserError(f"{path}: expected exactly one {what}, found {len(fits)} (cards: {found}); "
                    "pass the card's .yaml file")
  return fits[0]


def _sentencepiece_card(path: str) -> "AssetCard":
  """An in-memory NLLB tokenizer card for a bare sentencepiece ``.model`` file."""
  from fairseq2.assets import StandardAssetStore, load_in_memory_asset_metadata
  name = f"local_tokenizer_{Path(path).stem}"
  entry = dict(name=name, tokenizer=Path(path).resolve().as_uri(), tokenizer_family="nllb",
               tokenizer_config={"_set_": {"default_lang": DEFAULT_LANG,
                                           "langs": sonar_languages()}})
  provider = load_in_memory_asset_metadata(f"file {path}", [entry])
  return StandardAssetStore([provider]).retrieve_card(name)


def _resolve_card(spec: str, kind: str) -> "AssetCard | str":
  """A card NAME stays a string (global store); a local path becomes an ``AssetCard``."""
  if not isinstance(spec, str) or not spec:
    raise SonarLoadError(f"SONAR {kind}: expected a card name or path, got {spec!r}. "
                         + HOW_TO_LOCAL)
  if not _is_path_spec(spec):
    return spec
  if not os.path.exists(spec):
    raise SonarLoadError(f"cannot load the SONAR {kind} {spec!r}: no such file or directory. "
                         + HOW_TO_LOCAL)
  try:
    if kind == "tokenizer" and os.path.isfile(spec) and spec.endswith(".model"):
      return _sentencepiece_card(spec)
    return _load_card_file(spec, kind)
  except Exception as e:  # pylint: disable=broad-except
    raise SonarLoadError(f"cannot load the SONAR {kind} card {spec!r}: {_err(e)}. "
                         + HOW_TO_LOCAL) from e


def _describe(card: "AssetCard | str", field: str) -> str:
  """``card`` and, best effort, its ``field`` URI, for error messages."""
  try:
    if isinstance(card, str):
      from fairseq2.assets import get_asset_store
      desc = f"card name {card!r} (fairseq2 asset store)"
      card = get_asset_store().retrieve_card(card)
    else:
      desc = f"card {card.name!r} from {card.metadata.get('__source__', 'a local file')}"
    return f"{desc}, {field} {card.field(field).as_uri()}"
  except Exception:  # pylint: disable=broad-except
    return desc


def _check_family(card: "AssetCard | str", kind: str) -> None:
  """Fails fast (before any download) when a card is not a SONAR text ``kind`` card."""
  family = ENCODER_FAMILY if kind == "encoder" else DECODER_FAMILY
  if isinstance(card, str):
    from fairseq2.assets import get_asset_store
    found = get_asset_store().maybe_retrieve_card(card)
    if found is None:
      return  # load_model raises ModelNotKnownError, reported with the how-to
    card = found
  field = card.maybe_get_field("model_family")
  value = None if field is None else field.value
  if value != family:
    raise SonarLoadError(f"card {card.name!r} has model_family {value!r}, not {family!r}: it "
                         f"is not a SONAR text {kind}. " + HOW_TO_LOCAL)


def _load(kind: str, spec: str, tokenizer: str | None, device: str | None,
          dtype: str | None) -> tuple[Any, Any, "torch.device", "torch.dtype"]:
  """Loads (model, tokenizer, device, dtype) through fairseq2's production loaders."""
  from fairseq2.data.tokenizers import load_tokenizer
  from fairseq2.models import load_model

  dev = resolve_device(device)
  dt = resolve_dtype(dtype, dev)
  model_card = _resolve_card(spec, kind)
  tok_card = model_card if tokenizer is None else _resolve_card(tokenizer, "tokenizer")
  _check_family(model_card, kind)
  try:
    model = load_model(model_card, device=dev, dtype=dt)
  except Exception as e:  # pylint: disable=broad-except
    raise SonarLoadError(f"cannot load the SONAR text {kind} from "
                         f"{_describe(model_card, 'checkpoint')}: {_err(e)}. "
                         + HOW_TO_LOCAL) from e
  try:
    tok = load_tokenizer(tok_card)
  except Exception as e:  # pylint: disable=broad-except
    raise SonarLoadError(f"cannot load the SONAR tokenizer from "
                         f"{_describe(tok_card, 'tokenizer')}: {_err(e)}. " + HOW_TO_LOCAL) from e
  return model, tok, dev, dt


def load_text_encoder(encoder: str = DEFAULT_ENCODER, tokenizer: str | None = None,
                      device: str | None = None, dtype: str | None = None, *,
                      batch_size: int = 64, max_tokens: int | None = None) -> "SentenceEncoder":
  """A :class:`SentenceEncoder` around sonar's ``TextToEmbeddingModelPipeline`` for ``encoder``.

  ``encoder``/``tokenizer``: card name or local path, ``device``/``dtype``: see the module doc;
  ``batch_size``/``max_tokens``: the defaults of :meth:`SentenceEncoder.encode`.

  Raises:
    SonarLoadError: if the model or tokenizer cannot be loaded.
    UserError: on a bad ``device``/``dtype``/``batch_size``/``max_tokens``.
  """
  from sonar.inference_pipelines.text import TextToEmbeddingModelPipeline
  _check_positive("batch_size", batch_size)
  _check_positive("max_tokens", max_tokens, allow_none=True)
  model, tok, dev, dt = _load("encoder", encoder, tokenizer, device, dtype)
  return SentenceEncoder(TextToEmbeddingModelPipeline(model, tok, device=dev, dtype=dt),
                         batch_size=batch_size, max_tokens=max_tokens)


def load_text_decoder(decoder: str = DEFAULT_DECODER, tokenizer: str | None = None,
                      device: str | None = None, dtype: str | None = None, *,
                      batch_size: int = 32) -> "EmbeddingDecoder":
  """An :class:`EmbeddingDecoder` around sonar's ``EmbeddingToTextModelPipeline`` for ``decoder``.

  ``decoder``/``tokenizer``: card name or local path, ``device``/``dtype``: see the module doc;
  ``batch_size``: the default of :meth:`EmbeddingDecoder.decode`.

  Raises:
    SonarLoadError: if the model or tokenizer cannot be loaded.
    UserError: on a bad ``device``/``dtype``/``batch_size``.
  """
  from sonar.inference_pipelines.text import EmbeddingToTextModelPipeline
  _check_positive("batch_size", batch_size)
  model, tok, dev, dt = _load("decoder", decoder, tokenizer, device, dtype)
  return EmbeddingDecoder(EmbeddingToTextModelPipeline(model, tok, device=dev, dtype=dt),
                          batch_size=batch_size)


def _model_dtype(model: Any) -> "torch.dtype":
  return next(model.parameters()).dtype


def _check_positive(name: str, value: int | None, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise UserError(f"{name}: expected a positive int, got {value!r}")


def _err(e: BaseException) -> str:
  """``Type: message`` without a trailing period (the caller adds its own sentence)."""
  return f"{type(e).__name__}: {str(e).strip().rstrip('.')}"


def _unknown_lang(lang: str, e: Exception) -> UserError:
  return UserError(f"lang: {lang!r} is not a language of this tokenizer ({e}); SONAR codes look "
                   "like eng_Latn, fra_Latn, deu_Latn")


# ----------------------------------------------------------------------------------------------
# Encoding

class SentenceEncoder:
  """Sentences -> SONAR embeddings (float32, input order), batched by token count.

  Wraps a sonar ``TextToEmbeddingModelPipeline`` (``self.pipeline``); see the module docstring
  for tokenization, truncation and batching. ``batch_size``/``max_tokens`` are the defaults of
  :meth:`encode`.
  """

  def __init__(self, pipeline: "TextToEmbeddingModelPipeline", *, batch_size: int = 64,
               max_tokens: int | None = None) -> None:
    _check_positive("batch_size", batch_size)
    _check_positive("max_tokens", max_tokens, allow_none=True)
    self.pipeline = pipeline
    self.model = pipeline.model
    self.tokenizer = pipeline.tokenizer
    self.device = pipeline.device
    self.dtype = _model_dtype(self.model)
    self.batch_size = int(batch_size)
    self.max_tokens = None if max_tokens is None else int(max_tokens)
    frontend = self.model.encoder_frontend
    pos = frontend.pos_encoder if frontend.pos_encoder is not None else \
        self.model.encoder.layers[0].self_attn.pos_encoder
    self.max_seq_len: int | None = None if pos is None else int(pos.max_seq_len)
    """Tokens kept per sentence, language tag included (514 for SONAR's basic architecture)."""
    pad = self.tokenizer.vocab_info.pad_idx
    self.pad_idx = 0 if pad is None else int(pad)
    pooler = getattr(self.model, "pooler", None)
    self.dim: int = int(pooler.projection_out.output_dim if pooler is not None
                        else frontend.embed.weight.shape[1])
    """Embedding size (1024 for SONAR)."""
    self._token_encoders: dict[str, Any] = {}

  @staticmethod
  def load(encoder: str = DEFAULT_ENCODER, tokenizer: str | None = None, *,
           device: str | None = None, dtype: str | None = None, batch_size: int = 64,
           max_tokens: int | None = None) -> "SentenceEncoder":
    """Same as :func:`load_text_encoder`."""
    return load_text_encoder(encoder, tokenizer, device, dtype, batch_size=batch_size,
                             max_tokens=max_tokens)

  def _token_encoder(self, lang: str) -> Any:
    enc = self._token_encoders.get(lang)
    if enc is None:
      from fairseq2.error import NotSupportedError
      try:  # CPU tensors: one copy per batch to the device instead of one per sentence.
        enc = self.tokenizer.create_encoder(lang=lang, mode="source")
      except (NotSupportedError, ValueError) as e:
        raise _unknown_lang(lang, e) from None
      self._token_encoders[lang] = enc
    return enc

  def tokenize(self, sentences: Sequence[str], lang: str) -> list["torch.Tensor"]:
    """Token ids per sentence (1-D int64 CPU tensors), truncated like sonar's ``predict``."""
    return self._tokenize(sentences, lang)[0]

  def _tokenize(self, sentences: Sequence[str], lang: str) -> tuple[list["torch.Tensor"], int]:
    encode = self._token_encoder(lang)
    n = self.max_seq_len
    out, cut = [], 0
    for i, s in enumerate(sentences):
      if not isinstance(s, str):
        raise TypeError(f"sentences[{i}]: expected str, got {type(s).__name__}")
      t = encode(s)
      if n is not None and t.shape[0] > n:
        t, cut = t[:n], cut + 1
      out.append(t)
    return out, cut

  def batches(self, lengths: Sequence[int], batch_size: int | None = None,
              max_tokens: int | None = None) -> list[np.ndarray]:
    """Index batches: longest first, <= batch_size rows and <= max_tokens padded tokens each."""
    batch_size = self.batch_size if batch_size is None else batch_size
    max_tokens = self.max_tokens if max_tokens is None else max_tokens
    _check_positive("batch_size", batch_size)
    _check_positive("max_tokens", max_tokens, allow_none=True)
    lens = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lens, kind="stable")
    out, start = [], 0
    while start < len(order):
      longest = int(lens[order[start]])
      rows = batch_size if max_tokens is None else max(1, min(batch_size,
                                                              max_tokens // max(longest, 1)))
      out.append(order[start:start + rows])
      start += rows
    return out

  def encode(self, sentences: Sequence[str], lang: str, *, batch_size: int | None = None,
             max_tokens: int | None = None) -> np.ndarray:
    """(len(sentences), dim) float32 SONAR embeddings, row i for sentences[i].

    Raises:
      UserError: unknown ``lang``, bad ``batch_size``/``max_tokens``.
      TypeError: a sentence that is not a string.
    """
    import torch
    from fairseq2.nn import BatchLayout
    from sonar.inference_pipelines.text import precision_context

    if isinstance(sentences, str):
      raise TypeError("sentences: expected a sequence of strings, got one string")
    tokens, n_cut = self._tokenize(sentences, lang)
    if not tokens:
      return np.zeros((0, self.dim), np.float32)
    if n_cut:
      warnings.warn(f"SONAR text encoder: {n_cut} of {len(tokens)} sentences truncated to "
                    f"{self.max_seq_len} tokens")
    lengths = [int(t.shape[0]) for t in tokens]
    batches = self.batches(lengths, batch_size, max_tokens)
    results = []
    with torch.inference_mode(), precision_context(self.dtype):
      for idx in batches:
        rows = [tokens[i] for i in idx]
        seqs = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True,
                                               padding_value=self.pad_idx).to(self.device)
        layout = BatchLayout.of(seqs, [lengths[i] for i in idx])
        results.append(self.model(seqs, layout).sentence_embeddings)
      emb = torch.cat(results).float().cpu().numpy()
    out = np.empty_like(emb)
    out[np.concatenate(batches)] = emb
    return out


# ----------------------------------------------------------------------------------------------
# Decoding

class EmbeddingDecoder:
  """SONAR embeddings -> text with beam search, one string per row, in order.

  Wraps a sonar ``EmbeddingToTextModelPipeline`` (``self.pipeline``); ``batch_size`` is the
  default of :meth:`decode`. See the module docstring for ``max_len``.
  """

  def __init__(self, pipeline: "EmbeddingToTextModelPipeline", *, batch_size: int = 32) -> None:
    _check_positive("batch_size", batch_size)
    self.pipeline = pipeline
    self.model = pipeline.model.decoder
    self.tokenizer = pipeline.tokenizer
    self.device = pipeline.device
    self.dtype = _model_dtype(self.model)
    self.batch_size = int(batch_size)
    attn = self.model.decoder.layers[0].encoder_decoder_attn
    self.dim: int = int(attn.k_proj.input_dim)
    """Embedding size the decoder accepts (1024 for SONAR)."""
    self.max_seq_len: int = int(self.model.max_target_seq_len)

  @staticmethod
  def load(decoder: str = DEFAULT_DECODER, tokenizer: str | None = None, *,
           device: str | None = None, dtype: str | None = None,
           batch_size: int = 32) -> "EmbeddingDecoder":
    """Same as :func:`load_text_decoder`."""
    return load_text_decoder(decoder, tokenizer, device, dtype, batch_size=batch_size)

  def check_embeddings(self, embeddings: Any, name: str = "embeddings") -> np.ndarray:
    """``embeddings`` as a finite float32 (n, dim) array; UserError naming ``name`` if not."""
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise UserError(f"{name}: expected shape (n, {self.dim}) for this decoder (dim "
                      f"{self.dim}), got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
      raise UserError(f"{name}: expected floats, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
      bad = int(np.argwhere(~np.isfinite(x))[0, 0])
      raise UserError(f"{name}: row {bad} is not finite")
    return x

  def check_lang(self, lang: str) -> None:
    """Raises UserError if the tokenizer does not know the language code ``lang``."""
    from fairseq2.error import NotSupportedError
    try:
      self.tokenizer.create_encoder(lang=lang, mode="target")
    except (NotSupportedError, ValueError) as e:
      raise _unknown_lang(lang, e) from None

  def decode(self, embeddings: np.ndarray, target_lang: str, beam_size: int = 5,
             max_len: int = 256, batch_size: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> list[str]:
    """One decoded string per row of ``embeddings`` (n, dim), in order.

    ``progress(done, total)`` is called after every batch if given.

    Raises:
      UserError: wrong shape/dim or non-finite values, unknown ``target_lang``, bad settings.
    """
    import torch

    x = self.check_embeddings(embeddings)
    batch_size = self.batch_size if batch_size is None else batch_size
    _check_positive("batch_size", batch_size)
    _check_positive("beam_size", beam_size)
    _check_positive("max_len", max_len)
    if max_len < 3:
      raise UserError(f"max_len: {max_len} leaves no room for a token after the 2-token "
                      "prefix </s> __lang__; use >= 3")
    self.check_lang(target_lang)
    n = len(x)
    texts: list[str] = []
    if n == 0:
      return texts
    t = torch.from_numpy(x).to(device=self.device, dtype=self.dtype)
    for start in range(0, n, batch_size):
      texts += self.pipeline.predict(t[start:start + batch_size], target_lang=target_lang,
                                     batch_size=batch_size, beam_size=int(beam_size),
                                     max_seq_len=int(max_len), max_gen_len=(0, int(max_len)))
      if progress is not None:
        progress(len(texts), n)
    return texts


# ----------------------------------------------------------------------------------------------
# Tiny random models

_WORDS = {
    "eng": ("the a an and or but of to in on at for with from by about into over after before "
            "under between cat dog bird horse cow fish house tree river city road car train "
            "school book letter table window door garden mountain sea sun moon star water fire "
            "bread milk coffee tea apple child woman man friend teacher doctor family people "
            "day night week year morning evening today yesterday tomorrow is are was were has "
            "have had will would can could should must see saw walk walked run ran eat ate "
            "drink write wrote read speak spoke think thought know knew make made take took give "
            "gave find found tell told ask asked work worked play played live lived big small "
            "old new good bad long short happy sad red blue green white black quickly slowly "
            "very never always often here there this that these those he she it we they I you "
            "my your his her our their end text"),
    "fra": ("le la les un une des et ou mais de du au aux dans sur sous avec pour par chat "
            "chien oiseau cheval maison arbre rivière ville route voiture école livre lettre "
            "table fenêtre porte jardin montagne mer soleil lune étoile eau feu pain lait café "
            "thé pomme enfant femme homme ami professeur médecin famille jour nuit semaine "
            "année matin soir aujourd'hui hier demain est sont était étaient a ont avait sera "
            "peut doit voir vu marcher courir manger boire écrire lire parler penser savoir "
            "faire prendre donner trouver dire grand petit vieux nouveau bon mauvais long court "
            "heureux triste rouge bleu vert blanc noir vite lentement très jamais toujours "
            "souvent ici là ce cette ces il elle nous vous ils elles je tu mon ton son notre "
            "leur fin texte où été déjà"),
    "deu": ("der die das ein eine und oder aber von zu in auf an für mit aus bei über unter "
            "nach vor zwischen Katze Hund Vogel Pferd Kuh Fisch Haus Baum Fluss Stadt Straße "
            "Auto Zug Schule Buch Brief Tisch Fenster Tür Garten Berg Meer Sonne Mond Stern "
            "Wasser Feuer Brot Milch Kaffee Tee Apfel Kind Frau Mann Freund Lehrer Arzt Familie "
            "Tag Nacht Woche Jahr Morgen Abend heute gestern morgen ist sind war waren hat "
            "haben hatte wird kann muss sehen gehen laufen essen trinken schreiben lesen "
            "sprechen denken wissen machen nehmen geben finden sagen groß klein alt neu gut "
            "schlecht lang kurz glücklich traurig rot blau grün weiß schwarz schnell langsam "
            "sehr nie immer oft hier dort dieser diese dieses er sie es wir ihr ich du mein "
            "dein sein unser Ende Text schön müde Größe"),
}
_SYLLABLES = ("ka ri to mu ne sa lo pi de va ze ru mo fi ta no be li gu sho tra bel kor dan "
              "mer vis pol ste gra fen lun dor").split()
_PUNCT = (".", ".", ".", "!", "?", ",")
_CROSS_ATTN_GAIN = 8.0


def _tiny_corpus(num_sentences: int = 6000) -> list[str]:
  """A fixed generated corpus (words of three languages, pseudo-words, numbers, punctuation)."""
  rng = random.Random(20240101)  # fixed: the tokenizer is the same for every seed
  words = {k: v.split() for k, v in _WORDS.items()}
  pseudo = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
                   for _ in range(600)})
  out = ["End of text.", "Fin du texte.", "Ende des Textes."]
  langs = sorted(words)
  while len(out) < num_sentences:
    vocab = words[langs[len(out) % len(langs)]]
    n = rng.randint(3, 16)
    toks = []
    for j in range(n):
      r = rng.random()
      w = rng.choice(pseudo) if r < 0.15 else str(rng.randint(0, 2025)) if r < 0.18 else \
          rng.choice(vocab)
      toks.append(w.capitalize() if j == 0 else w)
      if j < n - 1 and rng.random() < 0.08:
        toks[-1] += ","
    out.append(" ".join(toks) + rng.choice(_PUNCT))
  return out


def _train_sentencepiece(vocab_size: int) -> bytes:
  """Trains a unigram sentencepiece model like NLLB's (unk 0, <s> 1, </s> 2, no pad)."""
  import sentencepiece as spm
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_tiny_corpus()), model_writer=buf, vocab_size=vocab_size,
      model_type="unigram", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      num_threads=1, shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2)
  return buf.getvalue()


def tiny_sonar_paths(out_dir: str) -> dict[str, str]:
  """What :func:`build_tiny_sonar` writes in ``out_dir`` (and what the loading flags accept).

  ``encoder``/``decoder``: card ``.yaml`` paths (for ``--encoder``/``--decoder``);
  ``tokenizer``: the sentencepiece model; ``encoder_card``/``decoder_card``: the card names (for
  use with ``FAIRSEQ2_USER_ASSET_DIR=card_dir``); ``card_dir``: ``out_dir``; ``info``: the json.
  """
  d = os.path.abspath(out_dir)
  return dict(card_dir=d, encoder=os.path.join(d, f"{TINY_ENCODER}.yaml"),
              decoder=os.path.join(d, f"{TINY_DECODER}.yaml"),
              tokenizer=os.path.join(d, TINY_TOKENIZER_FILE), encoder_card=TINY_ENCODER,
              decoder_card=TINY_DECODER, info=os.path.join(d, TINY_INFO_FILE))


def _card_text(name: str, family: str, overrides: Mapping[str, Any], langs: Sequence[str],
               comment: str) -> str:
  import yaml
  card = {"name": name, "model_family": family, "model_arch": "basic",
          "model_config": {"_set_": dict(overrides)},
          "checkpoint": f"{name}.pt", "tokenizer": TINY_TOKENIZER_FILE,
          "tokenizer_family": "nllb",
          "tokenizer_config": {"_set_": {"default_lang": DEFAULT_LANG, "langs": list(langs)}}}
  return comment + yaml.safe_dump(card, sort_keys=False, allow_unicode=True, width=100)


def build_tiny_sonar(out_dir: str, seed: int = 0, dim: int = TINY_DEFAULTS["dim"], *,
                     num_layers: int = TINY_DEFAULTS["num_layers"],
                     num_heads: int = TINY_DEFAULTS["num_heads"], ffn_dim: int | None = None,
                     vocab_size: int = TINY_DEFAULTS["vocab_size"],
                     overwrite: bool = False) -> dict[str, str]:
  """Writes a tiny random SONAR text encoder + decoder + tokenizer with cards (module doc).

  ``dim`` is the model and embedding size (a multiple of ``num_heads``), ``num_layers`` the
  encoder and decoder depth, ``ffn_dim`` the FFN size (default ``4 * dim``), ``vocab_size`` the
  sentencepiece vocabulary (the model's is 206 larger: ``<pad>``, 202 language tags and 3 NLLB
  control symbols). Returns :func:`tiny_sonar_paths`.

  Raises:
    UserError: on a bad argument, or if ``out_dir`` exists, is not empty and ``overwrite`` is
      False.
  """
  for name, v in (("dim", dim), ("num_layers", num_layers), ("num_heads", num_heads),
                  ("vocab_size", vocab_size)):
    _check_positive(name, v)
  ffn_dim = 4 * dim if ffn_dim is None else ffn_dim
  _check_positive("ffn_dim", ffn_dim)
  if dim % num_heads or (dim // num_heads) % 2:
    raise UserError(f"dim: {dim} must be a multiple of 2 * num_heads ({2 * num_heads})")
  if vocab_size < 100:
    raise UserError(f"vocab_size: {vocab_size} is too small (>= 100)")
  out = os.path.abspath(out_dir)
  if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)) and not overwrite:
    raise UserError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
  import torch
  from fairseq2.data.tokenizers import load_tokenizer
  from fairseq2.device import CPU
  from sonar.models.sonar_text import get_sonar_text_decoder_hub, get_sonar_text_encoder_hub

  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out)}-", dir=parent)
  try:
    sp_bytes = _train_sentencepiece(vocab_size)
    with open(os.path.join(tmp, TINY_TOKENIZER_FILE), "wb") as f:
      f.write(sp_bytes)
    langs = sonar_languages()
    import sentencepiece as spm
    sp_size = spm.SentencePieceProcessor(model_proto=sp_bytes).get_piece_size()
    # fairseq2's NLLB loader adds one control symbol per language, 3 NLLB data tags and <pad>@0.
    full_vocab = sp_size + len(langs) + 4
    vocab_info = dict(size=full_vocab, unk_idx=1, bos_idx=2, eos_idx=3, pad_idx=1)  # as "basic"
    common = dict(model_dim=dim, vocab_info=vocab_info, num_encoder_layers=num_layers,
                  num_decoder_layers=num_layers, num_encoder_attn_heads=num_heads,
                  num_decoder_attn_heads=num_heads, ffn_inner_dim=ffn_dim)
    comment = (f"# Tiny SONAR text {{}} with RANDOM weights (data_prep.sonar.build_tiny_sonar, "
               f"seed {seed}, dim {dim}): for tests only.\n")
    parts = ((TINY_ENCODER, ENCODER_FAMILY, "encoder", get_sonar_text_encoder_hub, 0),
             (TINY_DECODER, DECODER_FAMILY, "decoder", get_sonar_text_decoder_hub, 1))
    for name, family, kind, hub, offset in parts:
      card_path = os.path.join(tmp, f"{name}.yaml")
      with open(card_path, "w", encoding="utf-8") as f:
        f.write(_card_text(name, family, common, langs, comment.format(kind)))
      # The config comes from the card, as load_model will build it; weights from the factory.
      config = hub().get_model_config(_load_card_file(card_path, kind))
      with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 2 + offset)
        model = hub().create_new_model(config, device=CPU, dtype=torch.float32)
      if kind == "decoder":
        with torch.no_grad():  # Make the random text depend on the embedding (module doc).
          for layer in model.decoder.layers:
            layer.encoder_decoder_attn.v_proj.weight.mul_(_CROSS_ATTN_GAIN)
            layer.encoder_decoder_attn.output_proj.weight.mul_(_CROSS_ATTN_GAIN)
      torch.save({"model": model.state_dict()}, os.path.join(tmp, f"{name}.pt"))
    tok = load_tokenizer(_load_card_file(os.path.join(tmp, f"{TINY_ENCODER}.yaml"), "tokenizer"))
    if tok.vocab_info.size != full_vocab:  # the card and the tokenizer must agree
      raise AssertionError(f"tokenizer vocabulary {tok.vocab_info.size} != {full_vocab}")
    info = dict(tool="data_prep.sonar.build_tiny_sonar", seed=seed, dim=dim,
                num_layers=num_layers, num_heads=num_heads, ffn_dim=ffn_dim,
                sentencepiece_vocab_size=sp_size, model_vocab_size=full_vocab,
                cards=[TINY_ENCODER, TINY_DECODER], tokenizer=TINY_TOKENIZER_FILE)
    with open(os.path.join(tmp, TINY_INFO_FILE), "w", encoding="utf-8") as f:
      json.dump(info, f, indent=2)
      f.write("\n")
    normalizer_lib.apply_umask_permissions(tmp)
    schema.move_dir_into_place(tmp, out, overwrite)
    tmp = None
  finally:
    if tmp is not None and os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return tiny_sonar_paths(out)


def ensure_tiny_sonar(out_dir: str, seed: int = 0, dim: int = TINY_DEFAULTS["dim"],
                      **kwargs: Any) -> dict[str, str]:
  """:func:`tiny_sonar_paths`, building the models first if ``out_dir`` has none.

  Safe to call from several processes at once (each builds privately; the first rename wins).

  Raises:
    UserError: if ``out_dir`` holds tiny models built with another ``seed`` or ``dim``.
  """
  paths = tiny_sonar_paths(out_dir)
  if not os.path.exists(paths["info"]):
    try:
      return build_tiny_sonar(out_dir, seed, dim, **kwargs)
    except (ValueError, OSError):
      if not os.path.exists(paths["info"]):
        raise
  with open(paths["info"], encoding="utf-8") as f:
    info = json.load(f)
  if info.get("seed") != seed or info.get("dim") != dim:
    raise UserError(f"{paths['info']}: holds tiny SONAR models with seed {info.get('seed')}, "
                    f"dim {info.get('dim')}; expected seed {seed}, dim {dim}")
  return paths

