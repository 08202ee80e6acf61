"""The model configuration: one frozen, hashable dataclass shared by every model family.

Field names and defaults mirror ``configs/base.py:model_config()`` (the reference's names). Build it
from a recipe with :meth:`ModelConfig.from_config`, which rejects unknown fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from lcm_jax.errors import ConfigError
from lcm_jax.schedules import BETA_SCHEDULES, LOSS_WEIGHTINGS
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of an LCM. Frozen, so usable as a jit static arg."""

  family: str = ""
  """Model family, a name in :data:`lcm_jax.families.REGISTRY` (checked where the family is
  looked up: :func:`lcm_jax.families.model_config`; the recipes set it)."""
  sonar_embed_dim: int = 1024
  """SONAR space size: input of the pre-net, output of the post-net."""
  model_dim: int = 2048
  """Width of the transformer residual stream."""
  num_layers: int = 32
  """Number of decoder layers."""
  num_heads: int = 16
  """Attention heads; ``model_dim / num_heads`` must be an even integer (RoPE pairs)."""
  ffn_inner_dim: int = 8192
  """FFN size before the SwiGLU 2/3-and-round-up rule (see :attr:`swiglu_inner_dim`)."""
  ffn_multiple_of: int = 256
  """The SwiGLU inner size is rounded up to a multiple of this."""
  max_seq_len: int = 4096
  """Longest sequence (concepts) the model is meant for; RoPE itself has no limit."""
  dropout: float = 0.1
  """Dropout on attention and FFN sub-block outputs (none on attention weights)."""
  rope_theta: float = 10000.0
  """RoPE base."""
  norm_eps: float = 1e-5
  """RMSNorm epsilon."""
  dtype: str = "auto"
  """Compute dtype of matmuls: ``auto`` = bfloat16 on GPU/TPU, float32 on CPU."""
  param_dtype: str = "float32"
  """Dtype parameters are created and stored in."""
  scan_layers: bool = True
  """``nn.scan`` over layers (params stacked on a leading ``layers`` axis)."""
  remat_policy: str = "none"
  """Rematerialisation: none | full | dots_saveable | dots_with_no_batch_dims_saveable."""
  attention_impl: str = "auto"
  """Attention kernel (:mod:`lcm_jax.attention`): auto | xla | cudnn | splash. ``auto`` = xla on
  CPU and TPU, cudnn on GPU. A kernel named for the wrong platform is an error; a call it cannot
  run (dtype, head_dim, mask) falls back to xla with a logged reason. No parameter depends on it
  (a run may resume with another value)."""

  # --- The diffusion families (Two-Tower, One-Tower). In the Two-Tower
  # ``num_layers`` is the contextualizer depth; the denoiser has ``denoiser_num_layers``.
  denoiser_num_layers: int = 13
  """Denoiser layers (self-attention, cross-attention, FFN, each AdaLN-modulated)."""
  timestep_embed_dim: int = 256
  """Sinusoidal timestep features (cos half first) fed to ``denoiser.embed_time.fc1``."""
  num_diffusion_train_steps: int = 100
  """Training timesteps T; t is an integer in [0, T)."""
  beta_schedule: str = "squaredcos_cap_v2"
  """Noise schedule: squaredcos_cap_v2 | sigmoid | linear | scaled_linear."""
  beta_start: float = 0.0001
  """First beta of the linear / scaled_linear schedules."""
  beta_end: float = 0.02
  """Last beta of the linear / scaled_linear schedules."""
  sigmoid_alpha: float = 1.5
  """Sigmoid schedule (paper eq. 14) scale."""
  sigmoid_beta: float = 0.0
  """Sigmoid schedule (paper eq. 14) shift."""
  rescale_zero_terminal_snr: bool = True
  """Rescale the schedule so alpha_bar[T-1] = 0 (zero terminal SNR)."""
  loss_weighting: str = "none"
  """Per-position loss weight w(t): none | clamped_snr | fragility."""
  snr_clamp_min: float = 0.0
  """clamped_snr: lower clamp of SNR(t)."""
  snr_clamp_max: float = 5.0
  """clamped_snr: upper clamp of SNR(t)."""
  fragility_a: float = -4.0
  """fragility weighting slope a."""
  fragility_b: float = 3.5
  """fragility weighting offset b."""
  cfg_dropout: float = 0.15
  """Probability that a position's conditioning is dropped in training (classifier-free guidance)."""

  def __post_init__(self) -> None:
    for name in ("sonar_embed_dim", "model_dim", "num_layers", "num_heads", "ffn_inner_dim",
                 "ffn_multiple_of", "max_seq_len", "denoiser_num_layers", "timestep_embed_dim",
                 "num_diffusion_train_steps"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"ModelConfig.{name}: expected a positive int, got {value!r}")
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ConfigError(f"ModelConfig.dropout: expected 0 <= dropout < 1, got {self.dropout!r}")
    if self.dtype not in DTYPES:
      raise ConfigError(f"ModelConfig.dtype: {self.dtype!r} not in {DTYPES}")
    if self.param_dtype not in DTYPES[1:]:
      raise ConfigError(f"ModelConfig.param_dtype: {self.param_dtype!r} not in {DTYPES[1:]}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f"ModelConfig.remat_policy: {self.remat_policy!r} not in {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"ModelConfig.attention_impl: {self.attention_impl!r} not in "
                        f"{ATTENTION_IMPLS}")
    if self.beta_schedule not in BETA_SCHEDULES:
      raise ConfigError(f"ModelConfig.beta_schedule: {self.beta_schedule!r} not in {BETA_SCHEDULES}")
    if self.loss_weighting not in LOSS_WEIGHTINGS:
      raise ConfigError(f"ModelConfig.loss_weighting: {self.loss_weighting!r} not in "
                       f"{LOSS_WEIGHTINGS}")
    if self.timestep_embed_dim % 2:
      raise ConfigError(f"ModelConfig.timestep_embed_dim: must be even, got {self.timestep_embed_dim}")
    if not 0.0 <= float(self.cfg_dropout) < 1.0:
      raise ConfigError(f"ModelConfig.cfg_dropout: expected 0 <= cfg_dropout < 1, got "
                       f"{self.cfg_dropout!r}")
    _ = self.head_dim  # validates num_heads / model_dim

  @classmethod
  def field_names(cls) -> tuple[str, ...]:
    """The names of all fields, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls))

  @classmethod
  def from_config(cls, cfg: Any) -> "ModelConfig":
    """Builds a config from a dict, an ``ml_collections.ConfigDict`` or a :class:`ModelConfig`.

    Missing fields take the defaults above; unknown fields raise ``ValueError`` naming them.
    """
    if isinstance(cfg, ModelConfig):
      return cfg
    if hasattr(cfg, "to_dict"):
      cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
      raise TypeError(f"ModelConfig.from_config: expected a dict or ConfigDict, got {type(cfg)}")
    known = set(cls.field_names())
    unknown = sorted(set(cfg) - known)
    if unknown:
      raise ConfigError(f"config.model: unknown field(s) {unknown}; "
                       f"ModelConfig accepts {sorted(known)}")
    return cls(**dict(cfg))

  @property
  def head_dim(self) -> int:
    """Per-head size; must divide ``model_dim`` and be even (RoPE rotates pairs)."""
    if self.model_dim % self.num_heads:
      raise ConfigError(f"ModelConfig: model_dim {self.model_dim} is not divisible by "
                       f"num_heads {self.num_heads}")
    head_dim = self.model_dim // self.num_heads
    if head_dim % 2:
      raise ConfigError(f"ModelConfig: head_dim {head_dim} (model_dim / num_heads) must be even "
                       "for rotary embeddings")
    return head_dim

  @property
  def swiglu_inner_dim(self) -> int:
    """``ffn_inner_dim * 2/3`` rounded UP to a multiple of ``ffn_multiple_of`` (8192 -> 5632).

    As the reference (fairseq2's GLU FFN) does it: ``int(ffn_inner_dim * 2/3)`` first (truncation),
    then rounded up, so the size always matches a reference checkpoint.
    """
    inner = int(self.ffn_inner_dim * (2 / 3))
    m = self.ffn_multiple_of
    return m * ((inner + m - 1) // m)

  # JAX is imported in the two methods below only: the PyTorch side (lcm_interop) reads
  # ModelConfig and must run without JAX.
  def compute_dtype(self) -> np.dtype:
    """The matmul dtype; ``auto`` is bfloat16 on GPU/TPU and float32 on CPU."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    if self.dtype == "auto":
      return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32)
    return jnp.dtype(self.dtype)

  def parameter_dtype(self) -> np.dtype:
    """The dtype parameters are created in (``param_dtype`` as a NumPy dtype)."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes: Any) -> "ModelConfig":
    """A copy with some fields changed."""
    return dataclasses.replace(self, **changes)
