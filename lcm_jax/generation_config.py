"""Generation settings and results shared by the JAX generator (:mod:`lcm_jax.generate`, which
re-exports every name here) and the PyTorch one (:mod:`lcm_interop.torch_generate`, which must run
without JAX): :class:`GenerationConfig` (stopping rules, Base-LCM latent sampling), the stop-reason
codes, :class:`GenerationResult`, :func:`may_stop_early`, :func:`pad_prompts` and
:func:`latent_sampling_from_flags`. NumPy and the standard library only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from lcm_jax import errors

STOP_REASONS = ("running", "eot", "repetition", "max_len")
"""Stop reason codes: index = code. ``running`` only appears for rows that were never active."""
RUNNING, EOT, REPETITION, MAX_LEN = range(4)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """Stopping rules and Base-LCM sampling. Frozen (usable as a jit static argument).

  Names and semantics follow the reference's ``LCMGeneratorOptions`` / ``LCMGenerator.__call__``
  (``max_len`` is its ``max_gen_len``), see :func:`may_stop_early`.
  """

  max_len: int = 64
  """Most concepts generated per prompt (the reference's ``max_gen_len``)."""
  min_gen_len: int = 1
  """An EOT/repetition stop needs ``min_gen_len`` (>= 1) generated concepts BEFORE the one that
  triggers it: the k-th generated concept (1-based) may stop a row only if
  ``k > min_gen_len``, so the first generated concept never stops one (the reference's rule and
  default, 1)."""
  eot_threshold: float = 0.9
  """Stop when cosine(concept, end-of-text vector) >= this (needs an end-of-text vector)."""
  repetition_threshold: Optional[float] = None
  """Stop when cosine(concept, previous concept) >= this; None = off (the paper uses 0.9)."""
  sample_latent_variable: bool = False
  """Base-LCM: add ``temperature * N(0, I)`` (normalized space) to each prediction. OFF by
  default (deterministic, as the reference's evaluation recipes run it); the reference
  generator's own default is on, with temperature 1.0."""
  temperature: float = 1.0
  """Base-LCM: the std of the latent noise when ``sample_latent_variable`` (the reference's
  ``lcm_temperature``, default 1.0); 0 adds none."""

  def validate(self) -> None:
    """Raises :class:`~lcm_jax.errors.UserError` naming the field if a setting is out of range."""
    for name, low in (("max_len", 1), ("min_gen_len", 1)):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
        raise errors.UserError(f"GenerationConfig.{name}: expected an int >= {low}, got {v!r}")
    if not -1.0 <= float(self.eot_threshold) <= 1.0:
      raise errors.UserError(f"GenerationConfig.eot_threshold: expected a cosine in [-1, 1], got "
                             f"{self.eot_threshold!r}")
    if self.repetition_threshold is not None and not -1.0 <= float(
        self.repetition_threshold) <= 1.0:
      raise errors.UserError(f"GenerationConfig.repetition_threshold: expected a cosine in "
                             f"[-1, 1] or None, got {self.repetition_threshold!r}")
    if not isinstance(self.sample_latent_variable, (bool, np.bool_)):
      raise errors.UserError(f"GenerationConfig.sample_latent_variable: expected a bool, got "
                             f"{self.sample_latent_variable!r}")
    if not float(self.temperature) >= 0.0:
      raise errors.UserError(f"GenerationConfig.temperature: expected >= 0, got "
                             f"{self.temperature!r}")

  @property
  def latent_noise_scale(self) -> float:
    """The std of the Base-LCM latent noise actually added (0 = none)."""
    return float(self.temperature) if self.sample_latent_variable else 0.0


def may_stop_early(count: Any, config: GenerationConfig) -> Any:
  """Whether the ``count``-th generated concept (1-based) may stop a row on EOT/repetition.

  The reference (``LCMGenerator.finalize_step``) allows it when ``step_nr - prompt_len >=
  min_gen_len``, where ``step_nr`` is the position of the concept being written (the first
  generated one is at ``prompt_len``), i.e. ``count - 1 >= min_gen_len``.
  """
  return count - 1 >= config.min_gen_len


@dataclasses.dataclass
class GenerationResult:
  """Generated concepts of one batch (host NumPy arrays)."""

  embeddings: np.ndarray
  """(B, max_len, S) float32, raw SONAR space; zeros past ``lengths[b]``."""
  lengths: np.ndarray
  """(B,) int32 number of generated concepts."""
  stop_reasons: np.ndarray
  """(B,) int32 codes into :data:`STOP_REASONS`."""

  def reason_names(self) -> np.ndarray:
    """``stop_reasons`` as strings."""
    return np.asarray([STOP_REASONS[int(r)] for r in self.stop_reasons])


# ----------------------------------------------------------------------------------------------
# Small helpers

def pad_prompts(prompts: Sequence[np.ndarray], dim: int,
                length: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads prompts (each (n_i, dim), n_i >= 1) -> (B, L, dim) float32 and lengths (B,) int32.

  ``length`` (default: the longest prompt) must be >= every n_i.
  """
  if not prompts:
    raise errors.UserError("pad_prompts: no prompts")
  lengths = []
  for i, p in enumerate(prompts):
    shape = np.shape(p)
    if len(shape) != 2 or shape[1] != dim:
      raise errors.UserError(f"prompt {i}: shape {shape}, expected (n, {dim})")
    if shape[0] < 1:
      raise errors.UserError(f"prompt {i}: empty prompt (0 concepts)")
    lengths.append(shape[0])
  longest = max(lengths)
  length = longest if length is None else length
  if length < longest:
    raise errors.UserError(f"pad_prompts: length {length} < longest prompt {longest}")
  out = np.zeros((len(prompts), length, dim), np.float32)
  for i, p in enumerate(prompts):
    out[i, :lengths[i]] = np.asarray(p, np.float32)
  return out, np.asarray(lengths, np.int32)


def latent_sampling_from_flags(sample_flag: Optional[bool], temperature: float,
                               temperature_given: bool) -> bool:
  """``sample_latent_variable`` of a tool's flags: the flag when given; otherwise on exactly when
  a temperature > 0 was given explicitly (as ``--temperature=T`` alone samples in the reference,
  whose default is on), off when neither is given (our default)."""
  if sample_flag is not None:
    return bool(sample_flag)
  return bool(temperature_given and temperature > 0)
