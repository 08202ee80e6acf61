r"""Concept generation with a KV cache, for every model family, plus the CLI.

  python -m lcm_jax.generate --workdir=W --prompts=prompts.npz --out=generated.npz \
      [--step=S] [--config=FILE[:VARIANT]] [--max_len=64 --min_gen_len=1] \
      [--eot_vector=data/synthetic/process.npz --eot_threshold=0.9] [--repetition_threshold=0.9] \
      [--[no]sample_latent_variable --temperature=1.0]    # Base-LCM latent noise (default off)
      [--num_steps=40 --guidance_scale=3 --guidance_rescale=0.7 --initial_noise_scale=0.6 \
       --epsilon_scaling=1.00045 --eta=0 --timestep_spacing=trailing_reference \
       --clip_noise=100 --[no]clip_sample --clip_sample_range=1 --[no]thresholding \
       --dynamic_thresholding_ratio=0.995 --sample_max_value=6]                    # Two-Tower
      [--seed=0 --batch_size=8]

How a batch is generated (:class:`Generator`):
  1. Prompts (raw SONAR space, (n_i, S) each, n_i >= 1) are right-padded to the longest; a KV
     cache of ``longest + max_len`` slots is prefilled with them in one call (all rows from slot 0;
     row ``b``'s concept ``j`` sits at slot ``j`` = its document position ``j``).
  2. Concept ``k`` (k = 0, 1, ...) of row ``b`` is predicted at document position ``n_b + k``:
       * Base-LCM: the post-net output at position ``n_b + k - 1`` (normalized space), plus
         ``temperature * N(0, I)`` if ``sample_latent_variable`` (off by default; the reference
         generator's default is on with temperature 1.0, its evaluation recipes turn it off),
         denormalized. On the CLI, ``--temperature=T > 0`` without ``--[no]sample_latent_variable``
         turns sampling on (as that flag alone does in the reference);
       * Two-Tower: the DDIM sampler (:func:`lcm_jax.diffusion.sample`) over ONE query per row whose
         cross-attention sees a per-row K/V buffer (denoiser_layers, B, slots + 1, H, D): the zero
         slot at index 0 and the contextualizer output of position ``j`` at index ``j + 1``. The
         conditional half sees slots ``<= n_b + k`` (zero slot + context positions < n_b + k),
         the unconditional half the zero slot only; both run as one batch of 2B when guided.
         The result (normalized x0) is denormalized.
     Then the stopping rules run (below), the concept is written to the outputs of every row that
     is still running, and it is fed back: one cached call at slot/position ``n_b + k`` (Two-Tower:
     the contextualizer's cache, and the new context vector's cross K/V appended to the buffer).
  3. The loop is ONE jitted ``jax.lax.while_loop`` (``loop="while"``, the default) that ends when
     every row has stopped; ``loop="python"`` runs the same jitted step from a Python loop (one
     host sync per concept). Both give identical outputs.

Stopping, per row (rows that stopped are frozen: their outputs, length and reason no longer
change while the other rows continue). For the k-th generated concept (1-based count ``k``):
  * ``eot``: ``cosine(concept, eot_vector) >= eot_threshold`` (raw SONAR space; only when an
    end-of-text vector is given). The concept that triggers it IS kept as the row's last output
    (it is the model's "End of text." prediction; drop it downstream if unwanted);
  * ``repetition``: ``cosine(concept, previous concept) >= repetition_threshold`` (raw space;
    the previous concept is the last prompt concept for k = 1); off unless a threshold is given
    (the paper uses 0.9). The repeated concept is kept too;
  * neither can fire unless ``k - 1 >= min_gen_len`` (>= 1, default 1): the first generated
    concept never stops a row, whatever it is (the reference's ``min_gen_len`` rule); EOT wins
    over repetition when both fire;
  * ``max_len``: the row stops after ``max_len`` generated concepts.

Prompt file formats (``--prompts``), all in raw SONAR space:
  * ``.npz`` with one array per prompt under keys ``prompt_<id>`` (each (n, S)); ids are the
    suffixes, in file order;
  * ``.npz`` with ``embeddings`` (B, L, S) right-padded and ``lengths`` (B,) [+ ``ids`` (B,) str]
    -- the layout of the output file, so outputs can be fed back as prompts;
  * an lcm_jax dataset directory (``manifest.json`` + ArrayRecord shards, :mod:`lcm_jax.schema`)
    or a single ``.array_record`` shard: one prompt per document, ids = document ids.

Output file (``--out``, ``.npz``, written atomically: temporary name in the same directory, then
rename): ``ids`` (B,) str, ``embeddings`` (B, max_len, S) float32 raw SONAR space, zero past each
row's length, ``lengths`` (B,) int32 generated concepts, ``stop_reasons`` (B,) str in
``eot | repetition | max_len``, ``prompt_lengths`` (B,) int32, ``step`` () int64 (checkpoint).

User errors (bad flags, a prompt of the wrong dimension or with zero concepts, a workdir without
checkpoints, bad sampler settings, an ``--out`` that is a directory or not writable) print one
``error: ...`` line naming the file/field or flag and exit with status 2; no output file is
written. (``--out``'s missing parent directories are created.)
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import checkpoint as ckpt_lib
from lcm_jax import diffusion
from lcm_jax import errors
from lcm_jax import families
from lcm_jax import schema
from lcm_jax.decoding import cosine, denormalize, latent_noise, normalizer_buffers, step_rng
# The JAX-free settings, results and stop codes (shared with lcm_interop.torch_generate).
from lcm_jax.generation_config import (EOT, MAX_LEN, REPETITION, RUNNING,  # noqa: F401
                                       STOP_REASONS, GenerationConfig, GenerationResult,
                                       latent_sampling_from_flags, may_stop_early, pad_prompts)
from lcm_jax.models.config import ModelConfig
from lcm_jax.normalizer import write_npz_atomic

Array = jax.Array
Variables = dict[str, Any]
__all__ = ["Generator", "GenerationConfig", "GenerationResult", "generate", "pad_prompts",
           "load_prompts", "load_eot_vector", "cosine", "denormalize", "latent_noise",
           "normalizer_buffers", "step_rng"]

LOOPS = ("while", "python")


# ----------------------------------------------------------------------------------------------
# The generator

class Generator:
  """Jitted batched generation for one model and one set of settings (compiled once per shape).

  Args:
    model: a ``BaseLCM`` or ``TwoTowerLCM`` module (``model.config.family`` picks the path).
    config: stopping rules (and Base-LCM temperature), validated here.
    sampler: Two-Tower DDIM settings (default :class:`~lcm_jax.diffusion.SamplerConfig`),
      validated against ``num_diffusion_train_steps``; ignored for Base-LCM.
    eot_vector: optional (S,) raw-space end-of-text vector; None turns the EOT stop off.
    loop: ``while`` (one ``lax.while_loop`` in one jit) or ``python`` (a jitted step per concept).
  """

  def __init__(self, model: Any, config: GenerationConfig = GenerationConfig(), *,
               sampler: Optional[diffusion.SamplerConfig] = None,
               eot_vector: Optional[np.ndarray] = None, loop: str = "while"):
    cfg: ModelConfig = model.config
    config.validate()
    if loop not in LOOPS:
      raise ValueError(f"Generator: loop {loop!r} not in {LOOPS}")
    self.model, self.config, self.loop = model, config, loop
    family = families.of(cfg)
    if family.samples:
      sampler = sampler or diffusion.SamplerConfig()
      sampler.validate(cfg.num_diffusion_train_steps)
    self._decoder: Any = family.decoder(model, config.latent_noise_scale, sampler)
    self.has_eot = eot_vector is not None
    dim = cfg.sonar_embed_dim
    if eot_vector is None:
      eot = np.zeros((dim,), np.float32)
    else:
      eot = np.asarray(eot_vector, np.float32)
      if eot.shape != (dim,):
        raise errors.UserError(f"eot_vector: shape {eot.shape}, expected ({dim},)")
      if not np.all(np.isfinite(eot)) or not np.any(eot):
        raise errors.UserError("eot_vector: must be finite and non-zero")
    self.eot = jnp.asarray(eot)
    self._start = jax.jit(self._start_impl)
    self._step = jax.jit(self._step_impl, donate_argnums=(1,))
    self._run = jax.jit(self._run_impl)

  # -- pieces (traced) --------------------------------------------------------------------------
  def _emit(self, carry: dict[str, Any], concept: Array) -> dict[str, Any]:
    """Stopping rules for concept number ``carry["k"] + 1``; updates outputs of running rows."""
    gen = self.config
    k = carry["k"]
    count = k + 1
    active = ~carry["done"]
    may_stop = may_stop_early(count, gen)
    eot_hit = jnp.zeros_like(active)
    if self.has_eot:
      eot_hit = cosine(concept, self.eot[None]) >= gen.eot_threshold
    rep_hit = jnp.zeros_like(active)
    if gen.repetition_threshold is not None:
      rep_hit = cosine(concept, carry["last"]) >= gen.repetition_threshold
    reason = jnp.where(may_stop & eot_hit, EOT,
                       jnp.where(may_stop & rep_hit, REPETITION,
                                 jnp.where(count >= gen.max_len, MAX_LEN, RUNNING)))
    outputs = carry["outputs"].at[:, k].set(
        jnp.where(active[:, None], concept, carry["outputs"][:, k]))
    return dict(carry,
                outputs=outputs,
                lengths=jnp.where(active, count, carry["lengths"]).astype(jnp.int32),
                reasons=jnp.where(active, reason, carry["reasons"]).astype(jnp.int32),
                done=carry["done"] | (active & (reason != RUNNING)),
                last=jnp.where(active[:, None], concept, carry["last"]))

  def _start_impl(self, variables: Variables, prompts: Array, lengths: Array, valid: Array,
                  rng: Array) -> dict[str, Any]:
    batch, plen, dim = prompts.shape
    total = plen + self.config.max_len
    lengths = lengths.astype(jnp.int32)
    state, concept = self._decoder.start(variables, prompts.astype(jnp.float32), lengths, total,
                                         step_rng(rng, 0))
    last_prompt = jnp.take_along_axis(prompts, (lengths - 1)[:, None, None], axis=1)[:, 0]
    carry = {"state": state, "k": jnp.zeros((), jnp.int32),
             "outputs": jnp.zeros((batch, self.config.max_len, dim), jnp.float32),
             "lengths": jnp.zeros((batch,), jnp.int32),
             "reasons": jnp.zeros((batch,), jnp.int32),
             "done": ~valid.astype(bool), "last": last_prompt.astype(jnp.float32),
             "prompt_lengths": lengths}
    return self._emit(carry, concept)

  def _step_impl(self, variables: Variables, carry: dict[str, Any], rng: Array) -> dict[str, Any]:
    k = carry["k"] + 1
    slot = carry["prompt_lengths"] + k - 1  # position of the concept fed back (number k - 1)
    state, concept = self._decoder.advance(variables, carry["state"], carry["last"], slot,
                                           step_rng(rng, k))
    return self._emit(dict(carry, state=state, k=k), concept)

  def _running(self, carry: dict[str, Any]) -> Array:
    return (carry["k"] + 1 < self.config.max_len) & ~jnp.all(carry["done"])

  def _run_impl(self, variables: Variables, prompts: Array, lengths: Array, valid: Array,
                rng: Array) -> dict[str, Any]:
    carry = self._start_impl(variables, prompts, lengths, valid, rng)
    return jax.lax.while_loop(self._running, lambda c: self._step_impl(variables, c, rng), carry)

  # -- public -----------------------------------------------------------------------------------
  def __call__(self, variables: Variables, prompts: Any, lengths: Optional[Any] = None, *,
               rng: Optional[Array] = None, valid: Optional[Any] = None) -> GenerationResult:
    """Generates for one batch.

    Args:
      variables: ``{"params", "buffers"}`` of the model.
      prompts: a list of (n_i, S) arrays, or a right-padded (B, L, S) array with ``lengths``.
      lengths: (B,) prompt lengths (>= 1) when ``prompts`` is padded.
      rng: PRNG key (Two-Tower noise, Base-LCM latent noise); default ``PRNGKey(0)``.
      valid: optional (B,) bool; False rows (batch padding) are never generated for.
    """
    dim = self.model.config.sonar_embed_dim
    if lengths is None:
      prompts, lengths = pad_prompts(prompts, dim)
    host_lengths = np.asarray(jax.device_get(lengths))
    if (np.shape(prompts)[-1] != dim or host_lengths.shape != np.shape(prompts)[:1]
        or not np.all((host_lengths >= 1) & (host_lengths <= np.shape(prompts)[1]))):
      raise errors.UserError(f"Generator: prompts {np.shape(prompts)} / lengths {host_lengths} do not "
                       f"describe (B, L, {dim}) prompts of 1..L concepts")
    prompts = jnp.asarray(prompts, jnp.float32)
    lengths = jnp.asarray(lengths, jnp.int32)
    valid = jnp.ones(lengths.shape, bool) if valid is None else jnp.asarray(valid, bool)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    if self.loop == "while":
      carry = self._run(variables, prompts, lengths, valid, rng)
    else:
      carry = self._start(variables, prompts, lengths, valid, rng)
      while bool(jax.device_get(self._running(carry))):
        carry = self._step(variables, carry, rng)
    out = jax.device_get({k: carry[k] for k in ("outputs", "lengths", "reasons")})
    return GenerationResult(np.asarray(out["outputs"]), np.asarray(out["lengths"]),
                            np.asarray(out["reasons"]))


def generate(model: Any, variables: Variables, prompts: Sequence[np.ndarray],
             config: GenerationConfig = GenerationConfig(), **kwargs: Any) -> GenerationResult:
  """One-off :class:`Generator` call on a list of prompts (``kwargs``: sampler, eot_vector, loop,
  rng). Reuse a :class:`Generator` to avoid recompiling across calls."""
  rng = kwargs.pop("rng", None)
  return Generator(model, config, **kwargs)(variables, prompts, rng=rng)


# ----------------------------------------------------------------------------------------------
# Files

def _check_prompt(path: str, field: str, emb: np.ndarray, dim: int) -> np.ndarray:
  if emb.dtype == object or emb.ndim != 2 or emb.shape[-1] != dim:
    raise errors.UserError(f"{path}: field '{field}': shape {emb.shape}, expected (n, {dim}) "
                     f"(n concepts of the model's sonar_embed_dim {dim})")
  if emb.shape[0] == 0:
    raise errors.UserError(f"{path}: field '{field}': empty prompt (0 concepts)")
  if not np.issubdtype(emb.dtype, np.floating):
    raise errors.UserError(f"{path}: field '{field}': dtype {emb.dtype} is not a float type")
  if not np.all(np.isfinite(emb)):
    raise errors.UserError(f"{path}: field '{field}': non-finite values")
  return emb.astype(np.float32)


def load_prompts(path: str, dim: int) -> tuple[list[str], list[np.ndarray]]:
  """Reads prompts (see the module docstring for the formats). Returns (ids, [(n_i, dim)])."""
  if not os.path.exists(path):
    raise errors.UserError(f"--prompts: {path} does not exist")
  if os.path.isdir(path) or path.endswith(schema.SHARD_SUFFIX):
    shards = schema.shard_paths(path) if os.path.isdir(path) else [path]
    ids, prompts = [], []
    for shard in shards:
      for i, doc in enumerate(schema.read_shard(shard)):
        prompts.append(_check_prompt(shard, f"record {i} ({doc.id}) 'embeddings'",
                                     np.asarray(doc.embeddings), dim))
        ids.append(doc.id)
    if not prompts:
      raise errors.UserError(f"{path}: no documents")
    return ids, prompts
  try:
    data = np.load(path, allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from None
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise errors.UserError(f"{path}: expected an .npz archive")
  with data:
    keys = list(data.keys())
    prompt_keys = [k for k in keys if k.startswith("prompt_")]
    if prompt_keys:
      return ([k[len("prompt_"):] for k in prompt_keys],
              [_check_prompt(path, k, _load_field(data, path, k), dim) for k in prompt_keys])
    if "embeddings" not in keys or "lengths" not in keys:
      raise errors.UserError(f"{path}: no prompts: expected 'prompt_<id>' arrays, or 'embeddings' "
                       f"(B, L, S) with 'lengths' (B,); found fields {keys}")
    emb = _load_field(data, path, "embeddings")
    lengths = _load_field(data, path, "lengths")
    if emb.ndim != 3 or emb.shape[-1] != dim:
      raise errors.UserError(f"{path}: field 'embeddings': shape {emb.shape}, expected (B, L, {dim}) "
                       f"(the model's sonar_embed_dim {dim})")
    if lengths.shape != emb.shape[:1] or not np.issubdtype(lengths.dtype, np.integer):
      raise errors.UserError(f"{path}: field 'lengths': shape {lengths.shape} dtype {lengths.dtype}, "
                       f"expected ({emb.shape[0]},) integers")
    if emb.shape[0] == 0:
      raise errors.UserError(f"{path}: field 'embeddings': no prompts")
    ids = ([str(x) for x in _load_field(data, path, "ids")] if "ids" in keys
           else [str(i) for i in range(emb.shape[0])])
    if len(ids) != emb.shape[0]:
      raise errors.UserError(f"{path}: field 'ids': {len(ids)} ids for {emb.shape[0]} prompts")
    prompts = []
    for i, n in enumerate(lengths):
      if not 0 <= n <= emb.shape[1]:
        raise errors.UserError(f"{path}: field 'lengths[{i}]': {n} not in [0, {emb.shape[1]}]")
      prompts.append(_check_prompt(path, f"embeddings[{i}][:{n}]", emb[i, :n], dim))
    return ids, prompts


def _load_field(data: Any, path: str, key: str) -> np.ndarray:
  try:
    return np.asarray(data[key])
  except ValueError as e:  # object arrays need pickle, which we never enable
    raise errors.UserError(f"{path}: field '{key}': cannot load without pickle ({e})") from None


def load_eot_vector(path: str, dim: int) -> np.ndarray:
  """An end-of-text vector (dim,): a ``.npy`` array, or an ``.npz`` with ``eot`` (e.g. a synthetic
  corpus's ``process.npz``) or ``eot_vector``."""
  if not os.path.exists(path):
    raise errors.UserError(f"--eot_vector: {path} does not exist")
  try:
    data = np.load(path, allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f"{path}: cannot read as .npy/.npz ({type(e).__name__}: {e})") from None
  field = "<array>"
  if isinstance(data, np.lib.npyio.NpzFile):
    with data:
      field = next((k for k in ("eot", "eot_vector") if k in data), None)
      if field is None:
        raise errors.UserError(f"{path}: no field 'eot' or 'eot_vector' (found {list(data.keys())})")
      data = np.asarray(data[field])
  vec = np.asarray(data)
  if vec.shape != (dim,):
    raise errors.UserError(f"{path}: field '{field}': shape {vec.shape}, expected ({dim},) (the "
                     f"model's sonar_embed_dim)")
  if not np.all(np.isfinite(vec)) or not np.any(vec):
    raise errors.UserError(f"{path}: field '{field}': must be finite and non-zero")
  return vec.astype(np.float32)


def save_outputs(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes an ``.npz`` atomically: a temporary file in the same directory, then rename."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_npz_atomic(path, arrays)


# ----------------------------------------------------------------------------------------------
# CLI

def define_sampler_flags() -> None:
  """The diffusion families' DDIM flags (defaults: the paper's, :class:`lcm_jax.diffusion.SamplerConfig`;
  the clipping/thresholding flags carry the reference's names and defaults)."""
  from absl import flags as f  # pylint: disable=g-import-not-at-top
  d = diffusion.SamplerConfig()
  f.DEFINE_integer("num_steps", d.num_steps, "diffusion families: DDIM inference steps.")
  f.DEFINE_float("guidance_scale", d.guidance_scale, "diffusion families: classifier-free guidance g.")
  f.DEFINE_float("guidance_rescale", d.guidance_rescale, "diffusion families: guidance rescale in [0, 1].")
  f.DEFINE_float("initial_noise_scale", d.initial_noise_scale, "diffusion families: initial noise std.")
  f.DEFINE_float("epsilon_scaling", d.epsilon_scaling, "diffusion families: epsilon is divided by this.")
  f.DEFINE_float("eta", d.eta, "diffusion families: DDIM eta (0 = deterministic).")
  f.DEFINE_enum("timestep_spacing", d.timestep_spacing, list(diffusion.TIMESTEP_SPACINGS),
                "diffusion families: DDIM timestep spacing (trailing_reference = the reference's list).")
  f.DEFINE_float("clip_noise", d.clip_noise, "diffusion families: the latent (initial noise and x after "
                 "every DDIM step) is clipped to +-clip_noise (the reference's default 100).")
  f.DEFINE_boolean("clip_sample", d.clip_sample, "diffusion families: static thresholding: clip each "
                   "step's x0 to +-clip_sample_range (diffusers' DDIM clip_sample).")
  f.DEFINE_float("clip_sample_range", d.clip_sample_range, "diffusion families: the clip_sample bound.")
  f.DEFINE_boolean("thresholding", d.thresholding, "diffusion families: dynamic thresholding of each "
                   "step's x0 (diffusers' DDIM): s = clip(quantile(|x0|, "
                   "dynamic_thresholding_ratio), 1, sample_max_value), x0 = clip(x0, -s, s) / s.")
  f.DEFINE_float("dynamic_thresholding_ratio", d.dynamic_thresholding_ratio,
                 "diffusion families: the quantile of --thresholding.")
  f.DEFINE_float("sample_max_value", d.sample_max_value,
                 "diffusion families: the largest s of --thresholding (>= 1).")


SAMPLER_FLAGS = ("num_steps", "guidance_scale", "guidance_rescale", "initial_noise_scale",
                 "epsilon_scaling", "eta", "timestep_spacing", "clip_noise", "clip_sample",
                 "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
                 "sample_max_value")
"""The :func:`define_sampler_flags` names: each is the :class:`~lcm_jax.diffusion.SamplerConfig`
field of the same name."""


def sampler_from_flags(fv: Any, num_train_steps: Optional[int]) -> diffusion.SamplerConfig:
  """The :func:`define_sampler_flags` values as a SamplerConfig, validated against the model's
  ``num_train_steps`` (None: not validated, e.g. a Base-LCM) -> ``UserError`` naming the flag."""
  sampler = diffusion.SamplerConfig(**{name: getattr(fv, name) for name in SAMPLER_FLAGS})
  if num_train_steps is not None:
    try:
      sampler.validate(num_train_steps)
    except ValueError as e:
      raise errors.UserError(f"bad sampler flag: {e}") from None
  return sampler


def _define_flags() -> Any:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  g = GenerationConfig()
  f = flags
  f.DEFINE_string("workdir", None, "Training workdir whose checkpoints/ to restore.")
  f.DEFINE_string("prompts", None,
                  "Prompts in raw SONAR space: an .npz with one (n, S) array per prompt under "
                  "keys 'prompt_<id>'; or an .npz with 'embeddings' (B, L, S) right-padded, "
                  "'lengths' (B,) and optional 'ids' (B,) (the --out layout); or an lcm_jax "
                  "dataset directory / .array_record shard (one prompt per document).")
  f.DEFINE_string("out", None,
                  "Output .npz (written atomically): ids (B,), embeddings (B, max_len, S) raw "
                  "SONAR space (zeros past each length), lengths (B,), stop_reasons (B,) in "
                  "eot|repetition|max_len, prompt_lengths (B,), step.")
  config_flags.DEFINE_config_file(
      "config", None, "Optional config file[:variant]; default: the config saved in the "
      "checkpoint's meta.", lock_config=False)
  f.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  f.DEFINE_integer("max_len", g.max_len, "Most concepts generated per prompt.")
  f.DEFINE_integer("min_gen_len", g.min_gen_len,
                   "The reference's min_gen_len (>= 1): an EOT/repetition stop needs this many "
                   "generated concepts before the one that triggers it (the first generated "
                   "concept never stops a row).")
  f.DEFINE_float("eot_threshold", g.eot_threshold,
                 "Stop when cosine(concept, end-of-text vector) >= this; the triggering "
                 "concept is kept as the last output. Needs --eot_vector.")
  f.DEFINE_string("eot_vector", None,
                  "End-of-text vector (S,) in raw SONAR space: a .npy, or an .npz with 'eot' "
                  "(e.g. a synthetic corpus's process.npz) or 'eot_vector'. Absent: no EOT stop.")
  f.DEFINE_float("repetition_threshold", None,
                 "Stop when cosine(concept, previous concept) >= this (paper: 0.9); off if unset.")
  f.DEFINE_boolean("sample_latent_variable", g.sample_latent_variable,
                   "Base-LCM: add temperature * N(0, I) in normalized space to each prediction "
                   "(the reference generator's default is on; ours off). Unset: on exactly when "
                   "--temperature > 0 is given.")
  f.DEFINE_float("temperature", g.temperature,
                 "Base-LCM: the latent noise std when sampling (the reference's lcm_temperature).")
  define_sampler_flags()
  f.DEFINE_integer("seed", 0, "PRNG seed (Two-Tower noise, Base-LCM latent noise).")
  f.DEFINE_integer("batch_size", 8, "Prompts per generation batch (padded to a multiple of the "
                   "mesh's batch shards).")
  f.DEFINE_enum("loop", "while", list(LOOPS), "while: one jitted lax.while_loop; python: a "
                "jitted step per concept driven from Python.")
  return f.FLAGS


def run_cli(flag_values: Any) -> dict[str, Any]:
  """Everything the CLI does after flag parsing; returns a summary. Raises user errors."""
  from lcm_jax import sharding  # pylint: disable=g-import-not-at-top
  fv = flag_values
  from lcm_jax.fileio import check_output_file  # pylint: disable=g-import-not-at-top
  for name in ("workdir", "prompts", "out"):
    if not fv[name].value:
      raise errors.UserError(f"--{name} is required")
  os.makedirs(os.path.dirname(os.path.abspath(fv.out)), exist_ok=True)  # as before: created
  check_output_file(fv.out, "--out")
  sample = latent_sampling_from_flags(
      fv.sample_latent_variable if fv["sample_latent_variable"].present else None,
      fv.temperature, fv["temperature"].present)
  gen = GenerationConfig(max_len=fv.max_len, min_gen_len=fv.min_gen_len,
                         eot_threshold=fv.eot_threshold,
                         repetition_threshold=fv.repetition_threshold,
                         sample_latent_variable=sample, temperature=fv.temperature)
  try:
    gen.validate()
  except ValueError as e:
    raise errors.UserError(f"bad generation flag: {e}") from None
  if fv.batch_size < 1:
    raise errors.UserError(f"--batch_size: expected >= 1, got {fv.batch_size}")
  step = ckpt_lib.checkpoint_step(fv.workdir, fv.step)
  config = fv.config if fv.config is not None else ckpt_lib.load_config(fv.workdir, step)
  model_cfg = families.model_config(config.model)
  # Bad sampler flags are refused whatever the family (a Base-LCM ignores the sampler).
  sampler = sampler_from_flags(fv, model_cfg.num_diffusion_train_steps)
  dim = model_cfg.sonar_embed_dim
  ids, prompts = load_prompts(fv.prompts, dim)
  eot = load_eot_vector(fv.eot_vector, dim) if fv.eot_vector else None

  t0 = time.time()
  model, variables, mesh = ckpt_lib.restore_variables(config, fv.workdir, step)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch = -(-fv.batch_size // shards) * shards
  generator = Generator(model, gen, sampler=sampler, eot_vector=eot, loop=fv.loop)
  plen = max(p.shape[0] for p in prompts)
  rng = jax.random.PRNGKey(fv.seed)
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
  results = []
  with sharding.activate(mesh):
    for b, start in enumerate(range(0, len(prompts), batch)):
      chunk = prompts[start:start + batch]
      valid = np.arange(batch) < len(chunk)
      chunk = chunk + [np.zeros((1, dim), np.float32)] * (batch - len(chunk))
      padded, lengths = pad_prompts(chunk, dim, plen)
      res = generator(variables, put(padded), put(lengths), valid=put(valid),
                      rng=jax.random.fold_in(rng, b))
      n = int(valid.sum())
      results.append(GenerationResult(res.embeddings[:n], res.lengths[:n], res.stop_reasons[:n]))
  out = {
      "ids": np.asarray(ids),
      "embeddings": np.concatenate([r.embeddings for r in results]).astype(np.float32),
      "lengths": np.concatenate([r.lengths for r in results]).astype(np.int32),
      "stop_reasons": np.concatenate([r.reason_names() for r in results]),
      "prompt_lengths": np.asarray([p.shape[0] for p in prompts], np.int32),
      "step": np.asarray(step, np.int64),
  }
  save_outputs(fv.out, out)
  reasons, counts = np.unique(out["stop_reasons"], return_counts=True)
  return {"prompts": len(ids), "step": step, "seconds": time.time() - t0,
          "stop_reasons": dict(zip(reasons.tolist(), counts.tolist())),
          "mean_length": float(out["lengths"].mean())}


def _report(fv: Any) -> str:
  summary = run_cli(fv)
  return (f"generated {summary['prompts']} prompts from step {summary['step']} in "
          f"{summary['seconds']:.1f}s: mean length {summary['mean_length']:.2f}, stop reasons "
          f"{summary['stop_reasons']} -> {fv.out}")


main = errors.absl_main(_report)
"""absl entry point: user errors -> one ``error:`` line on stderr and exit status 2."""


def run() -> None:
  """``python -m lcm_jax.generate``."""
  errors.run_absl_tool(_define_flags, main)


if __name__ == "__main__":
  run()
