"""Defaults shared by every lcm_jax recipe. Recipes override only what differs.

Every field can be overridden on the command line, e.g. ``--config.optimizer.lr=1e-3``.
"""

import dataclasses

import ml_collections

from lcm_jax import families
from lcm_jax.models.config import ModelConfig


def model_config(family: str = "base_lcm") -> ml_collections.ConfigDict:
  """``config.model`` of ``family``: every field that family reads, with the defaults of
  :class:`lcm_jax.models.config.ModelConfig` (the one source of defaults, documented there; the
  names follow the reference). A field of another family is absent, so overriding it on the
  command line is an error."""
  fields = families.get(family).fields
  defaults = dataclasses.asdict(ModelConfig())
  m = ml_collections.ConfigDict({k: v for k, v in defaults.items() if k in fields})
  m.family = family
  return m


def get_config(family: str = "base_lcm") -> ml_collections.ConfigDict:
  """The defaults of every recipe, with ``config.model`` of ``family`` (:func:`model_config`)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config(family)

  # Data (lcm_jax/data.py). Datasets are "DIR[:WEIGHT],DIR[:WEIGHT],..." (a weighted mixture),
  # e.g. --config.data.train=/data/wiki:0.7,/data/books:0.3
  c.data = ml_collections.ConfigDict()
  c.data.train = "data/synthetic"
  c.data.eval = ""                 # empty: hold out `eval_fraction` of each train dataset
  c.data.eval_fraction = 0.02      # documents held out (deterministic by index hash)
  c.data.normalizer = ""           # path to normalizer.npz; "" = the first train dataset's own
  c.data.max_doc_len = 128         # wrap documents into pieces of at most this many concepts
  c.data.seq_len = 128             # packed row length (concepts)
  c.data.global_batch_size = 16    # rows per step over all processes and microbatches
  c.data.shuffle_seed = 0
  c.data.data_shards = 0           # read/pack streams of the global batch (0 = one per process);
                                   # fix it to make batches independent of the process count
  c.data.worker_count = 0          # grain prefetch worker processes per data shard (0 = in-process)
  c.data.worker_buffer_size = 2
  c.data.read_threads = 8          # ArrayRecord read threads per process
  c.data.read_buffer_size = 256    # records read ahead
  c.data.packing_bins = 0          # rows packed together (0 = max(batch, 8192 // seq_len))
  c.data.num_epochs = None         # None = repeat forever
  # The default job's corpus: `python -m lcm_jax.main` generates a synthetic corpus here on first
  # use, and only when data.train is exactly this path (never into a path the user named).
  c.data.synthetic_corpus = ""

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 4e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-5
  c.optimizer.weight_decay = 0.1   # applied to every parameter, as the reference does
  c.optimizer.warmup_steps = 10_000
  c.optimizer.warmup_init_lr = 1e-7
  c.optimizer.decay_steps = 250_000  # cosine reaches final_lr here
  c.optimizer.final_lr = 1e-5
  c.optimizer.grad_clip = 25.0
  c.optimizer.grad_accum_steps = 1

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1    # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 250_000
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.eval_batches = 16
  # Periodic eval (lcm_jax/evaluate.py): besides the loss, teacher-forced l2 / contrastive accuracy
  # / paraphrasing in raw SONAR space, written as eval/l2, eval/contrastive_accuracy,
  # eval/paraphrasing. The Two-Tower samples for them with DDIM (the paper's guidance 3, rescale
  # 0.7, ...) but only eval_sampler_steps steps to stay cheap (0: loss only); the CLI
  # `python -m lcm_jax.evaluate` defaults to the paper's 40.
  c.train.eval_metrics = True
  c.train.eval_sampler_steps = 10
  c.train.eval_contrastive_rows = 16  # candidates: concepts of groups of 16 rows (0 = whole batch)
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.async_checkpoint = True
  c.train.peak_flops = 0.0         # per device; 0 = look up from the device kind
  c.train.init_from = ""           # fine-tuning: start from WORKDIR[@STEP]'s params and buffers
  c.train.log_batch_fingerprints = False  # for determinism tests: hash of every batch in metrics
  # Non-finite guard: every step checks its loss and gradient norm inside the jitted step and
  # applies no update when either is NaN/inf. With 0 the run stops at the first such step (exit 3,
  # no checkpoint of it); with N > 0 up to N such batches are skipped before stopping.
  c.train.max_nonfinite_skips = 0
  # Profiler window: a jax.profiler trace of profile_num_steps steps from the step that starts at
  # state step profile_start_step (0-based), written to WORKDIR/profile/plugins/profile/
  # <UTC time>_step<N>/<host>[_process<i>].xplane.pb, one file per process (view with
  # `tensorboard --logdir WORKDIR/profile` and the profile plugin). -1 = off; a window that
  # starts before the resume step or at/after num_steps traces nothing (a warning says so).
  c.train.profile_start_step = -1
  c.train.profile_num_steps = 5
  return c


def apply_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``tiny`` CPU variant shared by every recipe (modifies and returns ``c``).

  d 64, 2 layers, 4 heads, ffn_inner_dim 256, SONAR dim 32, no dropout; 16 rows x 128 concepts of
  the synthetic corpus (created on first use) on a data-parallel mesh; 600 steps, lr 3e-3. A
  Two-Tower caller sets its denoiser depth itself.
  """
  c.model.model_dim = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.ffn_inner_dim = 256
  c.model.sonar_embed_dim = 32
  c.model.dropout = 0.0
  c.data.train = "data/synthetic"
  c.data.synthetic_corpus = "data/synthetic"
  c.data.seq_len = 128
  c.data.global_batch_size = 16
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.decay_steps = 600
  c.optimizer.final_lr = 1e-4
  c.optimizer.weight_decay = 0.01
  c.train.num_steps = 600
  c.train.log_every = 50
  c.train.eval_every = 200
  c.train.eval_batches = 8
  c.train.checkpoint_every = 200
  return c


def apply_bench(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``bench`` variant (benchmarks/train_step.py) shared by every recipe (modifies and returns
  ``c``): d 1024, 16 heads, ffn_inner_dim 4096 (SwiGLU 2816), dropout 0.1 as in training, 16 rows
  x 128 concepts on a data-parallel mesh, layers unrolled (``scan_layers=False``: on CPU the
  scanned stack's per-layer slicing and stacking cost 10-25% of the step; the recipes keep
  ``nn.scan`` for its compile time at 32 layers). The depth (``num_layers``,
  ``denoiser_num_layers``) is the caller's.
  """
  c.model.model_dim = 1024
  c.model.num_heads = 16
  c.model.ffn_inner_dim = 4096   # SwiGLU 2816
  c.model.dropout = 0.1
  c.model.scan_layers = False
  c.data.seq_len = 128
  c.data.global_batch_size = 16
  c.mesh.data = -1
  c.mesh.fsdp = 1
  return c
